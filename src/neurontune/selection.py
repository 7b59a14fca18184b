"""Turning row scores into a :class:`NeuronSpec` under a budget, and comparing selections.

Budgets (exactly one):

- ``rows_per_module=k``: the top-k rows of every scored module;
- ``ratio=p``: a fraction of all rows, either globally (``per_layer=False``, the default: each
  module's scores are divided by their mean so modules with different scales compete fairly, then
  the top ``round(p * total_rows)`` are taken) or per module (``per_layer=True``: ``round(p * out)``
  rows of each);
- ``match_lora_rank=r``: per module ``k = round(r * (in + out) / in)`` rows, so the trainable count
  equals LoRA rank ``r`` on the same modules to within one row per module (both counts are recorded);
- ``global_lora_rank=r``: LoRA rank ``r``'s parameter count over all the modules, spread by score: rows
  in order of mean-normalised score (as the global ratio) while their deltas fit in the count, so
  modules that score high get more rows and some may get none.

``order="highest"`` (default) keeps the highest scores, ``"lowest"`` the lowest. ``min_per_module``
guarantees each module that many rows. Ties are broken by a seeded random permutation, so the
result is deterministic for a given seed and unbiased towards low row indices.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neurontune.errors import NeurontuneError
from neurontune.spec import NeuronSpec
from neurontune.targets import linear_shape


def lora_params(shape: tuple[int, int], rank: int) -> int:
    out_f, in_f = shape
    return rank * (in_f + out_f)


def rows_for_lora_rank(shape: tuple[int, int], rank: int) -> int:
    """Rows whose delta (k x in) has as many parameters as LoRA rank ``rank`` on this module."""
    out_f, in_f = shape
    return max(1, min(out_f, round(rank * (in_f + out_f) / in_f)))


def _ranked(scores: torch.Tensor, order: str, gen: torch.Generator) -> torch.Tensor:
    """Row indices best first; ties in seeded random order."""
    s = scores.float() if order == "highest" else -scores.float()
    perm = torch.randperm(len(s), generator=gen)
    return perm[torch.sort(s[perm], descending=True, stable=True).indices]


def select(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    rows_per_module: int | None = None,
    ratio: float | None = None,
    match_lora_rank: int | None = None,
    global_lora_rank: int | None = None,
    per_layer: bool = False,
    order: str = "highest",
    min_per_module: int = 0,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
    verbose: bool = False,
) -> NeuronSpec:
    """Pick rows from ``scores`` (module name -> one score per output row) under one budget."""
    given = [b for b in (rows_per_module, ratio, match_lora_rank, global_lora_rank) if b is not None]
    if len(given) != 1:
        raise NeurontuneError(
            "give exactly one budget: rows_per_module, ratio, match_lora_rank or global_lora_rank"
        )
    if order not in ("highest", "lowest"):
        raise NeurontuneError(f"order must be 'highest' or 'lowest', got {order!r}")
    if not scores:
        raise NeurontuneError("no scores to select from")
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise NeurontuneError(f"ratio must be in (0, 1], got {ratio}")
    for name, rank in (("match_lora_rank", match_lora_rank), ("global_lora_rank", global_lora_rank)):
        if rank is not None and rank <= 0:
            raise NeurontuneError(f"{name} must be positive, got {rank}")
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: linear_shape(model.get_submodule(n)) for n in scores}
    for n, s in scores.items():
        if shapes[n] is None or s.shape != (shapes[n][0],):
            raise NeurontuneError(
                f"scores for {n} have shape {tuple(s.shape)}; expected ({shapes[n] and shapes[n][0]},)"
            )
        if min_per_module > shapes[n][0]:
            raise NeurontuneError(
                f"min_per_module={min_per_module} does not fit {n} with {shapes[n][0]} rows"
            )
    ranked = {n: _ranked(s, order, gen) for n, s in scores.items()}

    counts: dict[str, int] = {}
    if rows_per_module is not None:
        for n, (out_f, _) in shapes.items():
            if not 0 < rows_per_module <= out_f:
                raise NeurontuneError(f"rows_per_module={rows_per_module} does not fit {n} with {out_f} rows")
            counts[n] = rows_per_module
    elif match_lora_rank is not None:
        counts = {n: rows_for_lora_rank(sh, match_lora_rank) for n, sh in shapes.items()}
    elif global_lora_rank is not None:
        n_params = sum(lora_params(sh, global_lora_rank) for sh in shapes.values())
        counts = _global_counts(scores, ranked, shapes, None, order, min_per_module, n_params)
    elif per_layer:
        counts = {n: max(1, round(ratio * sh[0])) for n, sh in shapes.items()}
    else:
        counts = _global_counts(scores, ranked, shapes, ratio, order, min_per_module)
    counts = {n: max(k, min_per_module) for n, k in counts.items()}

    modules = {
        n: {"rows": sorted(ranked[n][:k].tolist()), "cols": None, "shape": list(shapes[n])}
        for n, k in counts.items()
        if k > 0
    }
    budget = {
        "rows_per_module": rows_per_module,
        "ratio": ratio,
        "match_lora_rank": match_lora_rank,
        "global_lora_rank": global_lora_rank,
        "per_layer": per_layer,
        "order": order,
        "min_per_module": min_per_module,
        "seed": seed,
    }
    spec = NeuronSpec(
        modules, {"budget": {k: v for k, v in budget.items() if v is not None}, **(provenance or {})}
    )
    spec.provenance["params"] = spec.num_params()
    if (rank := match_lora_rank or global_lora_rank) is not None:
        spec.provenance["lora_params"] = sum(lora_params(sh, rank) for sh in shapes.values())
        if verbose:
            print(
                f"budget: {spec.num_params():,} row params vs {spec.provenance['lora_params']:,} "
                f"for LoRA r={rank} on the same {len(shapes)} modules"
            )
    return spec


def _global_counts(scores, ranked, shapes, ratio, order, min_per_module, n_params=None) -> dict[str, int]:
    """Global top-p over mean-normalised scores, after giving each module its minimum; with
    ``n_params``, the best rows while their deltas (``in`` parameters each) fit in ``n_params``."""
    counts = {n: min_per_module for n in scores}
    if n_params is None:
        budget, unit = max(1, round(ratio * sum(sh[0] for sh in shapes.values()))), "rows"
        used = sum(counts.values())
    else:
        budget, unit = n_params, "parameters"
        used = sum(k * shapes[n][1] for n, k in counts.items())
    if used > budget:  # the floor alone would break the budget that the spec claims to meet
        raise NeurontuneError(
            f"min_per_module={min_per_module} alone takes {used:,} {unit}, over the budget's {budget:,}; "
            "lower it or raise the budget"
        )
    remaining = budget - used
    if remaining > 0:
        pool_scores, pool_names = [], []
        for n, s in scores.items():
            s = s.float()
            mean = s.abs().mean()
            norm = s / mean if mean > 0 else s
            norm = norm if order == "highest" else -norm
            rest = ranked[n][min_per_module:]  # best-first order, so taking a prefix per module is consistent
            pool_scores.append(norm[rest])
            pool_names += [n] * len(rest)
        pool = torch.cat(pool_scores)
        # stable sort keeps each module's tie order from `ranked`
        best = torch.sort(pool, descending=True, stable=True).indices
        if n_params is None:
            top = best[:remaining]
        else:  # a best-first prefix, so each module's rows stay a prefix of its ranking
            cost = torch.tensor([shapes[n][1] for n in pool_names])[best]
            top = best[: int((cost.cumsum(0) <= remaining).sum())]
        for i in top.tolist():
            counts[pool_names[i]] += 1
    return counts


# ---- comparing selections ---------------------------------------------------------------------------
def _row_sets(spec: NeuronSpec) -> dict[str, set[int]]:
    return {
        n: set(s.rows if s.rows is not None else range(s.delta_shape()[0])) for n, s in spec.modules.items()
    }


def overlap(a: NeuronSpec, b: NeuronSpec) -> dict[str, Any]:
    """Jaccard |A∩B|/|A∪B| and overlap coefficient |A∩B|/min(|A|,|B|) of selected (module, row) pairs.

    Returns ``{"jaccard", "overlap", "intersection", "size_a", "size_b", "per_module": {...},
    "per_layer": {...}}``; a module selected in only one spec counts with an empty set in the other.
    """

    def stats(sa: set, sb: set) -> dict[str, float]:
        inter, union = len(sa & sb), len(sa | sb)
        return {
            "jaccard": inter / union if union else 1.0,
            "overlap": inter / min(len(sa), len(sb)) if sa and sb else 0.0,
            "intersection": inter,
            "size_a": len(sa),
            "size_b": len(sb),
        }

    ra, rb = _row_sets(a), _row_sets(b)
    per_module = {n: stats(ra.get(n, set()), rb.get(n, set())) for n in sorted(set(ra) | set(rb))}
    layer_sets: dict[str, tuple[set, set]] = defaultdict(lambda: (set(), set()))
    all_a = {(n, r) for n, rows in ra.items() for r in rows}
    all_b = {(n, r) for n, rows in rb.items() for r in rows}
    for n in per_module:
        layer = next((p for p in n.split(".") if p.isdigit()), "-")
        layer_sets[layer][0].update((n, r) for r in ra.get(n, ()))
        layer_sets[layer][1].update((n, r) for r in rb.get(n, ()))
    key = lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)  # noqa: E731
    return {
        **stats(all_a, all_b),
        "per_module": per_module,
        "per_layer": {k: stats(*v) for k, v in sorted(layer_sets.items(), key=key)},
    }


# ---- the selection job (neurontune select, and the row methods of finetune) -------------------------
def select_neurons(
    cfg: Any, model: nn.Module, tok: Any, task: Any, verbose: bool = True
) -> tuple[NeuronSpec, dict[str, torch.Tensor]]:
    """Score the target rows of ``model`` on ``cfg.calib_examples`` training examples and apply the budget.

    Returns the spec and the raw scores (module name -> one score per row).
    """
    from neurontune.scoring import score_model
    from neurontune.sharded import module_weights
    from neurontune.tasks import fixed_batches

    # finetune scores in micro-batches no larger than its training ones, so scoring fits where training does
    calib_batch = min(cfg.calib_batch_size, getattr(cfg, "batch_size", cfg.calib_batch_size))
    calib = fixed_batches(task.train[: cfg.calib_examples], tok, calib_batch, cfg.max_length)
    t0 = time.perf_counter()
    scores = score_model(
        model,
        cfg.scorer,
        batches=calib,
        target_modules=cfg.target_modules_value(),
        exclude_modules=cfg.exclude_modules_value(),
        seed=cfg.seed,
        progress=verbose,
        group_bytes=cfg.score_memory_mib * 2**20 if getattr(cfg, "score_memory_mib", 0) else None,
        weights=module_weights(model),  # a model loaded sharded: its weights are read from the checkpoint
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
            "calib_batch_size": calib_batch,
            "score_seconds": seconds,
        },
        verbose=verbose,
        **cfg.budget_kwargs(),
    )
    s = spec.summary()
    if verbose:
        print(
            f"selected {s['rows']:,} rows ({s['params']:,} params) in {s['modules']} modules with {cfg.scorer} "
            f"({seconds:.1f}s)\n  rows by module type: {s['rows_by_type']}\n  rows by layer: {s['rows_by_layer']}"
        )
    return spec, scores


def check_selection(cfg: Any, model: nn.Module) -> None:
    """Fail on a bad scorer, scorer option, target or budget now, before minutes of evaluation or scoring."""
    from neurontune.scoring import check_quantized, get_scorer
    from neurontune.targets import find_target_modules, linear_shape, refuse_tied_weights

    fn = get_scorer(cfg.scorer, **cfg.scorer_kwargs())
    names = find_target_modules(model, cfg.target_modules_value(), cfg.exclude_modules_value())
    refuse_tied_weights(model, names)
    check_quantized(fn, {n: model.get_submodule(n) for n in names})
    zeros = {n: torch.zeros(linear_shape(model.get_submodule(n))[0]) for n in names}
    select(model, zeros, per_layer=cfg.per_layer, order=cfg.order, min_per_module=cfg.min_per_module,
           **cfg.budget_kwargs())  # fmt: skip


def save_selection(
    spec: NeuronSpec, scores: dict[str, torch.Tensor], path: str | Path, replace: bool = True
) -> None:
    """``path`` gets the spec (JSON); ``<stem>.scores.safetensors`` beside it the raw scores
    (``replace=False``: neither replaces an existing file)."""
    from neurontune.io import write_safetensors

    path = Path(path)
    write_safetensors(
        scores_path(path), scores, {"scorer": str(spec.provenance.get("scorer"))}, replace=replace
    )
    spec.save(path, replace=replace)


def scores_path(spec_path: str | Path) -> Path:
    """Where :func:`save_selection` puts the raw scores of the spec at ``spec_path``."""
    return Path(spec_path).with_suffix(".scores.safetensors")
