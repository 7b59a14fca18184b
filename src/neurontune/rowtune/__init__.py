"""Row-sparse tuning: train only selected output rows of linear layers."""

from neurontune.rowtune.config import RowTuneConfig
from neurontune.rowtune.layer import RowSparseLinear
from neurontune.rowtune.model import RowTuneModel, get_rowtune_model
from neurontune.spec import read_adapter

__all__ = ["RowSparseLinear", "RowTuneConfig", "RowTuneModel", "get_rowtune_model", "read_adapter"]
