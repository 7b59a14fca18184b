"""neurontune: neuron-level sparse fine-tuning of large language models."""

__version__ = "0.1.0"

import logging

from neurontune.errors import AdapterError, NeurontuneError, SpecError, TargetError
from neurontune.rowtune import RowSparseLinear, RowTuneConfig, RowTuneModel, get_rowtune_model
from neurontune.spec import ModuleSelection, NeuronSpec
from neurontune.targets import find_target_modules

# bitsandbytes (imported by peft when installed) warns on every start that it cannot fetch an optional
# CPU inference kernel from the Hugging Face Hub; neurontune does not use that path (neurontune.models)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
