"""neurontune: neuron-level sparse fine-tuning of large language models.

The public names below are imported on first use (PEP 562), so that ``import neurontune`` -- and the
command line's ``--help`` and option errors -- do not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from neurontune.errors import AdapterError, NeurontuneError, SpecError, TargetError

__version__ = "0.1.0"

# bitsandbytes (imported by peft when installed) warns on every start that it cannot fetch an optional
# CPU inference kernel from the Hugging Face Hub; neurontune does not use that path (neurontune.models)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    "RowSparseLinear": "neurontune.rowtune",
    "RowTuneConfig": "neurontune.rowtune",
    "RowTuneModel": "neurontune.rowtune",
    "get_rowtune_model": "neurontune.rowtune",
    "ModuleSelection": "neurontune.spec",
    "NeuronSpec": "neurontune.spec",
    "find_target_modules": "neurontune.targets",
}

if TYPE_CHECKING:
    from neurontune.rowtune import RowSparseLinear, RowTuneConfig, RowTuneModel, get_rowtune_model
    from neurontune.spec import ModuleSelection, NeuronSpec
    from neurontune.targets import find_target_modules


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neurontune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AdapterError",
    "ModuleSelection",
    "NeuronSpec",
    "NeurontuneError",
    "RowSparseLinear",
    "RowTuneConfig",
    "RowTuneModel",
    "SpecError",
    "TargetError",
    "__version__",
    "find_target_modules",
    "get_rowtune_model",
]
