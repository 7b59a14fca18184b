"""The jobs behind the CLI commands, as library functions: ``run_select``, ``finetune``, ``run_eval``, ``run_merge``.

``finetune`` runs every method through the same data, training loop and evaluation, so the numbers
are comparable: ``rows`` (row-sparse, rows from any scorer; ``neft`` is rows with the NeFT scorer),
``lora`` (PEFT), ``full`` and ``none`` (zero-shot).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neurontune import __version__
from neurontune.config import DataConfig, EvalConfig, FinetuneConfig, MergeConfig, SelectConfig
from neurontune.errors import NeurontuneError
from neurontune.evaluation import evaluate, primary_metric
from neurontune.io import (
    atomic_dir,
    atomic_path,
    read_json,
    save_pretrained_atomic,
    write_json,
    write_safetensors,
)
from neurontune.models import DEFAULT_MODEL, load_model, resolve_dtype
from neurontune.scoring import get_scorer, score_model
from neurontune.selection import select
from neurontune.spec import NeuronSpec
from neurontune.targets import find_target_modules, linear_shape
from neurontune.tasks import StepBatches, Task, fixed_batches, general_text, load_task
from neurontune.train import TrainArgs, list_checkpoints, train

# ---- shared pieces ---------------------------------------------------------------------------------


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_from_config(cfg: DataConfig, tok: Any) -> Task:
    return load_task(
        cfg.task, tok, seed=cfg.seed, eval_file=cfg.eval_file, eval_fraction=cfg.eval_fraction,
        label_words=cfg.label_words_value(), template=cfg.template,
    )  # fmt: skip


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; an adapter's own parameters count in the total, as PEFT does."""
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if counter is not None:
        return counter()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(
        p.numel() for p in model.parameters()
    )


