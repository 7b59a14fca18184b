"""Configuration of the row-sparse tuner: a PEFT config (``peft_type="ROWTUNE"``).

``RowTuneConfig`` is both what ``neurontune.RowTuneModel`` takes and a registered PEFT method's config,
so ``peft.get_peft_model(model, RowTuneConfig(...))``, TRL's ``SFTTrainer(peft_config=...)`` and
``PeftModel`` / ``AutoPeftModelForCausalLM.from_pretrained`` work with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftConfig
from peft.utils import PeftType

from neurontune.choices import IMPLS, parse_budget
from neurontune.errors import NeurontuneError
from neurontune.spec import ROWTUNE_CONFIG_KEYS

PEFT_TYPE = "ROWTUNE"

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def _peft_type() -> PeftType:
    """PEFT's closed ``PeftType`` enum with a ``ROWTUNE`` member (added once; PEFT 0.21's
    ``register_peft_method`` only takes names the enum has)."""
    if PEFT_TYPE in PeftType.__members__:
        return PeftType[PEFT_TYPE]
    member = str.__new__(PeftType, PEFT_TYPE)
    member._name_ = member._value_ = PEFT_TYPE
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE] = member
    PeftType._value2member_map_[PEFT_TYPE] = member
    PeftType._member_names_.append(PEFT_TYPE)
    type.__setattr__(PeftType, PEFT_TYPE, member)
    return member


@dataclass
class RowTuneConfig(PeftConfig):
    """Which output rows (and optionally input columns) of which linear modules train, and how.

    The selection comes one of three ways:

    - given: ``rows`` maps full module names to row indices (``None``: every row), or is a
      :class:`neurontune.NeuronSpec`; ``cols`` optionally maps names to input-column indices;
    - chosen from the model: ``init_rows`` names a scorer (``"magnitude"``, ``"taylor"``, ...) and
      ``budget`` how many parameters (``"lora:8"``: as many as LoRA rank 8 in every module, ``rows:K``,
      ``ratio:P``, ``lora-global:R``) among ``target_modules`` minus ``exclude_modules``. Data-free
      scorers (``magnitude``, ``random``) run inside ``get_peft_model``; the others need calibration
      data first: ``neurontune.select_rows(model, config, batches)``;
    - loaded: ``modules`` (module -> the number of selected rows and columns) is what
      ``adapter_config.json`` keeps; the indices themselves are stored in ``adapter_model.safetensors``
      beside the deltas (``rowtune_rows`` / ``rowtune_cols``), so the config stays small.

    Attributes:
        delta_dtype: dtype of the trainable deltas. Keep ``"float32"`` (the default) even for a
            bf16/fp16 base: updates to small deltas underflow in half precision.
        impl: ``"auto"`` (default: the fastest formulation measured for the precision), ``"merged"``,
            ``"fused"`` or ``"index_add"``; see :mod:`neurontune.rowtune.layer`.
    """

    rows: Any = field(default=None, metadata={"help": "module -> row indices, or a NeuronSpec (not saved)"})
    cols: dict[str, list[int]] | None = field(default=None, metadata={"help": "module -> column indices"})
    modules: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "module -> {'rows': k or None, 'cols': c or None, 'shape': [out, in]}: the deltas"},
    )
    target_modules: str | list[str] | None = field(
        default="all-linear",
        metadata={"help": "modules eligible for init_rows: 'all-linear', suffixes or a regex"},
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "left out of target_modules"}
    )
    init_rows: str | None = field(default=None, metadata={"help": "scorer that picks the rows"})
    scorer_options: dict[str, Any] | None = field(default=None, metadata={"help": "options for the scorer"})
    budget: str = field(default="lora:8", metadata={"help": "rows:K | ratio:P | lora:R | lora-global:R"})
    seed: int = field(default=0, metadata={"help": "seed of the scorer and of tie-breaking"})
    delta_dtype: str = field(default="float32", metadata={"help": "dtype of the trainable deltas"})
    impl: str = field(default="auto", metadata={"help": "row-delta formulation"})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "set when the targets are GPT-2 Conv1D layers (weights stored (in, out))"},
    )
    provenance: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "where the selection came from"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_type()
        if self.delta_dtype not in _DTYPES:
            raise NeurontuneError(f"delta_dtype must be one of {sorted(_DTYPES)}, got {self.delta_dtype!r}")
        if self.impl not in IMPLS:
            raise NeurontuneError(f"impl must be one of {', '.join(IMPLS)}; got {self.impl!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)
        parse_budget(self.budget)
        if self.init_rows is not None:
            from neurontune.scoring import get_scorer

            get_scorer(self.init_rows, **(self.scorer_options or {}))  # a typo fails here, not after loading

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return _DTYPES[self.delta_dtype]

    def to_dict(self) -> dict[str, Any]:
        """What ``adapter_config.json`` holds: everything but the indices (they are in the weights file)."""
        import copy

        bare = copy.copy(self)
        bare.rows = bare.cols = None
        return asdict(bare)

    def legacy_dict(self) -> dict[str, Any]:
        """The ``rowtune_config`` entry of a ``neurontune_adapter.json``."""
        return {k: getattr(self, k) for k in ROWTUNE_CONFIG_KEYS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RowTuneConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise NeurontuneError(f"unknown RowTuneConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def selection_from(config: RowTuneConfig) -> Any:
    """``config.rows`` / ``config.cols`` as a :class:`NeuronSpec` (``None`` when none is given)."""
    from neurontune.spec import NeuronSpec

    if config.rows is None:
        if config.cols:
            raise NeurontuneError(
                "RowTuneConfig: cols given without rows (use rows={name: None} for every row)"
            )
        return None
    if isinstance(config.rows, NeuronSpec):
        if config.cols:
            raise NeurontuneError("RowTuneConfig: give cols inside the NeuronSpec, not beside it")
        return config.rows
    if not isinstance(config.rows, dict):
        raise NeurontuneError(
            f"RowTuneConfig.rows must map module names to row indices (or be a NeuronSpec), "
            f"got {type(config.rows).__name__}"
        )
    cols = dict(config.cols or {})
    extra = sorted(set(cols) - set(config.rows))
    if extra:
        raise NeurontuneError(f"RowTuneConfig: cols name modules that rows does not: {extra[:5]}")
    return NeuronSpec({n: {"rows": r, "cols": cols.get(n)} for n, r in config.rows.items()})
