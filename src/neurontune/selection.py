"""Scoring rows and turning scores into a :class:`NeuronSpec` under a parameter budget.

A *scorer* is a small callable ``scorer(weight, *, generator) -> Tensor[out_features]`` that takes the
``(out, in)`` weight of one linear module and returns one score per output row; higher = more
worth training. The scorers here need no forward or backward pass. (Gradient/activation-based and
NeFT scorers build on the same contract.)

Budgets (exactly one):

- ``rows_per_module=k``: the top-k rows of every target module;
- ``match_lora_rank=r``: per module ``k = round(r * (in + out) / in)`` rows, so the trainable count
  equals LoRA rank ``r`` on the same modules to within one row per module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.spec import NeuronSpec
from neurontune.targets import find_target_modules, get_weight, linear_shape

Scorer = Callable[..., torch.Tensor]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    def deco(fn: Scorer) -> Scorer:
        SCORERS[name] = fn
        return fn

    return deco


@register_scorer("magnitude")
def magnitude(weight: torch.Tensor, *, p: int = 1, **_: Any) -> torch.Tensor:
    """``I_j = sum_k |W_jk|^p``. Needs no data. Cost: one pass over the weights."""
    return weight.detach().float().abs().pow(p).sum(dim=1)


@register_scorer("random")
def random_scores(weight: torch.Tensor, *, generator: torch.Generator, **_: Any) -> torch.Tensor:
    """Uniform random scores (a seeded baseline). Needs no data."""
    return torch.rand(weight.shape[0], generator=generator)


def lora_params(shape: tuple[int, int], rank: int) -> int:
    out_f, in_f = shape
    return rank * (in_f + out_f)


def rows_for_lora_rank(shape: tuple[int, int], rank: int) -> int:
    """Rows whose delta (k x in) has as many parameters as LoRA rank ``rank`` on this module."""
    out_f, in_f = shape
    return max(1, min(out_f, round(rank * (in_f + out_f) / in_f)))


def score_model(
    model: nn.Module,
    scorer: str | Scorer,
    target_modules: str | Sequence[str] = "all-linear",
    seed: int = 0,
    exclude_modules: str | Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """One score per output row of every target module (weight-only scorers)."""
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise NeurontuneError(f"unknown scorer {scorer!r}; available: {sorted(SCORERS)}")
        scorer = SCORERS[scorer]
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name in find_target_modules(model, target_modules, exclude_modules):
        w = get_weight(model.get_submodule(name))
        s = scorer(w, generator=gen)
        if s.shape != (w.shape[0],):
            raise NeurontuneError(
                f"scorer returned shape {tuple(s.shape)} for {name}; expected ({w.shape[0]},)"
            )
        scores[name] = s
    return scores


def select_rows(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    rows_per_module: int | None = None,
    match_lora_rank: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> NeuronSpec:
    """Top rows of each module under one budget; ties broken by row index (stable sort)."""
    if (rows_per_module is None) == (match_lora_rank is None):
        raise NeurontuneError("give exactly one budget: rows_per_module or match_lora_rank")
    modules: dict[str, dict[str, Any]] = {}
    lora_total = 0
    for name, s in scores.items():
        shape = linear_shape(model.get_submodule(name))
        if rows_per_module is not None:
            if not 0 < rows_per_module <= shape[0]:
                raise NeurontuneError(
                    f"rows_per_module={rows_per_module} does not fit {name} with {shape[0]} rows"
                )
            k = rows_per_module
        else:
            if match_lora_rank <= 0:
                raise NeurontuneError(f"match_lora_rank must be positive, got {match_lora_rank}")
            k = rows_for_lora_rank(shape, match_lora_rank)
            lora_total += lora_params(shape, match_lora_rank)
        order = torch.sort(s.float(), descending=True, stable=True).indices
        modules[name] = {"rows": order[:k].tolist(), "cols": None, "shape": list(shape)}
    budget = {"rows_per_module": rows_per_module} if rows_per_module else {"match_lora_rank": match_lora_rank}
    prov = {"budget": budget, **(provenance or {})}
    spec = NeuronSpec(modules, prov)
    if match_lora_rank is not None:
        spec.provenance["lora_params"] = lora_total
    spec.provenance["params"] = spec.num_params()
    return spec
