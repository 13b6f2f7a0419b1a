"""Layer-sharded calibration: Gram matrices of every decoder layer's nn.Linear inputs, one layer in memory."""

from quailora.calibration.collect import PROPAGATIONS, collect_grams, run_layers
from quailora.calibration.distributed import GramReducer, ProcessGroupSum, sequence_share
from quailora.calibration.layerwise import LayerCall, LayerwiseModel
from quailora.calibration.partition import partition_layers
from quailora.calibration.store import GramStore

__all__ = [
    "PROPAGATIONS",
    "ProcessGroupSum",
    "GramReducer",
    "GramStore",
    "LayerCall",
    "LayerwiseModel",
    "collect_grams",
    "partition_layers",
    "run_layers",
    "sequence_share",
]