def describe_parameters(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def peak_memory_mib() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "process_peak_rss"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- select ----------------------------------------------------------------------------------------
def select_neurons(
    cfg: SelectConfig, model: torch.nn.Module, tok: Any, task: Task
) -> tuple[NeuronSpec, dict[str, torch.Tensor]]:
    """Score the target rows of ``model`` on ``cfg.calib_examples`` training examples and apply the budget.

    Returns the spec and the raw scores (module name -> one score per row).
    """
    calib = fixed_batches(task.train[: cfg.calib_examples], tok, cfg.calib_batch_size, cfg.max_length)
    t0 = time.perf_counter()
    scores = score_model(
        model,
        cfg.scorer,
        batches=calib,
        target_modules=cfg.target_modules_value(),
        exclude_modules=cfg.exclude_modules_value(),
        seed=cfg.seed,
        progress=True,
        **cfg.scorer_kwargs(),
    )
    seconds = time.perf_counter() - t0
    spec = select(
        model,
        scores,
        per_layer=cfg.per_layer,
        order=cfg.order,
        min_per_module=cfg.min_per_module,
        seed=cfg.seed,
        provenance={
            "scorer": cfg.scorer,
            "scorer_options": cfg.scorer_kwargs(),
            "base_model": cfg.model,
            "seed": cfg.seed,
            "task": cfg.task,
            "calib_examples": min(cfg.calib_examples, len(task.train)),
            "score_seconds": seconds,
        },
        verbose=True,
        **cfg.budget_kwargs(),
    )
    s = spec.summary()
    print(
        f"selected {s['rows']:,} rows ({s['params']:,} params) in {s['modules']} modules with {cfg.scorer} "
        f"({seconds:.1f}s)\n  rows by module type: {s['rows_by_type']}\n  rows by layer: {s['rows_by_layer']}"
    )
    return spec, scores


def check_selection(cfg: SelectConfig, model: torch.nn.Module) -> None:
    """Fail on a bad scorer, scorer option, target or budget now, before minutes of evaluation or scoring."""
    get_scorer(cfg.scorer, **cfg.scorer_kwargs())
    names = find_target_modules(model, cfg.target_modules_value(), cfg.exclude_modules_value())
    zeros = {n: torch.zeros(linear_shape(model.get_submodule(n))[0]) for n in names}
    select(model, zeros, per_layer=cfg.per_layer, order=cfg.order, min_per_module=cfg.min_per_module,
           **cfg.budget_kwargs())  # fmt: skip


def save_selection(spec: NeuronSpec, scores: dict[str, torch.Tensor], path: str | Path) -> None:
    """``path`` gets the spec (JSON); ``<stem>.scores.safetensors`` beside it the raw scores."""
    path = Path(path)
    spec.save(path)
    write_safetensors(
        path.with_suffix(".scores.safetensors"), scores, {"scorer": str(spec.provenance.get("scorer"))}
    )


def _load(cfg: SelectConfig) -> tuple[torch.nn.Module, Any, Task]:
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device())
    task = task_from_config(cfg, tok)
    print(
        f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; task {task.name} ({task.kind}, "
        f"{len(task.train)} train / {len(task.eval)} eval examples)"
    )
    return model, tok, task


def run_select(cfg: SelectConfig) -> NeuronSpec:
    torch.manual_seed(cfg.seed)
    model, tok, task = _load(cfg)
    spec, scores = select_neurons(cfg, model, tok, task)
    spec.provenance["config"] = dataclasses.asdict(cfg)
    save_selection(spec, scores, cfg.output)
    print(f"wrote {cfg.output}")
    return spec


# ---- adapters: load any kind -----------------------------------------------------------------------
def load_adapted(
    adapter: str | None, model_name: str | None = None, dtype: str = "float32", is_trainable: bool = False
) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer, kind)`` for a plain model, a neurontune row adapter or a PEFT LoRA adapter.

    The base model comes from ``model_name`` or else from the adapter's config. Only JSON and
    safetensors files are read.
    """
    if adapter is None:
        model, tok = load_model(model_name or DEFAULT_MODEL, dtype=dtype, device=device())
        return model, tok, "plain"
    from neurontune.rowtune.model import ADAPTER_CONFIG, ADAPTER_FORMAT, RowTuneModel

    adapter_dir = Path(adapter)
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, "adapter config")
    if not isinstance(cfg, dict):
        raise NeurontuneError(f"{adapter_dir / ADAPTER_CONFIG}: expected a JSON object")
    if cfg.get("format") == ADAPTER_FORMAT:
        base, tok = load_model(
            model_name or cfg.get("base_model") or DEFAULT_MODEL, dtype=dtype, device=device()
        )
        return RowTuneModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable), tok, "rows"
    if "peft_type" in cfg:
        from peft import PeftModel

        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise NeurontuneError(
                f"{adapter_dir}: PEFT adapter without adapter_model.safetensors (pickles are refused)"
            )
        base_name = model_name or cfg.get("base_model_name_or_path") or DEFAULT_MODEL
        base, tok = load_model(base_name, dtype=dtype, device=device())
        try:
            return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable), tok, "lora"
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            raise NeurontuneError(
                f"PEFT adapter {adapter_dir} does not fit the base model {base_name!r}: "
                f"{first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__}"
            ) from None
    raise NeurontuneError(f"{adapter_dir}: neither a neurontune row adapter nor a PEFT adapter")


def _lora(cfg: FinetuneConfig, model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = find_target_modules(model, cfg.target_modules_value(), cfg.exclude_modules_value())
    r = cfg.lora_rank()
    lcfg = LoraConfig(
        r=r,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * r,
        lora_dropout=cfg.lora_dropout,
        target_modules=names,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


# ---- finetune --------------------------------------------------------------------------------------
def _check_output_dir(cfg: FinetuneConfig, out: Path) -> None:
    """Refuse to clobber a run; on resume, refuse a config that would change the trajectory."""
    saved = out / "config.json"
    if cfg.resume:
        if not saved.is_file():
            raise NeurontuneError(f"nothing to resume: {out} has no config.json from an earlier run")
        old = read_json(saved, "run config")
        new = dataclasses.asdict(cfg)
        diff = [
            f"{k}: {old.get(k)!r} -> {v!r}"
            for k, v in new.items()
            if k not in FinetuneConfig.RESUME_FREE and old.get(k) != v
        ]
        if diff:
            raise NeurontuneError(
                f"cannot resume {out}: the config differs from the run's ({'; '.join(diff)})"
            )
    elif saved.is_file() or list_checkpoints(out):
        if not cfg.overwrite:
            raise NeurontuneError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )


def _check_method(cfg: FinetuneConfig, model: torch.nn.Module, out: Path) -> NeuronSpec | None:
    """Check what the method needs of the model before the run writes anything; returns the
    validated ``spec=`` selection when one is given."""
    if cfg.method == "gates" and cfg.gate_granularity == "structured":
        from neurontune.gates import check_structured

        check_structured(model)
    if cfg.method not in ("rows", "neft") or (cfg.resume and (out / "neuron_spec.json").is_file()):
        return None
    if cfg.spec:
        from neurontune.analysis import load_spec

        return load_spec(cfg.spec).validate(model)
    check_selection(cfg, model)
    return None


def _trainable_model(
    cfg: FinetuneConfig, model: torch.nn.Module, tok: Any, task: Task, out: Path, given: NeuronSpec | None
) -> tuple[torch.nn.Module, NeuronSpec | None]:
    if cfg.method in ("rows", "neft"):
        from neurontune.rowtune import RowTuneConfig, get_rowtune_model

        spec_path = out / "neuron_spec.json"
        if cfg.resume and spec_path.is_file():
            spec = NeuronSpec.load(spec_path)
            print(f"using the selection of the run being resumed ({spec.num_rows():,} rows)")
        elif given is not None:
            spec = given
            spec.provenance["transferred_from"] = cfg.spec
            spec.save(spec_path)
            print(f"training the {spec.num_rows():,} rows of {cfg.spec}")
        else:
            spec, scores = select_neurons(cfg, model, tok, task)
            spec.provenance["config"] = dataclasses.asdict(cfg)
            save_selection(spec, scores, spec_path)
        rt = RowTuneConfig(target_modules=cfg.target_modules_value(), impl=cfg.impl)
        return get_rowtune_model(model, spec, rt), spec
    if cfg.method == "lora":
        return _lora(cfg, model), None
    if cfg.method == "gates":
        from neurontune.gates import GatedModel

        return GatedModel(model, cfg.gate_config()), None
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, None
    model.requires_grad_(False)
    return model, None


def _prune(
    cfg: FinetuneConfig, gated: torch.nn.Module, tok: Any, out: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Gates: save the trained gates, make the export shape uniform, remove what is shut, write
    ``output_dir/pruned`` (a plain transformers model) and report the parameters removed."""
    from neurontune.gates import count_prunable, export_pruned, fold_linear_gates

    gated.eval()
    info: dict[str, Any] = {"achieved_sparsity": gated.sparsity()}
    gates = {k: v.contiguous() for k, v in gated.state_dict_gates().items()}
    write_safetensors(out / "gates.safetensors", gates, {"config": json.dumps(gated.config_dict())})
    total_before = count_parameters(gated.base_model)[1] - sum(v.numel() for v in gates.values())
    if cfg.gate_granularity == "structured":
        prunable_before = count_prunable(gated.base_model)
        achieved = info["achieved_sparsity"]["sparsity_mlp"]
        if abs(achieved - cfg.gate_sparsity) > 0.05:
            print(
                f"warning: the gates shut {achieved:.1%} of the MLP channels, not {cfg.gate_sparsity:.0%}; "
                f"the export removes the {cfg.gate_sparsity:.0%} with the lowest gates (train longer, or "
                "raise lr or gate_lambda, to let the gates choose)"
            )
        info["shape"] = gated.finalize(cfg.gate_sparsity)
        plain = export_pruned(gated, out / "pruned", tok)
        info["prunable_params"] = [prunable_before, count_prunable(plain)]
        info["removed_fraction_of_prunable"] = 1 - info["prunable_params"][1] / prunable_before
    else:  # linear gates: folded, same shapes (shut rows/columns become zeros)
        plain = fold_linear_gates(gated)
        save_pretrained_atomic(out / "pruned", plain, tok)
    info["total_params"] = [total_before, count_parameters(plain)[1]]
    print(
        f"pruned: {info['total_params'][0]:,} -> {info['total_params'][1]:,} parameters "
        f"({1 - info['total_params'][1] / info['total_params'][0]:.1%} removed); wrote {out / 'pruned'}/"
    )
    return plain, info


