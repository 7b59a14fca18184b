"""Typed run configurations, turned into command-line flags (one source of truth for names, types, help)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from neurontune.errors import NeurontuneError


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SelectConfig:
    """`neurontune select`: score every target row on calibration data and write a NeuronSpec."""

    model: str = _opt(
        "smollm2-135m", "model: smollm2-135m (bundled), tiny-llama, tiny-gpt2, a local dir or Hub id"
    )
    dtype: str = _opt("float32", "dtype of the frozen base (float32, bfloat16, float16)")
    task: str = _opt("rotten_tomatoes", "built-in task: rotten_tomatoes or imdb")
    seed: int = _opt(0, "seed for data order, random scores, tie-breaking")
    max_length: int = _opt(128, "max tokens per example (the prompt is truncated first)")
    scorer: str = _opt(
        "magnitude", "scorer: magnitude, taylor, fisher, zo-taylor, wanda, activation, neft, random"
    )
    scorer_options: str = _opt(
        "", "scorer options as k=v,k=v (p=2 | mode=frequency | probe_steps=50,probe_lr=1e-4 | samples=8)"
    )
    target_modules: str = _opt(
        "all-linear", "'all-linear', comma-separated suffixes (q_proj,v_proj) or a regex"
    )
    exclude_modules: str | None = _opt(None, "comma-separated suffixes or a regex to leave out")
    budget: str = _opt(
        "lora:8", "rows:K per module | ratio:P of all rows | lora:R (as many params as LoRA rank R)"
    )
    per_layer: bool = _opt(False, "with ratio: P of each module instead of a global top-P")
    order: str = _opt("highest", "keep the highest or lowest scores")
    min_per_module: int = _opt(0, "at least this many rows in every module")
    calib_examples: int = _opt(64, "calibration examples (from the train split) for data-driven scorers")
    calib_batch_size: int = _opt(8, "calibration batch size")
    output: str = _opt("neuron_spec.json", "where to write the spec (select only)")

    _positive: typing.ClassVar[tuple[str, ...]] = ("calib_examples", "calib_batch_size", "max_length")

    def __post_init__(self) -> None:
        self.budget_kwargs()  # validate early
        for name in self._positive:
            if getattr(self, name) <= 0:
                raise NeurontuneError(f"{name} must be positive, got {getattr(self, name)}")
        if self.order not in ("highest", "lowest"):
            raise NeurontuneError(f"order must be 'highest' or 'lowest', got {self.order!r}")

    def budget_kwargs(self) -> dict[str, Any]:
        kind, _, value = self.budget.partition(":")
        kinds = {
            "rows": ("rows_per_module", int),
            "ratio": ("ratio", float),
            "lora": ("match_lora_rank", int),
        }
        if kind not in kinds or not value:
            raise NeurontuneError(f"budget {self.budget!r}: expected rows:K, ratio:P or lora:R")
        key, typ = kinds[kind]
        try:
            return {key: typ(value)}
        except ValueError:
            what = "an integer" if typ is int else "a number"
            raise NeurontuneError(f"budget {self.budget!r}: {value!r} is not {what}") from None

    def scorer_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in self.scorer_options.split(","))):
            key, eq, raw = item.partition("=")
            if not eq:
                raise NeurontuneError(f"scorer_options item {item!r}: expected key=value")
            for typ in (int, float):
                try:
                    out[key.strip()] = typ(raw)
                    break
                except ValueError:
                    continue
            else:
                out[key.strip()] = {"true": True, "false": False}.get(raw.lower(), raw)
        return out

    @staticmethod
    def _modules(t: str | None) -> str | list[str] | None:
        if t is None or t == "all-linear" or any(ch in t for ch in "*()[]\\|^$+?"):
            return t
        return [s.strip() for s in t.split(",") if s.strip()]

    def target_modules_value(self) -> str | list[str]:
        return self._modules(self.target_modules)

    def exclude_modules_value(self) -> str | list[str] | None:
        return self._modules(self.exclude_modules)


@dataclass
class FinetuneConfig(SelectConfig):
    """`neurontune finetune`: select neurons, train only those rows, evaluate, save the adapter."""

    train_examples: int = _opt(2000, "training examples drawn from the task's train split")
    eval_examples: int = _opt(200, "test examples used for accuracy")
    impl: str = _opt("fused", "row-delta formulation: fused or index_add")
    steps: int = _opt(40, "optimizer steps")
    batch_size: int = _opt(8, "micro-batch size")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-4, "AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay (acts on the deltas only)")
    output_dir: str = _opt("runs/finetune", "where the spec, adapter and metrics go")
    save_merged: bool = _opt(False, "also write a merged plain transformers model")

    _positive = (
        *SelectConfig._positive,
        "train_examples",
        "eval_examples",
        "steps",
        "batch_size",
        "grad_accum",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise NeurontuneError(f"lr must be positive, got {self.lr}")


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
