"""Choosing which linear modules of a model are eligible, PEFT-style.

``target_modules`` may be
- ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head (``lm_head`` or
  whatever ``get_output_embeddings()`` returns);
- a list of names: a module matches if its full name equals an entry or ends with ``"." + entry``
  (``["q_proj", "v_proj"]``);
- any other string: a regular expression that must match the full module name
  (``r".*layers\\.(0|1)\\..*_proj"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from neurontune.errors import TargetError

ALL_LINEAR = "all-linear"


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a tunable linear layer, or ``None`` if it is not one."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):  # GPT-2 style: weight is (in, out)
        return module.weight.shape[1], module.weight.shape[0]
    return None


def _output_head_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def _matches(name: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Full names of the linear modules selected by ``target_modules`` minus ``exclude_modules``.

    Raises :class:`TargetError` if nothing matches, if an explicit name matches no module at all, or if
    an ``exclude_modules`` entry (or regex) excludes none of the targeted modules.
    """
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        try:
            re.compile(target_modules)
        except re.error as e:
            raise TargetError(f"target_modules regex {target_modules!r} is invalid: {e}") from None
    heads = _output_head_names(model)
    linear = [(n, m) for n, m in model.named_modules() if linear_shape(m) is not None]
    if target_modules == ALL_LINEAR:
        chosen = [n for n, _ in linear if n.split(".")[-1] not in heads and n not in heads]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
            suffixes = sorted({n.split(".")[-1] for n, _ in linear})
            for t in target_modules:
                if not any(_matches(n, [t]) for n, _ in linear):
                    raise TargetError(
                        f"target module {t!r} matches no linear layer of {type(model).__name__}; "
                        f"available: {suffixes}"
                    )
        chosen = [n for n, _ in linear if _matches(n, target_modules)]
    if exclude_modules:
        patterns = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        for pat in patterns:  # a typo would exclude nothing and train what the user meant to leave out
            if not any(_matches(n, pat if isinstance(exclude_modules, str) else [pat]) for n in chosen):
                raise TargetError(
                    f"exclude_modules {pat!r} matches none of the {len(chosen)} targeted modules "
                    f"(e.g. {chosen[0] if chosen else '-'})"
                )
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n, _ in linear})
        raise TargetError(
            f"target_modules={target_modules!r} selected no linear layer; available: {suffixes}"
        )
    return chosen


def refuse_tied_weights(model: nn.Module, names: Any) -> None:
    """Refuse row-tuning a module whose weight is tied to another (lm_head and the input embeddings with
    ``tie_word_embeddings``): merging its rows would change the other module too, so the merged model
    would not be the trained one."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for name in names:
        shared = owners.get(id(model.get_submodule(name).weight), [])
        if len(shared) > 1:
            raise TargetError(
                f"{name} shares its weight with {', '.join(n for n in shared if not n.startswith(name + '.'))} "
                "(tied weights): its rows cannot be trained and merged without changing the other module; "
                "leave it out of target_modules"
            )


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear (``Linear4bit``, ``Linear8bitLt``): its weight
    is packed, so it can only be run through its own forward or dequantized."""
    return (
        type(module.weight).__name__ in ("Params4bit", "Int8Params") if hasattr(module, "weight") else False
    )


def drop_quantization(model: nn.Module) -> None:
    """After some quantized layers were replaced by dequantized ones: dequantize the others too, and make
    the config no longer say "quantized" (what ``save_pretrained`` writes)."""
    if any(is_quantized(m) for m in model.modules()):
        model.dequantize()
    elif getattr(model, "hf_quantizer", None) is not None:
        # transformers' dequantize() fails when no quantized layer is left; do its clean-up
        model.hf_quantizer.remove_quantization_config(model)


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``(out_features, in_features)`` copy of the weight in ``dtype``; a quantized weight is
    dequantized (transformers' own bitsandbytes helper), one module at a time."""
    if is_quantized(module):
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        return dequantize_bnb_weight(module.weight, getattr(module, "state", None)).to(dtype)
    return get_weight(module).detach().to(dtype, copy=True)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)`` (a transposed view for Conv1D)."""
    return as_out_in(module.weight, module)


def as_out_in(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``weight``, stored in ``module``'s layout, viewed as ``(out_features, in_features)``."""
    return weight.t() if isinstance(module, Conv1D) else weight


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class ModelWrapper(nn.Module):
    """A module around ``self.base_model`` that passes unknown attributes through to it (as PeftModel)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)