def _save_outputs(cfg: FinetuneConfig, model: torch.nn.Module, tok: Any, out: Path) -> Path | None:
    if cfg.method == "none":
        return None
    if cfg.method == "gates":
        return out / "pruned"
    if cfg.method == "full":
        return save_pretrained_atomic(out / "model", model, tok)
    if cfg.method == "lora":
        model.peft_config["default"].base_model_name_or_path = cfg.model  # what load_adapted reloads
        with atomic_dir(out / "adapter") as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)  # only linears are adapted; no Hub lookup
    else:
        model.save_pretrained(out / "adapter")
    if cfg.save_merged:
        save_pretrained_atomic(out / "merged", model.merge_and_unload(), tok)
    return out / "adapter"


def _fmt_metrics(m: dict[str, Any]) -> str:
    keys = ("accuracy", "exact_match", "bleu", "chrf", "rougeL", "perplexity", "forgetting_ppl")
    return ", ".join(f"{k} {m[k]:.3f}" if k == "accuracy" else f"{k} {m[k]:.2f}" for k in keys if k in m)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """The main job. Writes to ``cfg.output_dir``: ``config.json``, ``neuron_spec.json`` (rows),
    ``checkpoints/``, ``train_log.csv``, ``adapter/`` (rows, lora) or ``model/`` (full), optionally
    ``merged/``, ``metrics.json``, ``report.md`` and ``report.html``.
    """
    out = Path(cfg.output_dir)
    _check_output_dir(cfg, out)
    torch.manual_seed(cfg.seed)
    model, tok, task = _load(cfg)  # data problems surface here, before anything is written
    task = task.head(cfg.train_examples, cfg.eval_examples)
    given = _check_method(cfg, model, out)  # bad method input fails here, before anything is written
    forget = general_text(cfg.forgetting_examples) if cfg.forgetting_examples else []
    if cfg.overwrite and not cfg.resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    write_json(out / "config.json", {**dataclasses.asdict(cfg), "neurontune_version": __version__})

    def run_eval(m: torch.nn.Module) -> dict[str, Any]:
        return evaluate(
            m, tok, task, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, general_text=forget
        )

    before = run_eval(model) if cfg.eval_before or cfg.method == "none" else None
    model, spec = _trainable_model(cfg, model, tok, task, out, given)
    trainable, total = count_parameters(model)
    print(describe_parameters(model))
    log: list[dict[str, float]] = []
    if cfg.method != "none":
        args = TrainArgs(
            steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
            lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
            precision=cfg.precision, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )  # fmt: skip
        data = StepBatches(task.train, tok, cfg.batch_size, cfg.max_length, cfg.seed)
        log = train(model, data, args, out, resume=cfg.resume)
    peak, peak_kind = peak_memory_mib()  # through loading, selection and training (not the final eval)
    after = run_eval(model) if cfg.method != "none" else before
    gates = None
    if cfg.method == "gates":
        gates = {"gated": after}  # the gated model in eval mode, before the export's uniform widths
        model, info = _prune(cfg, model, tok, out)
        gates.update(info)
        after = run_eval(model)
    saved = _save_outputs(cfg, model, tok, out)
    metric = primary_metric(task)
    train_seconds = sum(r["seconds"] for r in log)
    metrics = {
        "method": cfg.method,
        "scorer": cfg.scorer if cfg.method in ("rows", "neft") else None,
        "task": task.name,
        "task_kind": task.kind,
        "model": cfg.model,
        "primary_metric": metric,
        "before": before,
        "after": after,
        "trainable_params": trainable,
        "total_params": total,
        "rows": spec.num_rows() if spec is not None else None,
        "spec": cfg.spec if cfg.method in ("rows", "neft") else None,
        "gates": gates,
        "lora_r": cfg.lora_rank() if cfg.method == "lora" else None,
        "steps": len(log),
        "first_loss": log[0]["loss"] if log else None,
        "last_loss": log[-1]["loss"] if log else None,
        "train_seconds": train_seconds,
        "tokens_per_second": sum(r["tokens"] for r in log) / train_seconds if train_seconds else None,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "saved": str(saved) if saved else None,
        "saved_bytes": dir_bytes(saved) if saved else 0,
        "device": device(),
        "command": " ".join(sys.argv),
    }
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", cfg, metrics)
    from neurontune.analysis import run_report

    run_report(out, metrics, spec)
    summary = (
        f"{metric} {before[metric]:.3f} -> {after[metric]:.3f}" if before else f"{metric} {after[metric]:.3f}"
    )
    print(f"{summary} on {len(task.eval)} {task.name} eval examples ({_fmt_metrics(after)}); wrote {out}/")
    return metrics


