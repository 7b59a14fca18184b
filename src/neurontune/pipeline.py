"""The jobs behind the CLI commands, as library functions: ``run_select``, ``finetune``, ``run_eval``, ``run_merge``.

``finetune`` runs every method through the same data, training loop and evaluation, so the numbers
are comparable; what differs between methods lives in :mod:`neurontune.methods`, one class each.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from neurontune import __version__
from neurontune.config import DataConfig, EvalConfig, FinetuneConfig, MergeConfig, SelectConfig
from neurontune.errors import MainProcessError, NeurontuneError
from neurontune.evaluation import EvalCurve, evaluate, metric_names, primary_metric, task_metrics
from neurontune.io import (
    atomic_path,
    read_json,
    refuse_existing,
    save_pretrained_atomic,
    write_json,
)
from neurontune.methods import get_method, load_output
from neurontune.models import DEFAULT_MODEL, load_model, model_quantization, resolve_dtype
from neurontune.runtime import count_parameters, describe_parameters, device, process_state
from neurontune.runtime import share_outcome as _share_outcome
from neurontune.spec import NeuronSpec
from neurontune.tasks import (
    Example,
    StepBatches,
    Task,
    fit_max_length,
    general_text,
    load_task,
    model_length_limit,
)
from neurontune.train import (
    EMA_SHARDED,
    EarlyStopping,
    asked_processes_not_started,
    launched_min_num_params,
    launched_with,
    launched_zero_stage,
    list_checkpoints,
    mixed_precision,
    shard_model,
    train,
    train_args,
)

# ---- shared pieces ---------------------------------------------------------------------------------


# a data file of up to this many records is read whole (as before streaming); bigger ones are sampled
MIN_RECORDS_READ = 10_000


def record_budget(cfg: DataConfig) -> tuple[int | None, int | None]:
    """How many records of the data file and of the eval file a command needs to read: twice what its
    example counts take from each split (the held-out fraction included), at least
    :data:`MIN_RECORDS_READ`; ``None``: all (no count bounds it)."""
    n_train = max(getattr(cfg, "train_examples", 0) or 0, getattr(cfg, "calib_examples", 0) or 0)
    n_eval = getattr(cfg, "eval_examples", 0) or 0
    if cfg.eval_split == "validation":  # the validation split comes out of the train split
        n_train, n_eval = n_train + n_eval, 0
    if not n_train and not n_eval:
        return None, None
    if cfg.eval_file:
        return max(MIN_RECORDS_READ, 2 * n_train), max(MIN_RECORDS_READ, 2 * n_eval)
    f = cfg.eval_fraction
    need = max(n_train / (1 - f), n_eval / f)
    return max(MIN_RECORDS_READ, 2 * math.ceil(need)), None


def task_from_config(cfg: DataConfig, tok: Any) -> Task:
    sample, eval_sample = record_budget(cfg)
    task = load_task(
        cfg.task, tok, seed=cfg.seed if cfg.split_seed is None else cfg.split_seed, eval_file=cfg.eval_file, eval_fraction=cfg.eval_fraction,
        label_words=cfg.label_words_value(), template=cfg.template, columns=cfg.columns_value(),
        sample=sample, eval_sample=eval_sample,
    )  # fmt: skip
    return task.validation(cfg.eval_fraction) if cfg.eval_split == "validation" else task


def with_max_length(cfg: Any, examples: Sequence[Example], tok: Any, model: Any, verbose: bool = True) -> Any:
    """A copy of ``cfg`` with ``max_length`` resolved for ``examples`` (default: the longest, up to the
    model's limit; :func:`~neurontune.tasks.fit_max_length`), printing a note when examples are cut."""
    n, note = fit_max_length(examples, tok, cfg.max_length, model_length_limit(model, tok))
    if note and verbose:
        print(note)
    resolved = copy.copy(cfg)  # keeps what the user set (is_set)
    resolved.max_length = n
    return resolved


# forgetting_ppl's window when max_length is not set (the former default max_length): the general text is
# not the task's, so its window does not follow the task's examples, and the figure stays comparable
FORGETTING_LENGTH = 128


def forgetting_length(cfg: Any) -> int:
    """Tokens per window of the forgetting perplexity: ``max_length`` as the user set it, else 128."""
    return cfg.max_length if cfg.max_length is not None else FORGETTING_LENGTH


def eval_source(cfg: DataConfig, task: Task) -> str:
    """What the evaluation read, for the summary line: the eval file, the validation split, or the task."""
    if cfg.eval_file:
        return os.path.basename(cfg.eval_file)
    return f"{task.name} validation" if cfg.eval_split == "validation" else task.name


def peak_memory_mib() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "process_peak_rss"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- select ----------------------------------------------------------------------------------------
def _load(cfg: SelectConfig, empty: bool = False) -> tuple[torch.nn.Module, Any, Task]:
    t0 = time.perf_counter()
    model, tok = load_model(
        cfg.model, dtype=cfg.dtype, device=device(), quantization=cfg.quantization, empty=empty
    )
    task = task_from_config(cfg, tok)
    how = "without its weights (each process reads its shards later)" if empty else "loaded"
    process_state().print(
        f"model {cfg.model} {how} in {time.perf_counter() - t0:.1f}s; task {task.name} ({task.kind}, "
        f"{len(task.train)} train / {len(task.eval)} eval examples)"
    )
    return model, tok, task


def loads_sharded(cfg: FinetuneConfig, state: Any) -> bool:
    """Whether this run builds its model without the base's weights and lets each process read only
    its own shards of them (:mod:`neurontune.sharded`): under FSDP2 or DeepSpeed ZeRO-3 on several
    processes, for a model directory (or the bundled model) and a method whose adapter needs nothing of
    the base to start (rows with spec= or a scorer that leaves the weights alone, LoRA, full). Otherwise every
    process loads the whole base before it is sharded, and the main process says why."""
    from neurontune.models import TINY_MODELS

    if not ((launched_with("FSDP") or launched_zero_stage() == 3) and state.num_processes > 1):
        return False
    method = get_method(cfg.method)(cfg)
    why = None if method.trains else "it does not train"
    why = why or method.sharded_load_refused()
    if why is None and cfg.model in TINY_MODELS:
        why = f"{cfg.model} is built in memory, not read from a checkpoint"
    elif why is None and cfg.save_merged:
        why = "save_merged merges the adapter into the whole base"
    if why:
        state.print(f"note: every process loads the whole base before it is sharded: {why}")
    return why is None


def run_select(cfg: SelectConfig) -> NeuronSpec:
    from neurontune.selection import save_selection, scores_path, select_neurons

    state = process_state()
    for path in (cfg.output, scores_path(cfg.output)):  # before minutes of scoring; again when written
        refuse_existing(path, cfg.overwrite)
    torch.manual_seed(cfg.seed)
    model, tok, task = _load(cfg)
    cfg = with_max_length(cfg, task.train[: cfg.calib_examples], tok, model, state.is_main_process)
    # under N processes, additive scorers split the calibration data (neurontune.scoring); rank 0 writes
    spec, scores = select_neurons(cfg, model, tok, task, verbose=state.is_main_process)
    spec.provenance["config"] = dataclasses.asdict(cfg)
    if state.is_main_process:
        save_selection(spec, scores, cfg.output, replace=cfg.overwrite)
        print(f"wrote {cfg.output}")
    state.wait_for_everyone()
    return spec


# ---- adapters: load any kind -----------------------------------------------------------------------
def load_adapted(
    adapter: str | None, model_name: str | None = None, dtype: str = "auto", is_trainable: bool = False,
    quantization: str | None = None,
) -> tuple[torch.nn.Module, Any, str]:  # fmt: skip
    """``(model, tokenizer, kind)`` for a plain model or any method's saved adapter (``kind`` is the
    method that loads it, or ``"plain"``). The base model comes from ``model_name`` or else from the
    adapter's config, loaded with ``quantization`` (``None``: as the adapter records, else unquantized).
    Only JSON and safetensors files are read."""
    if adapter is None:
        model, tok = load_model(
            model_name or DEFAULT_MODEL, dtype=dtype, device=device(), quantization=quantization
        )
        return model, tok, "plain"
    return load_output(adapter, model_name, dtype, is_trainable, quantization)


# ---- finetune --------------------------------------------------------------------------------------
RUN_OUTPUTS = (
    "config.json",
    "checkpoints",
    "train_log.csv",
    "eval_log.json",
    "metrics.json",
    "report.md",
    "report.html",
    "logs",
)


def data_fingerprint(cfg: DataConfig) -> dict[str, Any] | None:
    """Size and SHA-256 of the data files a run reads (``None`` for a built-in task), so that a resume
    on changed data is refused."""
    import hashlib

    sources = [Path(f) for f in (cfg.task, cfg.eval_file) if f and Path(f).exists()]
    if not sources:
        return None
    out = {}
    for src in sources:  # a file, or a datasets directory (every file in it)
        h, size = hashlib.sha256(), 0
        for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if f.is_file():
                h.update(str(f.relative_to(src) if src.is_dir() else f.name).encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
                size += f.stat().st_size
        out[str(src)] = {"bytes": size, "sha256": h.hexdigest()}
    return out


def run_outputs(cfg: FinetuneConfig | None = None) -> set[str]:
    """The names a finetune run with ``cfg`` writes in its output_dir (``None``: any run may write)."""
    from neurontune.methods import registry

    if cfg is None:
        return set(RUN_OUTPUTS).union(*(m.outputs for m in registry().values()))
    method = get_method(cfg.method)
    names = {"config.json", "metrics.json", "report.md", "report.html", *method.written_outputs(cfg)}
    if method.trains:
        names |= {"checkpoints", "train_log.csv"}
    if cfg.eval_steps:
        names.add("eval_log.json")
    if cfg.report_to != "none":
        names.add("logs")
    return names


def model_fingerprint(model: str) -> dict[str, Any] | None:
    """For a local model directory, what identifies its weights without reading them all: per file its
    size, and for safetensors the SHA-256 of its header (names, dtypes, shapes, offsets) and of 16 blocks
    of 4 KiB spread over the data; ``None`` for a built-in or Hub model. A resume on changed weights is
    refused with it."""
    import hashlib
    import struct

    root = Path(model)
    if not root.is_dir():
        return None
    out = {}
    for f in sorted(root.iterdir()):
        if not f.is_file() or not f.name.endswith((".safetensors", ".json", ".bin", ".gguf")):
            continue
        h, size = hashlib.sha256(), f.stat().st_size
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors" and size >= 8:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(min(n, 100 << 20)))
                start = 8 + n
            elif f.suffix == ".json":
                h.update(fh.read(1 << 20))
                start = size
            else:
                start = 0
            for i in range(16) if size > start else ():
                fh.seek(start + (size - start) * i // 16)
                h.update(fh.read(4096))
        out[f.name] = {"bytes": size, "sha256": h.hexdigest()}
    return out


def _check_output_dir(cfg: FinetuneConfig, out: Path, fingerprint: dict[str, Any] | None) -> list[str] | None:
    """Refuse a directory that is not a run's, and to clobber a run; on resume, refuse a config or data
    (``fingerprint``, from :func:`data_fingerprint`) that would change the trajectory. Returns the names
    the run already there wrote (its manifest; ``None``: a new or empty directory)."""
    from neurontune.rundir import check_run_dir

    saved = out / "config.json"
    listed = check_run_dir(out, run_outputs(cfg), run_outputs())
    if cfg.resume:
        if listed is None or not saved.is_file():
            raise NeurontuneError(f"nothing to resume: {out} has no config.json from an earlier run")
        old = read_json(saved, "run config")
        new = dataclasses.asdict(cfg)
        # an option newer than the run's version had its default then
        defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
        diff = [
            f"{k}: {old.get(k, defaults.get(k))!r} -> {v!r}"
            for k, v in new.items()
            if k not in FinetuneConfig.RESUME_FREE and old.get(k, defaults.get(k)) != v
        ]
        if diff:
            raise NeurontuneError(
                f"cannot resume {out}: the config differs from the run's ({'; '.join(diff)})"
            )
        if old.get("model_fingerprint") != model_fingerprint(cfg.model) and "model_fingerprint" in old:
            raise NeurontuneError(
                f"cannot resume {out}: the base model {cfg.model} changed since the run started (its weight "
                "files differ); resuming would train one adapter on two bases. Start again with --overwrite"
            )
        if "data_fingerprint" not in old:
            print(
                f"warning: {out} was started by an older neurontune that did not record its data; not checked"
            )
        elif old["data_fingerprint"] != fingerprint:
            changed = sorted(set(fingerprint or {}) | set(old.get("data_fingerprint") or {}))
            raise NeurontuneError(
                f"cannot resume {out}: the data changed since the run started ({', '.join(changed)}); "
                "resuming would mix two datasets. Start again with --overwrite"
            )
    elif listed is not None and (saved.is_file() or list_checkpoints(out)) and not cfg.overwrite:
        raise NeurontuneError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    return listed


def _on_all_processes(state: Any, error: str | None) -> None:
    """Raise the main process's ``error`` (or nothing) on every process (:func:`share_outcome`)."""
    if error := _share_outcome(state, error):
        raise NeurontuneError(error)


def _fmt_metrics(m: dict[str, Any]) -> str:
    keys = ("accuracy", "exact_match", "bleu", "chrf", "rougeL", "perplexity", "forgetting_ppl")
    return ", ".join(f"{k} {m[k]:.3f}" if k == "accuracy" else f"{k} {m[k]:.2f}" for k in keys if k in m)


def validation_split(cfg: FinetuneConfig, task: Task) -> tuple[Task, list[Example]]:
    """``(task, held out)``: for early stopping, the examples its validation loss is measured on, the last
    ``eval_fraction`` of the training examples (which training then leaves out), or with
    ``eval_split=validation`` the evaluation set, which is already that; none without early stopping."""
    if cfg.metric_for_best_model not in ("loss", *(known := task_metrics(task))):
        raise NeurontuneError(
            f"metric_for_best_model={cfg.metric_for_best_model}: task {task.name} ({task.kind}) is measured by "
            f"{', '.join(known)} (or loss, the validation loss)"
        )
    if not cfg.early_stopping_patience:
        return task, []
    if cfg.eval_split == "validation":
        return task, list(task.eval)
    split = task.validation(cfg.eval_fraction)
    return dataclasses.replace(task, train=split.train), list(split.eval)


def training_steps(cfg: FinetuneConfig, n_train: int, processes: int, verbose: bool = True) -> int:
    """``steps`` where given (as the HF Trainer's ``max_steps`` replaces ``num_train_epochs``), else the
    optimizer steps that ``num_train_epochs`` passes over ``n_train`` examples take (full micro-batches
    of ``batch_size``, ``grad_accum`` x ``processes`` a step)."""
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.grad_accum * processes
    micro = n_train // min(cfg.batch_size, n_train)  # StepBatches drops an incomplete last batch
    steps = max(1, math.ceil(cfg.num_train_epochs * micro / per_step))
    if verbose:
        print(
            f"num_train_epochs={cfg.num_train_epochs:g}: {steps} steps ({n_train} training examples, "
            f"{micro} micro-batches of {min(cfg.batch_size, n_train)} an epoch, {per_step} a step)"
        )
    return steps


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """The main job. Writes to ``cfg.output_dir``: ``config.json``, ``checkpoints/``,
    ``train_log.csv``, the method's output (``adapter/``, ``model/`` or ``pruned/``, and for row
    selections ``neuron_spec.json``), ``metrics.json``, ``report.md`` and ``report.html``.
    """
    from neurontune.rundir import run_lock

    out = Path(cfg.output_dir)
    if bad := next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None):
        raise NeurontuneError(f"output_dir {out}: {bad} exists and is not a directory")
    state = process_state()  # under torchrun / accelerate launch: N processes, rank 0 writes everything
    with contextlib.ExitStack() as stack:
        error = None
        if state.is_main_process:  # one run per directory, held until the run returns
            try:
                stack.enter_context(run_lock(out))
            except NeurontuneError as e:
                error = str(e)
        _on_all_processes(state, error)
        return _finetune(cfg, out, state)


def _finetune(cfg: FinetuneConfig, out: Path, state: Any) -> dict[str, Any]:
    from neurontune.rundir import clear_run, finished_outputs, write_manifest

    main = state.is_main_process
    if n := asked_processes_not_started():
        print(
            f"warning: accelerate launch --cpu started 1 process, not the {n} asked for (its --cpu launcher "
            f"runs one); for {n} CPU processes use torchrun --nproc-per-node {n} -m neurontune.cli finetune ..."
        )
    if launched_with("FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise NeurontuneError(
            f"accelerate's config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; neurontune shards "
            "with FSDP2 (fully_shard) only: set fsdp_version: 2 (examples/accelerate/fsdp2.yaml)"
        )
    if cfg.ema_decay and (launched_with("FSDP") or launched_with("DEEPSPEED")):  # before the model loads
        raise NeurontuneError(EMA_SHARDED)
    fingerprint = data_fingerprint(cfg)  # hashed once: the resume check and config.json share it
    listed = _check_output_dir(cfg, out, fingerprint)
    # the names this run claims in its manifest (a resumed run keeps those of the run it continues)
    claimed = run_outputs(cfg) | set(listed or [] if cfg.resume else [])
    torch.manual_seed(cfg.seed)
    from neurontune.sharded import weight_source

    sharded = loads_sharded(cfg, state)
    model, tok, task = _load(cfg, sharded)  # data problems surface here, before anything is written
    if sharded and (missing := weight_source(model).missing(model)):
        state.print(
            f"note: every process loads the whole base before it is sharded: {len(missing)} of its tensors "
            f"are stored under other names (e.g. {missing[0]})"
        )
        sharded = False
        model, tok, task = _load(cfg)
    task = task.head(cfg.train_examples, cfg.eval_examples)
    task, held_out = validation_split(cfg, task)
    given, cfg = cfg, with_max_length(cfg, task.train + task.eval + held_out, tok, model, verbose=main)
    kind = get_method(cfg.method)
    cfg.steps = training_steps(given, len(task.train), state.num_processes, verbose=main and kind.trains)
    method = kind(cfg)
    method.validation = held_out
    method.check(model, out)  # bad method input fails here, before anything is written
    if cfg.eval_steps and method.trains and (launched_with("FSDP") or launched_with("DEEPSPEED")):
        raise NeurontuneError(
            "eval_steps: the model is sharded during FSDP/DeepSpeed training, so the main process "
            "cannot evaluate it alone; use eval_steps=0 (it is evaluated after training)"
        )
    forget = general_text(cfg.forgetting_examples) if cfg.forgetting_examples else []
    state.wait_for_everyone()  # every process has checked the directory before the first write
    if main and cfg.resume:
        if not claimed <= set(listed or []):  # e.g. eval_steps or report_to added on resume
            write_manifest(out, claimed)
    elif main:  # a resumed run keeps the config.json it started with
        if listed is not None:  # --overwrite, or a run that ended before training: exactly its files go
            clear_run(out, listed)
        write_manifest(out, claimed)  # the claim comes before anything it names
        write_json(
            out / "config.json",
            {
                **dataclasses.asdict(given),
                "data_fingerprint": fingerprint,
                "model_fingerprint": model_fingerprint(cfg.model),
                "neurontune_version": __version__,
            },
        )

    def run_eval(m: torch.nn.Module) -> dict[str, Any]:
        from neurontune.sharded import release_gathered

        try:
            return evaluate(
                m,
                tok,
                task,
                max_length=cfg.max_length,
                batch_size=cfg.eval_batch_size,
                general_text=forget,
                general_length=forgetting_length(given),
            )
        finally:  # FSDP2, ZeRO-3: nothing stays gathered (or in flight) after a forward-only pass
            release_gathered(m)

    from neurontune.tracking import Trackers

    # the trackers are closed (their files flushed) however the run ends
    with Trackers(cfg.report_to if main else "none", out, dataclasses.asdict(cfg)) as trackers:
        before = run_eval(model) if main and not sharded and (cfg.eval_before or not method.trains) else None
        if before:
            trackers.log(before, 0, "eval_before/")
        if cfg.quantization != "none" and method.trains:
            import warnings

            from peft import prepare_model_for_kbit_training

            # QLoRA's preparation (what PEFT users do): the base frozen, the non-quantized parameters in fp32;
            # gradient checkpointing is train()'s to switch on
            with warnings.catch_warnings():  # peft 0.17+ asks a deprecated transformers property
                warnings.simplefilter("ignore", FutureWarning)
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = method.build(model, tok, task, out)
        loading = None
        zero3 = sharded and not launched_with("FSDP")  # ZeRO-3 partitions it in train(), then it is read

        def evaluate_before(m: torch.nn.Module) -> None:  # sharded: every process, with the others
            nonlocal before
            if cfg.eval_before:  # the adapter starts as the identity (rows: zero deltas; LoRA: B = 0)
                before = run_eval(m)
                if main:
                    trackers.log(before, 0, "eval_before/")

        def filled(m: torch.nn.Module) -> None:  # ZeRO-3: what each process read, then the evaluation
            nonlocal loading
            source = weight_source(m)
            loading = _reading_record(source, dict(source.filled), "ZeRO-3", state)
            evaluate_before(m)

        if sharded and not zero3:  # every process takes its shards and reads them
            model, loading = _shard_and_read(model, cfg, state)
            evaluate_before(model)
        trainable, total = count_parameters(model)
        if main:
            print(describe_parameters(model))
        log: list[dict[str, float]] = []
        curve = EvalCurve(out / "eval_log.json", primary_metric(task)) if main else None

        def on_step(
            row: dict[str, float],
        ) -> dict[str, float] | None:  # the main process, after each optimizer step
            step = int(row["step"])
            trackers.log({k: v for k, v in row.items() if k != "step"}, step, "train/")
            if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.steps and curve is not None:
                trackers.log(curve.add(step, run_eval(model)), step, "eval/")
                model.train()
            if validates and (val := stopper.on_step(row)):  # early stopping's measurement
                trackers.log(val, step, "eval/")
                return val
            return None

        # a method that trains all its steps keeps the best of its candidate steps (gates: those at their
        # target), or none (the held-out examples are then its own, e.g. the gates' recovery's)
        candidates = None if method.stops_early or not held_out else method.best_candidates(model)
        validates = bool(held_out) and (method.stops_early or candidates is not None)
        stopper = EarlyStopping(
            cfg, model, out / "checkpoints" / "best.safetensors", held_out, tok, candidates=candidates,
            what="early stopping" if candidates is None else f"{cfg.method}: best step", task=task,
        )  # fmt: skip

        if method.trains:
            args = train_args(cfg)
            data = StepBatches(method.training_examples(task), tok, cfg.batch_size, cfg.max_length, cfg.seed)
            log = train(
                model, data, args, out, resume=cfg.resume, param_groups=method.param_groups(model, cfg.lr),
                regularization=method.regularization(model), step_stats=method.step_stats(model),
                on_step=on_step, on_prepared=filled if zero3 else None,
                stop_when=stopper.watch if validates else None, **method.training_loss(model),
            )  # fmt: skip
            if validates:
                stopper.restore_best(log, cfg.steps, state)
        peak, peak_kind = peak_memory_mib()  # through loading, selection and training (not the final eval)
        if sharded:  # the model stays sharded: every process evaluates it and gathers the adapter (only;
            # method=full: every process gathers the model a parameter at a time, the main one writes it)
            after = run_eval(model)
            method.gather_sharded(model, tok, out)
        if not main:  # evaluation, the method's output and every report: the main process alone
            if method.finishes_on_every_process():  # a finish that trains again (gates' distillation)
                try:
                    method.finish(model, tok, out, lambda _model: {}, None)
                except MainProcessError:
                    raise  # the main process's failure, already taken from it
                except BaseException:
                    _share_outcome(state, None)  # take the main process's outcome, as below, then stop
                    raise
            if error := _share_outcome(state, None):  # waits for it; its failure stops this process too
                raise MainProcessError(f"the main process failed after training: {error}")
            return {}
        try:
            if not sharded:
                after = run_eval(model) if method.trains else before
            trained = after  # finish may make another model of it (gates: the export, the recovery)
            model, after = method.finish(model, tok, out, run_eval, after)
            saved = method.save(model, tok, out)
            metric = primary_metric(task)
            train_seconds = sum(r["seconds"] for r in log)
            metrics = {
                "method": cfg.method,
                "scorer": None,
                "task": task.name,
                "task_kind": task.kind,
                "model": cfg.model,
                "primary_metric": metric,
                "before": before,
                "after": after,
                "trainable_params": trainable,
                "total_params": total,
                "steps": len(log),
                "first_loss": log[0]["loss"] if log else None,
                "last_loss": log[-1]["loss"] if log else None,
                "train_seconds": train_seconds,
                "tokens_per_second": sum(r["tokens"] for r in log) / train_seconds if train_seconds else None,
                "precision": mixed_precision(cfg.precision) if method.trains else None,
                "max_length": cfg.max_length,
                "num_processes": state.num_processes,
                "quantization": cfg.quantization,
                "peak_memory_mib": peak,
                "peak_memory_kind": peak_kind,
                "sharded_load": loading,
                "early_stopping": stopper.summary(log) if validates else None,
                "saved": str(saved) if saved else None,
                "saved_bytes": dir_bytes(saved) if saved else 0,
                "device": device(),
                "command": " ".join(sys.argv),
                **method.metrics(),
            }
            trackers.log(after, len(log), "eval/")
            # the curve's last point: the last step's weights, where they are the trained result (early
            # stopping's earlier best step was measured on the curve at its own step)
            last_kept = not validates or metrics["early_stopping"]["best_step"] in (None, len(log))
            if cfg.eval_steps and curve is not None and log and last_kept:
                curve.add(len(log), trained)
            write_json(out / "metrics.json", metrics)
            write_report(out / "report.md", cfg, metrics, method.report_rows(metrics))
            from neurontune.analysis import run_report

            run_report(out, metrics, getattr(method, "spec", None))
            write_manifest(out, finished_outputs(out, claimed))  # what the run wrote, of what it claimed
            summary = (
                f"{metric} {before[metric]:.3f} -> {after[metric]:.3f}"
                if before
                else f"{metric} {after[metric]:.3f}"
            )
            print(
                f"{summary} on {len(task.eval)} {eval_source(cfg, task)} eval examples ({_fmt_metrics(after)}); "
                f"wrote {out}/"
            )
        except BaseException as e:
            _share_outcome(state, f"{type(e).__name__}: {e}".splitlines()[0] or type(e).__name__)
            raise
        _share_outcome(state, None)
        return metrics


def _shard_and_read(model: torch.nn.Module, cfg: FinetuneConfig, state: Any) -> tuple[torch.nn.Module, dict]:
    """FSDP2-shard a model built without its base weights and fill each process's shards from the
    checkpoint; returns it and, per process, what it read (``{"processes": [{"tensors", "bytes_read",
    "largest_local_bytes"}, ...], "checkpoint_bytes": ...}``)."""
    from neurontune.sharded import shard_and_fill, weight_source

    source = weight_source(model)
    t0 = time.perf_counter()
    model, read = shard_and_fill(model, lambda m: shard_model(m, train_args(cfg)), launched_min_num_params())
    read["seconds"] = round(time.perf_counter() - t0, 3)
    return model, _reading_record(source, read, "FSDP2", state)


def _reading_record(source: Any, read: dict, how: str, state: Any) -> dict:
    """Every process's ``read`` record (a collective), printed by the main process, for metrics.json."""
    from accelerate.utils import gather_object

    per_process = gather_object([read])
    total = sum(f.stat().st_size for f in set(source.files.values()))
    state.print(
        f"{how} sharded load: each of {state.num_processes} processes read "
        f"{max(r['bytes_read'] for r in per_process) / 2**20:,.0f} MiB of the {total / 2**20:,.0f} MiB checkpoint"
    )
    return {"processes": per_process, "checkpoint_bytes": total}


def write_report(
    path: Path, cfg: FinetuneConfig, m: dict[str, Any], extra: list[tuple[str, str]] = ()
) -> None:
    """``report.md``: the run in a table, ``extra`` rows from the method, the metrics, sample outputs."""
    fields = [
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
    fields += list(extra)
    lines = [f"# neurontune run: {cfg.output_dir}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in fields]
    lines += ["", "| metric | before | after |", "|---|---|---|"]
    for k in metric_names(m["after"]):
        b = m["before"].get(k) if m["before"] else None
        lines.append(f"| {k} | {'-' if b is None else f'{b:.4g}'} | {m['after'][k]:.4g} |")
    for s in m["after"].get("samples", []):
        lines += ["", f"- prompt: `{s['prompt'][-80:]!r}`", f"  - prediction: `{s['prediction']!r}`"]
        lines.append(f"  - reference: `{s['reference']!r}`")
    lines += ["", f"Evaluated on {m['after'].get('eval_examples', '?')} examples in "
              f"{m['after'].get('eval_seconds', 0):.1f} s."]  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- eval / merge ----------------------------------------------------------------------------------
def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.lm_eval_include and not Path(cfg.lm_eval_include).is_dir():
        raise NeurontuneError(f"lm_eval_include {cfg.lm_eval_include}: not a directory")
    if cfg.output:
        refuse_existing(cfg.output, cfg.overwrite)
    model, tok, kind = load_adapted(cfg.adapter, cfg.model, cfg.dtype, quantization=cfg.quantization)
    metrics: dict[str, Any] = {"adapter": cfg.adapter, "adapter_kind": kind}
    if cfg.task != "none":
        task = task_from_config(cfg, tok).head(None, cfg.eval_examples)
        given, cfg = cfg, with_max_length(cfg, task.eval, tok, model)
        forget = general_text(cfg.forgetting_examples) if cfg.forgetting_examples else []
        metrics.update(task=task.name, **evaluate(
            model, tok, task, max_length=cfg.max_length, batch_size=cfg.eval_batch_size, general_text=forget,
            general_length=forgetting_length(given),
        ))  # fmt: skip
        print(f"{eval_source(cfg, task)}: {_fmt_metrics(metrics)} on {len(task.eval)} examples")
    if cfg.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(model, tok, cfg)
    if cfg.output:
        write_json(cfg.output, metrics, replace=cfg.overwrite)
    return metrics


def run_lm_eval(model: torch.nn.Module, tok: Any, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """lm-evaluation-harness tasks on the (adapted) model, through its ``HFLM`` wrapper; returns
    ``{task: {metric: value}}`` as lm-eval reports it, and prints one line per task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=cfg.lm_eval_include) if cfg.lm_eval_include else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {cfg.lm_eval_include}" if cfg.lm_eval_include else ""
        raise NeurontuneError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}{where}; `lm-eval ls tasks` lists them, "
            "lm_eval_include=DIR adds your own YAMLs"
        )
    # adapters inject their layers into the base model in place, so the base model is the adapted one
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = HFLM(pretrained=base, tokenizer=tok, batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    try:
        out = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=cfg.lm_eval_limit,
            num_fewshot=cfg.lm_eval_fewshot, log_samples=False, random_seed=cfg.seed,
        )  # fmt: skip
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise NeurontuneError(f"lm-eval tasks {tasks}: {e}") from None
    results = {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}
    for t, r in results.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float) and "stderr" not in k)
        print(f"lm-eval {t}: {shown}")
    return results


def run_merge(cfg: MergeConfig) -> Path:
    target = Path(cfg.output)
    if target.resolve() == Path(cfg.adapter).resolve() or Path(cfg.adapter).resolve().is_relative_to(
        target.resolve()
    ):
        raise NeurontuneError(f"--output {target} would replace the adapter {cfg.adapter} itself")
    refuse_existing(target, cfg.overwrite)
    # the base in its checkpoint's dtype (fp32 when fp32 is asked for): a row delta is added to it in fp32
    # and rounded once, so merging an fp32 checkpoint and casting gives what merging in fp32 did
    load = "float32" if cfg.dtype == "float32" else "checkpoint"
    model, tok, kind = load_adapted(cfg.adapter, cfg.model, load, quantization=cfg.quantization)
    if not hasattr(model, "merge_and_unload"):
        raise NeurontuneError(
            f"{cfg.adapter} is a whole model (a full fine-tune, or a merged or pruned export), not an adapter: "
            f"there is nothing to merge; use it as it is (model={cfg.adapter})"
        )
    quantized = model_quantization(model)
    if hasattr(model, "peft_config"):  # a PEFT adapter (row adapters refuse tied modules when trained)
        from neurontune.methods.peft_methods import merge_untied

        merged = merge_untied(model)
    else:
        merged = model.merge_and_unload()
    if cfg.dtype != "auto":
        merged = merged.to(resolve_dtype(cfg.dtype))
    save_pretrained_atomic(cfg.output, merged, tok, replace=cfg.overwrite)
    dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    how = f", dequantized from its {quantized} base" if quantized != "none" else ""
    print(
        f"merged the {kind} adapter {cfg.adapter} into {cfg.output} in {dtype}{how} ({describe_parameters(merged)})"
    )
    return Path(cfg.output)
