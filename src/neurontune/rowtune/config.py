"""Configuration of the row-sparse tuner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from neurontune.choices import IMPLS
from neurontune.errors import NeurontuneError

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class RowTuneConfig:
    """How selected rows are made trainable.

    Attributes:
        target_modules: which linear modules are eligible for selection (``"all-linear"``, a list of
            name suffixes, or a regex). Used by scorers/selection; the spec decides what is wrapped.
        exclude_modules: names/regex removed from ``target_modules``.
        delta_dtype: dtype of the trainable deltas. Keep ``"float32"`` (the default) even for a
            bf16/fp16 base: updates to small deltas underflow in half precision.
        impl: ``"auto"`` (default: the fastest formulation measured for the precision), ``"merged"``,
            ``"fused"`` or ``"index_add"``; see :mod:`neurontune.rowtune.layer`.
    """

    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    delta_dtype: str = "float32"
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.delta_dtype not in _DTYPES:
            raise NeurontuneError(f"delta_dtype must be one of {sorted(_DTYPES)}, got {self.delta_dtype!r}")
        if self.impl not in IMPLS:
            raise NeurontuneError(f"impl must be one of {', '.join(IMPLS)}; got {self.impl!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return _DTYPES[self.delta_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RowTuneConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise NeurontuneError(f"unknown RowTuneConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
