"""Typed run configurations, turned into command-line flags (one source of truth for names, types, help)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from neurontune.errors import NeurontuneError


@dataclass
class FinetuneConfig:
    """`neurontune finetune`: select neurons, train only those rows, evaluate, save the adapter."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "model: smollm2-135m (bundled), tiny-llama, tiny-gpt2, a local dir or Hub id"},
    )
    dtype: str = field(
        default="float32", metadata={"help": "dtype of the frozen base (float32, bfloat16, float16)"}
    )
    task: str = field(default="rotten_tomatoes", metadata={"help": "built-in task: rotten_tomatoes or imdb"})
    train_examples: int = field(
        default=2000, metadata={"help": "training examples drawn from the task's train split"}
    )
    eval_examples: int = field(default=200, metadata={"help": "test examples used for accuracy"})
    scorer: str = field(default="magnitude", metadata={"help": "row scorer: magnitude or random"})
    target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear', comma-separated suffixes (q_proj,v_proj) or a regex"},
    )
    rows_per_module: int | None = field(default=None, metadata={"help": "budget: top-k rows per module"})
    match_lora_rank: int | None = field(
        default=8, metadata={"help": "budget: as many trainable params as LoRA rank r"}
    )
    impl: str = field(default="fused", metadata={"help": "row-delta formulation: fused or index_add"})
    steps: int = field(default=40, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch size"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (acts on the deltas only)"}
    )
    max_length: int = field(
        default=128, metadata={"help": "max tokens per example (prompt is truncated first)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for data order, random scores and init"})
    output_dir: str = field(
        default="runs/finetune", metadata={"help": "where the spec, adapter and metrics go"}
    )
    save_merged: bool = field(
        default=False, metadata={"help": "also write a merged plain transformers model"}
    )

    def __post_init__(self) -> None:
        if (self.rows_per_module is None) == (self.match_lora_rank is None):
            raise NeurontuneError(
                "set exactly one budget: rows_per_module=K or match_lora_rank=R (the other =none)"
            )
        for name in ("train_examples", "eval_examples", "steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise NeurontuneError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise NeurontuneError(f"lr must be positive, got {self.lr}")

    def target_modules_value(self) -> str | list[str]:
        t = self.target_modules
        if t == "all-linear" or any(ch in t for ch in "*()[]\\|^$+?"):
            return t
        return [s.strip() for s in t.split(",") if s.strip()]


def _field_type(cls: type, f: dataclasses.Field) -> type:
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _parse_value(name: str, raw: str, typ: type) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise NeurontuneError(f"{name}={raw!r}: expected {typ.__name__}") from None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_field_type(cls, f).__name__.upper(),
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )


def config_from_args(cls: type, ns: argparse.Namespace, overrides: list[str]) -> Any:
    """Build ``cls`` from ``--flag value`` options plus ``key=value`` overrides; typos get a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, f in fields.items():
        raw = getattr(ns, name, None)
        if raw is not None:
            values[name] = _parse_value(name, raw, _field_type(cls, f))
    for item in overrides:
        if "=" not in item:
            raise NeurontuneError(f"unexpected argument {item!r}; overrides look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NeurontuneError(f"unknown config key {key!r}{hint}")
        values[key] = _parse_value(key, raw, _field_type(cls, fields[key]))
    return cls(**values)
