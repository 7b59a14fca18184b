"""Shared test helpers (spec builders)."""

import torch

from neurontune import NeuronSpec, find_target_modules
from neurontune.targets import linear_shape


def random_spec(model, k=3, cols=None, target="all-linear", seed=0, all_rows=False, contiguous=False):
    """k random rows (and optionally `cols` random columns) in every target module; with `contiguous`,
    rows 2 .. 2+k-1 instead."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in find_target_modules(model, target):
        out_f, in_f = linear_shape(model.get_submodule(name))
        rows = None if all_rows else torch.randperm(out_f, generator=g)[:k].tolist()
        if contiguous:
            rows = list(range(2, 2 + k))
        c = None if cols is None else torch.randperm(in_f, generator=g)[:cols].tolist()
        mods[name] = {"rows": rows, "cols": c, "shape": [out_f, in_f]}
    return NeuronSpec(mods, {"scorer": "random", "seed": seed})
