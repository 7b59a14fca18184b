"""Row-sparse tuning: train only selected output rows of linear layers.

Importing this package registers the ``rowtune`` PEFT method (:mod:`neurontune.rowtune.tuner`).
"""

from neurontune.rowtune.config import RowTuneConfig
from neurontune.rowtune.layer import RowSparseLinear
from neurontune.rowtune.model import RowTuneModel, get_rowtune_model
from neurontune.rowtune.tuner import RowTuneLayer, RowTuneTuner, select_rows
from neurontune.spec import read_adapter

__all__ = [
    "RowSparseLinear",
    "RowTuneConfig",
    "RowTuneLayer",
    "RowTuneModel",
    "RowTuneTuner",
    "get_rowtune_model",
    "read_adapter",
    "select_rows",
]
