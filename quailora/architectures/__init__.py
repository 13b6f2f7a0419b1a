"""What quailora knows about model architectures, all derived: from the model's modules (``derive``), from
transformers' own checkpoint conversion mapping and from the checkpoint's tensor names (``weights``).
Calibration, worker sharding, memory planning and the benchmarks all read from here.
"""

from quailora.architectures.derive import (
    Layout,
    check_causal_lm,
    is_linear,
    linear_shape,
    load_model_config,
    meta_model,
    prepare,
    rebuild_buffers,
)
from quailora.architectures.weights import ModelWeights

__all__ = [
    "Layout",
    "ModelWeights",
    "check_causal_lm",
    "is_linear",
    "linear_shape",
    "load_model_config",
    "meta_model",
    "prepare",
    "rebuild_buffers",
]
