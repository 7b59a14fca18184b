"""The ``neurontune`` command line. Thin: every step lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from neurontune import __version__
from neurontune.config import FinetuneConfig, add_dataclass_args, config_from_args
from neurontune.errors import NeurontuneError


def cmd_finetune(cfg: FinetuneConfig) -> dict:
    import torch

    from neurontune.data import load_movie_reviews
    from neurontune.io import write_json
    from neurontune.models import load_model
    from neurontune.rowtune import RowTuneConfig, get_rowtune_model
    from neurontune.selection import score_model, select_rows
    from neurontune.tasks import batches, sentiment_accuracy, sentiment_examples
    from neurontune.train import train_steps

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"neurontune_version": __version__, **dataclasses.asdict(cfg)})
    torch.manual_seed(cfg.seed)

    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    data = load_movie_reviews(cfg.task, seed=cfg.seed)
    train_rows = data["train"].select(range(min(cfg.train_examples, len(data["train"]))))
    test_rows = data["test"].select(range(min(cfg.eval_examples, len(data["test"])))).to_list()
    print(
        f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s; task {cfg.task}: "
        f"{len(train_rows)} train / {len(test_rows)} eval examples"
    )

    scores = score_model(model, cfg.scorer, cfg.target_modules_value(), seed=cfg.seed)
    spec = select_rows(
        model,
        scores,
        rows_per_module=cfg.rows_per_module,
        match_lora_rank=cfg.match_lora_rank,
        provenance={"scorer": cfg.scorer, "base_model": cfg.model, "seed": cfg.seed, "task": cfg.task},
    )
    spec.save(out / "neuron_spec.json")
    if "lora_params" in spec.provenance:
        print(
            f"budget: {spec.num_params():,} row params vs {spec.provenance['lora_params']:,} for LoRA r={cfg.match_lora_rank}"
        )

    acc_before = sentiment_accuracy(model, tok, test_rows)
    model = get_rowtune_model(
        model, spec, RowTuneConfig(target_modules=cfg.target_modules_value(), impl=cfg.impl)
    )
    model.print_trainable_parameters()
    log = train_steps(
        model,
        batches(sentiment_examples(train_rows.to_list()), tok, cfg.batch_size, cfg.max_length, cfg.seed),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neurontune", description="Neuron-level sparse fine-tuning of LLMs.")
    p.add_argument("--version", action="version", version=f"neurontune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help=FinetuneConfig.__doc__.splitlines()[0])
    add_dataclass_args(ft, FinetuneConfig)
    ft.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 scorer=random")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "finetune":
            cfg = config_from_args(FinetuneConfig, ns, ns.overrides)
            cmd_finetune(cfg)
    except NeurontuneError as e:
        print(f"neurontune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurontune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
