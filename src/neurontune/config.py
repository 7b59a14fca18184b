"""Typed run configurations, turned into command-line flags (one source of truth for names, types, help)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

from neurontune.choices import DTYPES, QUANTIZATIONS, SCHEDULERS, check_warmup, parse_budget, scorer_names
from neurontune.errors import NeurontuneError
from neurontune.fields import GIVEN, choices_of, is_set
from neurontune.fields import opt as _opt
from neurontune.methods import get_method, method_names, option_classes, registry


@dataclass
class DataConfig:
    """Which task, and how its data is split and tokenised (shared by every command that reads data)."""

    task: str = _opt(
        "rotten_tomatoes",
        "built-in task (rotten_tomatoes, imdb; from BIG-bench's task files, where they are on this machine: "
        "multiemo, product_sentiment, e2e_nlg, arithmetic, hyperbaton, unit_identification, si_conversion, "
        "sports_understanding, vitaminc, past_tense, negation), a .json/.jsonl/.csv file, a datasets "
        "directory (save_to_disk) or a Hub dataset id",
    )
    eval_split: str = _opt(
        "test",
        "what evaluation reads: the task's test split, or a validation split (the last eval_fraction of the "
        "train split, which training then leaves out) for choosing settings without touching the test split",
        choices=("test", "validation"),
    )
    eval_file: str | None = _opt(
        None, "evaluation data file (default: hold out eval_fraction of a data file)"
    )
    eval_fraction: float = _opt(0.1, "fraction of a data file held out for evaluation without eval_file")
    label_words: str | None = _opt(None, "classification files: comma-separated words for labels 0,1,...")
    template: str = _opt("{text}\nLabel:", "classification files: prompt template around {text}")
    columns: str | None = _opt(
        None, "map the data's columns to our fields, e.g. prompt=question,completion=answer or text=sentence"
    )
    seed: int = _opt(0, "seed for the data split and order, random scores, tie-breaking")
    split_seed: int | None = _opt(
        None, "seed of the train/test split alone (and of sampling a bigger data file); default: seed. Fix it "
        "to evaluate runs of several seeds on the same test examples",
    )  # fmt: skip
    max_length: int | None = _opt(
        None, "max tokens per example; default: the longest example, up to the model's limit (a longer "
        "prompt is cut from the left, with a note saying how many were)",
    )  # fmt: skip

    _positive: typing.ClassVar[tuple[str, ...]] = ("max_length",)

    def __post_init__(self) -> None:
        self._given = GIVEN.get()  # not a field: asdict() and saved configs leave it out
        if self.max_length is not None and self.max_length < 2:  # one token is nothing to learn from
            raise NeurontuneError(
                f"max_length must be at least 2 (a token to predict from and one to predict), got {self.max_length}"
            )
        for name in self._positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise NeurontuneError(f"{name} must be positive, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = choices_of(f)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise NeurontuneError(f"{f.name} must be a finite number, got {value}")
            if choices and value is not None and value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise NeurontuneError(f"{f.name}={value!r} is not one of: {', '.join(choices)}{hint}")

        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:  # what torch, numpy and random all take
                raise NeurontuneError(f"{name} must be between 0 and {2**32 - 1}, got {value}")
        self.columns_value()  # validate early
        words = self.label_words_value() or []
        if dup := next((w for i, w in enumerate(words) if w in words[:i]), None):
            raise NeurontuneError(f"label_words lists {dup!r} twice; each label needs its own word")
        if not 0.0 < self.eval_fraction < 1.0:
            raise NeurontuneError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if "{text}" not in self.template:
            raise NeurontuneError(
                f"template {self.template!r} has no {{text}} placeholder for the example's text"
            )
        try:
            self.template.format(text="")
        except (ValueError, KeyError, IndexError) as e:
            raise NeurontuneError(
                f"template {self.template!r} is not a valid format string ({e}); write a literal brace as {{{{ or }}}}"
            ) from None

    def columns_value(self) -> dict[str, str] | None:
        if not self.columns:
            return None
        fields = ("prompt", "completion", "text", "label", "messages", "instruction", "input", "output")
        out = {}
        for item in filter(None, (x.strip() for x in self.columns.split(","))):
            ours, eq, theirs = item.partition("=")
            if not eq or ours.strip() not in fields or not theirs.strip():
                raise NeurontuneError(
                    f"columns item {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(fields)}"
                )
            out[ours.strip()] = theirs.strip()
        return out

    def label_words_value(self) -> list[str] | None:
        return [w.strip() for w in self.label_words.split(",") if w.strip()] if self.label_words else None


SEL = "selection (rows, neft)"


@dataclass
class SelectConfig(DataConfig):
    """`neurontune select`: score every target row on calibration data and write a NeuronSpec."""

    model: str = _opt(
        "smollm2-135m", "model: smollm2-135m (bundled), tiny-llama, tiny-gpt2, a local dir or Hub id"
    )
    dtype: str = _opt(
        "auto", "dtype the base is loaded in; auto: the checkpoint's own on a GPU (bf16 for a bf16 "
        "checkpoint), float32 on a CPU. Trainable deltas are float32 whatever it is", DTYPES,
    )  # fmt: skip
    quantization: str = _opt(
        "none",
        "load the frozen base quantized by bitsandbytes: nf4 / fp4 (4-bit, as QLoRA) or int8",
        QUANTIZATIONS,
    )
    # taylor: in the quality suite (benchmarks/results/quality_suite.md) taylor, fisher and NeFT rows beat
    # random rows significantly over 6 tasks x 3 seeds; magnitude, the default before, did not (+0.001)
    scorer: str = _opt(
        "taylor", "how rows are scored (custom scorers registered from Python are accepted too)",
        scorer_names, SEL,
    )  # fmt: skip
    scorer_options: str = _opt(
        "",
        "scorer options as k=v,k=v (p=2 | mode=frequency | probe_steps=50,probe_lr=1e-4 | samples=8)",
        group=SEL,
    )
    target_modules: str = _opt(
        "all-linear", "'all-linear', comma-separated suffixes (q_proj,v_proj) or a regex"
    )
    exclude_modules: str | None = _opt(None, "comma-separated suffixes or a regex to leave out")
    budget: str = _opt(
        "lora:8",
        "rows:K per module | ratio:P of all rows | lora:R (as many params as LoRA rank R in every module) "
        "| lora-global:R (LoRA rank R's total, spread over modules by score)",
        group=SEL,
    )
    per_layer: bool = _opt(False, "with ratio: P of each module instead of a global top-P", group=SEL)
    order: str = _opt("highest", "keep the highest or lowest scores", ("highest", "lowest"), SEL)
    min_per_module: int = _opt(0, "at least this many rows in every module", group=SEL)
    calib_examples: int = _opt(
        64, "calibration examples (from the train split) for data-driven scorers", group=SEL
    )
    calib_batch_size: int = _opt(8, "calibration batch size (finetune: at most its batch_size)", group=SEL)
    score_memory_mib: int = _opt(
        0,
        "MiB of weight-sized gradient statistics (taylor, fisher) held at once while scoring: one pass "
        "over the calibration data per group of modules that fits; 0: max(512, a sixteenth of the model)",
        group=SEL,
    )
    output: str = _opt("neuron_spec.json", "where to write the spec (select only)")
    overwrite: bool = _opt(False, "replace an existing output (never replaced without it)")

    _positive = (*DataConfig._positive, "calib_examples", "calib_batch_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget_kwargs()  # validate early
        if self.score_memory_mib < 0:
            raise NeurontuneError(f"score_memory_mib={self.score_memory_mib}: must be 0 (automatic) or more")

    def budget_kwargs(self) -> dict[str, Any]:
        return parse_budget(self.budget)

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
class FinetuneConfig(SelectConfig, *reversed(option_classes())):  # method options listed in method order
    """`neurontune finetune`: load, select neurons, train only those rows (or a baseline), evaluate, save."""

    method: str = _opt("rows", "fine-tuning method (neurontune.methods)", method_names)
    train_examples: int = _opt(2000, "training examples (the first ones of the task's train split)")
    eval_examples: int = _opt(200, "evaluation examples (the first ones of the task's test split)")
    forgetting_examples: int = _opt(32, "held-out news articles for perplexity (forgetting); 0 to skip")
    eval_before: bool = _opt(True, "also evaluate the base model before training")
    eval_steps: int = _opt(
        0,
        "also evaluate every N optimizer steps during training (eval_log.json, trackers' eval/*); 0: only at the end",
    )
    eval_batch_size: int = _opt(16, "evaluation batch size")
    steps: int | None = _opt(
        None, "optimizer steps; default: as many as num_train_epochs passes over the training examples take "
        "(a steps you give replaces them, as max_steps does in the HF Trainer)",
    )  # fmt: skip
    num_train_epochs: float = _opt(
        1.0, "passes over the training examples, which set the steps unless steps is given"
    )
    early_stopping_patience: int = _opt(
        0, "stop once the validation loss, measured every eval_steps on a validation split held out from the "
        "training examples (the last eval_fraction; the eval split itself with eval_split=validation), has "
        "not improved for this many measurements, and keep the weights of its best one; 0: off",
    )  # fmt: skip
    early_stopping_threshold: float = _opt(
        0.0, "how much the validation loss (or metric_for_best_model) must beat its best by to count as an "
        "improvement",
    )  # fmt: skip
    metric_for_best_model: str = _opt(
        "loss", "what early stopping (and a method's best step, e.g. the gates') goes by on the held-out "
        "examples: loss, the validation loss, or a metric of the task's own evaluation of them: accuracy "
        "(classification, multiple choice), exact_match, rougeL, bleu, chrf (generation), perplexity (text)",
    )  # fmt: skip
    greater_is_better: bool | None = _opt(
        None, "whether a higher metric_for_best_model is better; default: false for loss and perplexity, "
        "true for the others",
    )  # fmt: skip
    batch_size: int = _opt(8, "micro-batch size")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float | None = _opt(None, "AdamW learning rate; default: the method's own (see methods below)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (acts on trainable parameters only)")
    lr_scheduler: str = _opt("constant", "learning-rate schedule (transformers.get_scheduler)", SCHEDULERS)
    warmup_steps: int = _opt(0, "learning-rate warm-up steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables")
    ema_decay: float = _opt(
        0.0, "keep an exponential moving average of the trainable parameters (Polyak averaging, e.g. 0.9): "
        "it is what is evaluated along the training, what early stopping keeps and the result (0: off; not "
        "under FSDP or DeepSpeed)",
    )  # fmt: skip
    precision: str = _opt(
        "auto", "auto: bf16 autocast on a GPU that supports it, else fp32", ("auto", "fp32", "bf16", "fp16")
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    torch_compile: bool = _opt(
        False, "compile the model for training with torch.compile (through accelerate)"
    )
    torch_compile_backend: str = _opt(
        "inductor", "torch.compile backend (inductor; aot_eager compiles fast, for checks)",
        ("inductor", "aot_eager", "eager", "cudagraphs"),
    )  # fmt: skip
    report_to: str = _opt(
        "none", "experiment trackers, comma-separated: tensorboard (offline, in output_dir/logs), wandb, "
        "trackio, mlflow, ... (accelerate's), or none",
    )  # fmt: skip
    save_steps: int = _opt(20, "checkpoint every N steps (for --resume); 0: only at the end")
    save_total_limit: int = _opt(2, "checkpoints kept")
    output_dir: str = _opt("runs/finetune", "where config, spec, adapter, logs and metrics go")
    save_merged: bool = _opt(False, "also write a merged plain transformers model to output_dir/merged")
    resume: bool = _opt(False, "continue the run in output_dir from its newest checkpoint")
    overwrite: bool = _opt(False, "replace a finished or different run already in output_dir")

    _positive = (
        *SelectConfig._positive,
        "train_examples",
        "eval_examples",
        "eval_batch_size",
        "steps",
        "batch_size",
        "grad_accum",
        "save_total_limit",
    )
    # fields that may differ when resuming (they do not change the training trajectory)
    RESUME_FREE: typing.ClassVar[tuple[str, ...]] = (
        "resume", "overwrite", "output_dir", "save_merged", "eval_examples", "eval_batch_size",
        "forgetting_examples", "eval_before", "eval_steps", "save_steps", "save_total_limit", "output",
        "report_to",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        method = get_method(self.method)
        if self.lr is None:
            self.lr = method.default_lr
        if self.lr <= 0:
            raise NeurontuneError(f"lr must be positive, got {self.lr}")
        if self.quantization != "none" and not method.supports_quantization:
            raise NeurontuneError(
                f"method={self.method} cannot train on a quantized base (quantization={self.quantization}); "
                f"methods that can: {', '.join(n for n, m in registry().items() if m.supports_quantization)}"
            )
        method.check_config(self)
        self._refuse_unused_options(method)
        from neurontune.tracking import check_available

        check_available(self.report_to)
        if not self.num_train_epochs > 0:
            raise NeurontuneError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.early_stopping_patience and not self.eval_steps:
            raise NeurontuneError(
                "early_stopping_patience needs eval_steps (every how many steps the validation loss is measured)"
            )
        if self.early_stopping_patience and not method.trains:
            raise NeurontuneError(f"early_stopping_patience: method={self.method} does not train")
        if self.metric_for_best_model != "loss" and not self.early_stopping_patience:
            raise NeurontuneError(
                f"metric_for_best_model={self.metric_for_best_model} needs early_stopping_patience (its "
                "held-out examples are what it is measured on)"
            )
        for name in (
            "early_stopping_patience",
            "early_stopping_threshold",
            "warmup_steps",
            "save_steps",
            "eval_steps",
            "forgetting_examples",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise NeurontuneError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_warmup(self.lr_scheduler, self.warmup_steps)
        if not 0.0 <= self.ema_decay < 1.0:
            raise NeurontuneError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")

    def _refuse_unused_options(self, method: Any) -> None:
        """An option the chosen method would ignore is a mistake, not something to drop in silence."""
        own = {f.name for f in dataclasses.fields(method.options)} if method.options else set()
        for f in dataclasses.fields(self):
            group = f.metadata.get("group")
            if group is None or f.name in own or f.name == "budget" or not is_set(self, f.name):
                continue
            if group == SEL and method.selects_rows:
                continue
            raise NeurontuneError(
                f"{f.name}={getattr(self, f.name)!r} is a {group} option; method={self.method} does not use it"
            )


@dataclass
class EvalConfig(DataConfig):
    """`neurontune eval`: evaluate a base model, an adapter (row-sparse or PEFT) or a merged model."""

    adapter: str | None = _opt(None, "adapter directory (neurontune rows or PEFT LoRA)")
    model: str | None = _opt(None, "base or merged model (default: the adapter's base, else smollm2-135m)")
    dtype: str = _opt(
        "auto", "dtype the model is loaded in; auto: the checkpoint's own on a GPU, float32 on a CPU", DTYPES
    )
    quantization: str | None = _opt(
        None, "load the base quantized (nf4, fp4, int8, none; default: as a row adapter's base was trained)",
        QUANTIZATIONS,
    )  # fmt: skip
    eval_examples: int = _opt(200, "evaluation examples")
    eval_batch_size: int = _opt(16, "evaluation batch size")
    forgetting_examples: int = _opt(32, "held-out news articles for perplexity; 0 to skip")
    output: str | None = _opt(None, "write the metrics to this JSON file")
    overwrite: bool = _opt(False, "replace an existing --output file")
    lm_eval_tasks: str | None = _opt(
        None, "also run these lm-evaluation-harness tasks (comma-separated; task=none: only these)"
    )
    lm_eval_include: str | None = _opt(None, "a directory of custom lm-eval task YAMLs (for lm_eval_tasks)")
    lm_eval_limit: int | None = _opt(None, "lm-eval: at most this many examples per task")
    lm_eval_fewshot: int | None = _opt(None, "lm-eval: few-shot examples (default: each task's own)")

    _positive = (*DataConfig._positive, "eval_examples", "eval_batch_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task == "none" and not self.lm_eval_tasks:
            raise NeurontuneError("task=none evaluates nothing without lm_eval_tasks")
        if self.lm_eval_include and not self.lm_eval_tasks:
            raise NeurontuneError("lm_eval_include needs lm_eval_tasks (the tasks to run from it)")
        for name in ("lm_eval_limit", "lm_eval_fewshot"):
            if (v := getattr(self, name)) is not None and v < (1 if name == "lm_eval_limit" else 0):
                raise NeurontuneError(
                    f"{name} must be {'positive' if name == 'lm_eval_limit' else '>= 0'}, got {v}"
                )


@dataclass
class AnalyzeConfig:
    """`neurontune analyze`: an HTML report of where selected neurons sit, how they overlap and move."""

    specs: str = _opt("", "comma-separated NeuronSpecs: spec files, neurontune adapters or run directories")
    labels: str | None = _opt(None, "comma-separated labels for --specs (default: their file/dir names)")
    runs: str | None = _opt(None, "comma-separated run directories: loss curves, results table, row dynamics")
    full_ft: str | None = _opt(
        None, "a fully fine-tuned model: were its most-changed rows the selected ones?"
    )
    model: str | None = _opt(None, "base model for dynamics and --full-ft (default: the first spec's base)")
    output: str = _opt("runs/analysis", "directory for report.html and the PNG figures")
    overwrite: bool = _opt(False, "replace the report.html and figures of an earlier analysis in --output")

    def __post_init__(self) -> None:
        if not self.specs and not self.runs:
            raise NeurontuneError("analyze needs --specs and/or --runs")
        if self.labels is not None and len(self.labels.split(",")) != len(self.spec_paths()):
            raise NeurontuneError(
                f"--labels has {len(self.labels.split(','))} names for {len(self.spec_paths())} specs"
            )

    def spec_paths(self) -> list[str]:
        return [p.strip() for p in self.specs.split(",") if p.strip()]

    def run_paths(self) -> list[str]:
        return [p.strip() for p in (self.runs or "").split(",") if p.strip()]

    def spec_labels(self) -> list[str]:
        if self.labels is not None:
            return [x.strip() for x in self.labels.split(",")]
        return [_label(p) for p in self.spec_paths()]


def _label(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    return p.parent.name if p.name in ("neuron_spec.json", "adapter") else p.stem if p.is_file() else p.name


@dataclass
class MergeConfig:
    """`neurontune merge`: fold an adapter into its base and write a plain transformers model."""

    adapter: str = _opt("", "adapter directory (neurontune rows or PEFT LoRA)")
    output: str = _opt("", "directory for the merged model (config.json + model.safetensors + tokenizer)")
    model: str | None = _opt(None, "base model (default: the adapter's base)")
    dtype: str = _opt("auto", "dtype of the saved model; auto: the base checkpoint's own", DTYPES)
    quantization: str | None = _opt(
        None, "load the base quantized (nf4, fp4, int8, none; default: as a row adapter's base was trained); "
        "the merged model is dequantized", QUANTIZATIONS,
    )  # fmt: skip
    overwrite: bool = _opt(
        False, "replace an existing --output (atomically, and only once the merge succeeded)"
    )

    def __post_init__(self) -> None:
        for name in ("adapter", "output"):
            if not getattr(self, name):
                raise NeurontuneError(f"merge needs --{name}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise NeurontuneError(
                f"quantization={self.quantization!r} is not one of: {', '.join(QUANTIZATIONS)}"
            )


@dataclass
class ExportConfig:
    """`neurontune export`: write a row adapter as an exactly equivalent PEFT LoRA adapter."""

    adapter: str = _opt("", "neurontune row adapter directory")
    output: str = _opt("", "directory for the PEFT adapter")
    overwrite: bool = _opt(False, "replace an existing --output (only once the export succeeded)")
    to: str = _opt(
        "peft-lora",
        "target format: peft-lora (an exact LoRA, for any LoRA loader or server) | peft-rowtune (the same row "
        "adapter in the PEFT format, e.g. an adapter written before neurontune had its PEFT method)",
        ("peft-lora", "peft-rowtune"),
    )
    per_module_rank: bool = _opt(
        False, "each module at its own rank (rank_pattern) instead of zero-padding all to the largest"
    )
    check: bool = _opt(True, "load the base model and compare the two adapters' logits")
    model: str | None = _opt(None, "base model for --check (default: the adapter's base)")

    def __post_init__(self) -> None:
        for name in ("adapter", "output"):
            if not getattr(self, name):
                raise NeurontuneError(f"export needs --{name}")


def _field_type(cls: type, f: dataclasses.Field) -> type:
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _optional(cls: type, f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[f.name])


def _parse_value(name: str, raw: str, typ: type, optional: bool = False) -> Any:
    if optional and raw.lower() in ("none", "null"):
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
    """One ``--flag`` per field, listed under the field's group (``--help`` sections per method), with
    its choices and its default shown once."""
    groups: dict[str | None, Any] = {}
    fields = dataclasses.fields(cls)
    order = list(dict.fromkeys([None, SEL, *(f.metadata.get("group") for f in fields)]))
    for f in sorted(fields, key=lambda f: order.index(f.metadata.get("group"))):
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = parser if group is None else parser.add_argument_group(f"{group} options")
        typ = _field_type(cls, f)
        choices = choices_of(f)
        kw: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if typ is bool
            else {"metavar": "{" + ",".join(choices) + "}" if choices else typ.__name__.upper(), "type": str}
        )
        default = "" if f.default in (None, "") else f" (default: {f.default})"
        groups[group].add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f.metadata.get("help", "") + default,
            **kw,
        )


def _coerce(name: str, value: Any, typ: type, optional: bool) -> Any:
    """A YAML value to the field's type (strings are parsed like command-line values)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return _parse_value(name, value, typ, optional)
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise NeurontuneError(f"{name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _check_key(key: str, fields: Any, where: str) -> None:
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NeurontuneError(f"unknown config key {key!r}{where}{hint}")


def load_yaml_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise NeurontuneError(f"config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise NeurontuneError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise NeurontuneError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NeurontuneError(
            f"config file {path}: expected a mapping of key: value, got {type(data).__name__}"
        )
    return data


def config_from_args(
    cls: type, ns: argparse.Namespace, overrides: list[str], yaml_path: str | None = None
) -> Any:
    """Build ``cls`` from defaults < YAML file < ``--flag value`` < ``key=value``; typos get a suggestion."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        for key, value in load_yaml_config(yaml_path).items():
            key = str(key).replace("-", "_")
            _check_key(key, fields, f" in {yaml_path}")
            values[key] = _coerce(key, value, _field_type(cls, fields[key]), _optional(cls, fields[key]))
    for name, f in fields.items():
        raw = getattr(ns, name, None)
        if isinstance(raw, bool):
            values[name] = raw
        elif raw is not None:
            values[name] = _parse_value(name, raw, _field_type(cls, f), _optional(cls, f))
    for item in overrides:
        if "=" not in item:
            raise NeurontuneError(f"unexpected argument {item!r}; overrides look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _check_key(key, fields, "")
        values[key] = _parse_value(key, raw, _field_type(cls, fields[key]), _optional(cls, fields[key]))
    token = GIVEN.set(frozenset(values))
    try:
        return cls(**values)
    finally:
        GIVEN.reset(token)
