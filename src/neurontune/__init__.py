"""neurontune: neuron-level sparse fine-tuning of large language models.

The public names below are imported on first use (PEP 562), so that ``import neurontune`` -- and the
command line's ``--help`` and option errors -- do not wait for torch and transformers.

``import neurontune`` registers the ``rowtune`` PEFT method: at once when PEFT is already imported,
else as soon as it is (so ``AutoPeftModelForCausalLM.from_pretrained`` on a row adapter works in any
process that imported neurontune, and the command line still starts without PEFT).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any

from neurontune.errors import AdapterError, NeurontuneError, SpecError, TargetError

__version__ = "0.1.0"

# bitsandbytes (imported by peft when installed) warns on every start that it cannot fetch an optional
# CPU inference kernel from the Hugging Face Hub; neurontune does not use that path (neurontune.models)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _register_rowtune() -> None:
    if "neurontune.rowtune" in sys.modules:  # being imported or imported: its __init__ registers
        return
    try:
        importlib.import_module("neurontune.rowtune")
    except Exception as e:  # never break `import peft` for a user who imported neurontune
        warnings.warn(f"neurontune: the rowtune PEFT method could not be registered: {e}", stacklevel=2)


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find ``peft``, and registers rowtune after PEFT's
    own module has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_rowtune()

        spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    _register_rowtune()
elif not any(isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())

_LAZY = {
    "RowSparseLinear": "neurontune.rowtune",
    "RowTuneConfig": "neurontune.rowtune",
    "RowTuneModel": "neurontune.rowtune",
    "RowTuneLayer": "neurontune.rowtune",
    "RowTuneTuner": "neurontune.rowtune",
    "select_rows": "neurontune.rowtune",
    "get_rowtune_model": "neurontune.rowtune",
    "ModuleSelection": "neurontune.spec",
    "NeuronSpec": "neurontune.spec",
    "find_target_modules": "neurontune.targets",
}

if TYPE_CHECKING:
    from neurontune.rowtune import (
        RowSparseLinear,
        RowTuneConfig,
        RowTuneLayer,
        RowTuneModel,
        RowTuneTuner,
        get_rowtune_model,
        select_rows,
    )
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
    "RowTuneLayer",
    "RowTuneModel",
    "RowTuneTuner",
    "SpecError",
    "TargetError",
    "__version__",
    "find_target_modules",
    "get_rowtune_model",
    "select_rows",
]
