"""What quailora knows about model architectures: derived from the model (``derive``), plus one file per
``config.model_type`` for what cannot be derived. Calibration, worker sharding, memory planning and the
benchmarks all read from here.
"""

from importlib import import_module
from pathlib import Path

from quailora.architectures.derive import (
    Layout,
    architecture,
    check_causal_lm,
    is_linear,
    linear_shape,
    load_model_config,
    meta_model,
    prepare,
    rebuild_buffers,
)
from quailora.architectures.spec import ARCHITECTURES, Architecture, ExpertNames
from quailora.architectures.weights import ModelWeights

_NOT_ARCHITECTURES = {"__init__", "derive", "experts", "spec", "weights", "shapes"}
for _file in sorted(Path(__file__).parent.glob("*.py")):
    if _file.stem not in _NOT_ARCHITECTURES:
        import_module(f"{__name__}.{_file.stem}")

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ExpertNames",
    "Layout",
    "ModelWeights",
    "architecture",
    "check_causal_lm",
    "is_linear",
    "linear_shape",
    "load_model_config",
    "meta_model",
    "prepare",
    "rebuild_buffers",
]
