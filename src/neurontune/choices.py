"""The names the command line offers (dtypes, quantizations, row impls, scorers, schedules), torch-free,
so that ``--help`` and every option error answer before torch or transformers is imported. The modules
that implement them import these names; tests check that the two agree."""

from __future__ import annotations

import sys

from neurontune.errors import NeurontuneError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# "auto": the checkpoint's own dtype on a GPU, fp32 on a CPU (finetune, select, eval, merge)
DTYPES = ("auto", *DTYPE_NAMES)
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
IMPLS = ("auto", "merged", "fused", "index_add")  # row-delta formulations (neurontune.rowtune.layer)
BUILTIN_SCORERS = ("magnitude", "random", "taylor", "fisher", "zo-taylor", "wanda", "activation", "neft")
# transformers.SchedulerType but reduce_lr_on_plateau (it needs a metric each step, which the loop does
# not give it)
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip


def check_warmup(
    scheduler: str,
    warmup_steps: int,
    scheduler_option: str = "lr_scheduler",
    warmup_option: str = "warmup_steps",
) -> None:
    """transformers' ``constant`` schedule ignores ``num_warmup_steps``: refuse the pair rather than warm
    nothing up."""
    if warmup_steps and scheduler == "constant":
        raise NeurontuneError(
            f"{warmup_option}={warmup_steps} does nothing with {scheduler_option}=constant (transformers' constant "
            f"schedule has no warm-up): use {scheduler_option}=constant_with_warmup, or another schedule"
        )


def scorer_names() -> tuple[str, ...]:
    """The built-in scorers and, once :mod:`neurontune.scoring` is imported, any registered from Python."""
    scoring = sys.modules.get("neurontune.scoring")
    registered = tuple(getattr(scoring, "SCORERS", ())) if scoring is not None else ()
    return tuple(dict.fromkeys((*BUILTIN_SCORERS, *registered)))


BUDGETS = {
    "rows": ("rows_per_module", int),
    "ratio": ("ratio", float),
    "lora": ("match_lora_rank", int),
    "lora-global": ("global_lora_rank", int),
}


def parse_budget(budget: str) -> dict[str, int | float]:
    """``"lora:8"`` -> ``{"match_lora_rank": 8}``: the keyword of :func:`neurontune.selection.select`."""
    kind, _, value = str(budget).partition(":")
    if kind not in BUDGETS or not value:
        raise NeurontuneError(f"budget {budget!r}: expected rows:K, ratio:P, lora:R or lora-global:R")
    key, typ = BUDGETS[kind]
    try:
        number = typ(value)
    except ValueError:
        what = "an integer" if typ is int else "a number"
        raise NeurontuneError(f"budget {budget!r}: {value!r} is not {what}") from None
    if not (0.0 < number <= 1.0 if typ is float else number >= 1):  # refused before any scoring pass
        want = "in (0, 1]" if typ is float else "at least 1"
        raise NeurontuneError(f"budget {budget!r}: {value} must be {want}")
    return {key: number}
