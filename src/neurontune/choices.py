"""The names the command line offers (dtypes, quantizations, row impls, scorers, schedules), torch-free,
so that ``--help`` and every option error answer before torch or transformers is imported. The modules
that implement them import these names; tests check that the two agree."""

from __future__ import annotations

import sys

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


def scorer_names() -> tuple[str, ...]:
    """The built-in scorers and, once :mod:`neurontune.scoring` is imported, any registered from Python."""
    scoring = sys.modules.get("neurontune.scoring")
    registered = tuple(getattr(scoring, "SCORERS", ())) if scoring is not None else ()
    return tuple(dict.fromkeys((*BUILTIN_SCORERS, *registered)))
