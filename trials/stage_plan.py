"""What each cached stage of a trial is computed from, read off its config alone (no file, no torch).

trials/stage_keys.py turns these into the cache keys on a worker, adding what only files and the device
tell (the checkpoint's identity, the calibration token ids, the dtype the worker computes in); the
orchestrator groups a sweep's trials by them before any trial runs (orchestrator/stage_graph.py). Two
trials with equal recipes get equal keys when they run on the same kind of device.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from quailora.initializers import effective_init_options, needs_gram
from trials.config import TrialConfig


def init_key_options(config: TrialConfig) -> dict[str, Any]:
    """The init options the trial's initialize stage runs with and its key reads: the trial's seed where the
    method draws random numbers (init.options.seed overrides it), no seed where it draws none."""
    return effective_init_options(config.init.method, config.init.options, config.seed)


def stage_recipes(config: TrialConfig) -> dict[str, dict[str, Any] | None]:
    """Per stage, the config values its key is made from; None for a stage the trial skips."""
    compute = {"model.dtype": config.model.dtype, "train.precision": config.train.precision,
               "use_gpu": config.resources.use_gpu}  # fmt: skip
    quant = config.quant.model_dump(mode="json")
    quantize = {"model": config.model.path, "quant": quant, **compute}
    calibrate = None
    if needs_gram(config.init.method):
        cal = config.calibration
        calibrate = {"model": config.model.path, "calibration": cal.model_dump(mode="json"), **compute}
        if cal.propagate == "quantized":
            calibrate["quant"] = quant
    lora = config.lora
    initialize = {
        "quantize": quantize,
        "calibrate": calibrate,
        "method": config.init.method,
        "options": init_key_options(config),
        "lora": {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "use_rslora": lora.use_rslora,
            "target_modules": lora.target_modules,
        },  # fmt: skip
    }
    return {"quantize": quantize, "calibrate": calibrate, "initialize": initialize}


def recipe_digest(recipe: dict[str, Any]) -> str:
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