def write_report(path: Path, cfg: FinetuneConfig, m: dict[str, Any]) -> None:
    rows = [
        ("method", m["method"] + (f" ({m['scorer']})" if m["scorer"] else "")),
        ("model", m["model"]),
        ("task", f"{m['task']} ({m['task_kind']})"),
        ("trainable params", f"{m['trainable_params']:,} of {m['total_params']:,}"),
        ("steps", f"{m['steps']} (batch {cfg.batch_size} x accum {cfg.grad_accum}, lr {cfg.lr:g})"),
        ("loss", f"{m['first_loss']:.4f} -> {m['last_loss']:.4f}" if m["first_loss"] is not None else "-"),
        ("train time", f"{m['train_seconds']:.1f} s"),
        ("peak memory", f"{m['peak_memory_mib']:.0f} MiB ({m['peak_memory_kind']})"),
        ("saved", f"{m['saved']} ({m['saved_bytes']:,} bytes)" if m["saved"] else "-"),
    ]
    if g := m.get("gates"):
        before, after = g["total_params"]
        rows += [
            ("parameters after pruning", f"{before:,} -> {after:,} ({1 - after / before:.1%} removed)"),
            ("gate sparsity at the end of training", ", ".join(f"{k} {v:.3f}" for k, v in g["achieved_sparsity"].items())),
            (f"{m['primary_metric']} of the gated model", f"{g['gated'][m['primary_metric']]:.4g} (after: the pruned export)"),
        ]  # fmt: skip
    lines = [f"# neurontune run: {cfg.output_dir}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    keys = [k for k in m["after"] if isinstance(m["after"][k], int | float)]
    lines += ["", "| metric | before | after |", "|---|---|---|"]
    for k in keys:
        b = m["before"].get(k) if m["before"] else None
        lines.append(f"| {k} | {'-' if b is None else f'{b:.4g}'} | {m['after'][k]:.4g} |")
    for s in m["after"].get("samples", []):
        lines += ["", f"- prompt: `{s['prompt'][-80:]!r}`", f"  - prediction: `{s['prediction']!r}`"]
        lines.append(f"  - reference: `{s['reference']!r}`")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- eval / merge ----------------------------------------------------------------------------------
def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    model, tok, kind = load_adapted(cfg.adapter, cfg.model, cfg.dtype)
    task = task_from_config(cfg, tok).head(None, cfg.eval_examples)
    forget = general_text(cfg.forgetting_examples) if cfg.forgetting_examples else []
    metrics = evaluate(
        model, tok, task, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, general_text=forget
    )
    metrics = {"adapter": cfg.adapter, "adapter_kind": kind, "task": task.name, **metrics}
    print(f"{task.name}: {_fmt_metrics(metrics)} on {len(task.eval)} examples")
    if cfg.output:
        write_json(cfg.output, metrics)
    return metrics


def run_merge(cfg: MergeConfig) -> Path:
    model, tok, kind = load_adapted(cfg.adapter, cfg.model, "float32")
    merged = model.merge_and_unload()
    merged = merged.to(resolve_dtype(cfg.dtype))
    save_pretrained_atomic(cfg.output, merged, tok)
    print(f"merged the {kind} adapter {cfg.adapter} into {cfg.output} ({describe_parameters(merged)})")
    return Path(cfg.output)
