"""The jobs behind the CLI commands, as library functions: ``select_neurons`` and ``finetune``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from neurontune import __version__
from neurontune.config import FinetuneConfig, SelectConfig
from neurontune.data import load_movie_reviews
from neurontune.io import write_json, write_safetensors
from neurontune.models import load_model
from neurontune.scoring import score_model
from neurontune.selection import select
from neurontune.spec import NeuronSpec
from neurontune.tasks import batches, fixed_batches, sentiment_accuracy, sentiment_examples


def select_neurons(
    cfg: SelectConfig, model: torch.nn.Module, tok: Any, train_rows: list[dict]
) -> tuple[NeuronSpec, dict[str, torch.Tensor]]:
    """Score the target rows of ``model`` on ``cfg.calib_examples`` training examples and apply the budget.

    Returns the spec and the raw scores (module name -> one score per row).
    """
    calib = fixed_batches(
        sentiment_examples(train_rows[: cfg.calib_examples]), tok, cfg.calib_batch_size, cfg.max_length
    )
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
            "calib_examples": min(cfg.calib_examples, len(train_rows)),
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


def save_selection(spec: NeuronSpec, scores: dict[str, torch.Tensor], path: str | Path) -> None:
    """``path`` gets the spec (JSON); ``<stem>.scores.safetensors`` beside it the raw scores."""
    path = Path(path)
    spec.save(path)
    write_safetensors(
        path.with_suffix(".scores.safetensors"), scores, {"scorer": str(spec.provenance.get("scorer"))}
    )


def _load(cfg: SelectConfig) -> tuple[torch.nn.Module, Any, Any]:
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    data = load_movie_reviews(cfg.task, seed=cfg.seed)
    print(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; task {cfg.task}")
    return model, tok, data


def run_select(cfg: SelectConfig) -> NeuronSpec:
    torch.manual_seed(cfg.seed)
    model, tok, data = _load(cfg)
    spec, scores = select_neurons(cfg, model, tok, data["train"].to_list())
    spec.provenance["config"] = dataclasses.asdict(cfg)
    save_selection(spec, scores, cfg.output)
    print(f"wrote {cfg.output}")
    return spec


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from neurontune.rowtune import RowTuneConfig, get_rowtune_model
    from neurontune.train import train_steps

    out = Path(cfg.output_dir)
    write_json(out / "config.json", {"neurontune_version": __version__, **dataclasses.asdict(cfg)})
    torch.manual_seed(cfg.seed)
    model, tok, data = _load(cfg)
    train_rows = data["train"].select(range(min(cfg.train_examples, len(data["train"])))).to_list()
    test_rows = data["test"].select(range(min(cfg.eval_examples, len(data["test"])))).to_list()
    print(f"{len(train_rows)} train / {len(test_rows)} eval examples")

    spec, scores = select_neurons(cfg, model, tok, train_rows)
    save_selection(spec, scores, out / "neuron_spec.json")
    acc_before = sentiment_accuracy(model, tok, test_rows)
    model = get_rowtune_model(
        model, spec, RowTuneConfig(target_modules=cfg.target_modules_value(), impl=cfg.impl)
    )
    model.print_trainable_parameters()
    log = train_steps(
        model,
        batches(sentiment_examples(train_rows), tok, cfg.batch_size, cfg.max_length, cfg.seed),
        cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_accum=cfg.grad_accum,
    )
    acc_after = sentiment_accuracy(model, tok, test_rows)
    model.save_pretrained(out / "adapter")
    trainable, total = model.get_nb_trainable_parameters()
    metrics = {
        "task": cfg.task,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "trainable_params": trainable,
        "total_params": total,
        "rows": spec.num_rows(),
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
        "train_seconds": sum(r["seconds"] for r in log),
        "train_log": log,
    }
    if cfg.save_merged:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tok.save_pretrained(out / "merged")
    write_json(out / "metrics.json", metrics)
    print(
        f"accuracy {acc_before:.3f} -> {acc_after:.3f} on {len(test_rows)} {cfg.task} test examples; "
        f"loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}; wrote {out}/"
    )
    return metrics
