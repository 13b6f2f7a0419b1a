"""The key of each cached stage: exactly the inputs its artifact depends on, and nothing else.

quantize:   checkpoint identity + quantizer settings + the dtype the unquantized parts are kept in.
calibrate:  checkpoint identity + the calibration token ids (so source, num_sequences, seq_len and the
            tokenizer all count, each exactly) + propagate mode + forward dtype (+ the quantizer only
            when propagate=quantized).
initialize: the quantize key (Q) + the calibrate key when the method is calibrated + method, its options
            (the seed only where the method draws random numbers), rank, alpha, rsLoRA, the targeted layers.
Learning rate, steps, batch size, data and evaluation belong to no key: a sweep over them reuses all three.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from quailora.initializers import needs_gram
from trials.cache import StageKey, canonical_json
from trials.config import TrialConfig
from trials.stage_plan import init_key_options

SAMPLE_BYTES = 1 << 20  # per sampled window of a weight file


def _sampled_digest(path: Path) -> str:
    """sha256 of a file's first, middle and last MiB (a safetensors header names every tensor and offset):
    reading whole 30B checkpoints to key them would take minutes; a changed file changes these bytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(start)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _identity(checkpoint: str, stamp: tuple) -> dict:
    root = Path(checkpoint)
    return {
        "config": hashlib.sha256((root / "config.json").read_bytes()).hexdigest(),
        "weights": {p.name: _sampled_digest(p) for p in sorted(root.glob("*.safetensors"))},
    }


def checkpoint_identity(checkpoint: Path) -> dict:
    """What the checkpoint is, independent of where it lies: its config and its weight files' contents
    (sizes plus sampled bytes), so copies on two nodes share a key and two fine-tunes of one model do not."""
    files = sorted([checkpoint / "config.json", *checkpoint.glob("*.safetensors")])
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _identity(str(checkpoint.resolve()), stamp)


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.numpy().tobytes()).hexdigest()


def quantize_key(config: TrialConfig, checkpoint: Path, dtype: torch.dtype) -> StageKey:
    from trials.quantized_model import storage_options  # bitsandbytes: imported where a trial loads a model

    return StageKey(
        "quantize",
        {
            "checkpoint": checkpoint_identity(checkpoint),
            "quantizer": storage_options(config, dtype),
            "dtype": str(dtype).removeprefix("torch."),
        },
    )


def calibrate_key(
    config: TrialConfig, checkpoint: Path, calib_ids: torch.Tensor, forward_dtype: torch.dtype
) -> StageKey:
    from trials.quantized_model import quantizer_options

    cal = config.calibration
    inputs = {
        "checkpoint": checkpoint_identity(checkpoint),
        "source": cal.dataset,
        "num_sequences": int(calib_ids.shape[0]),
        "seq_len": int(calib_ids.shape[1]),
        "token_ids": tensor_digest(calib_ids),
        "propagate": cal.propagate,
        "forward_dtype": str(forward_dtype).removeprefix("torch."),
    }
    if cal.propagate == "quantized":
        inputs["quantizer"] = quantizer_options(config.quant)
    return StageKey("calibrate", inputs)


def initialize_key(
    config: TrialConfig, quantize: StageKey, calibrate: StageKey | None, target_names: list[str]
) -> StageKey:
    method = config.init.method
    options = init_key_options(config)
    inputs = {
        "quantize": quantize.digest,
        "method": method,
        "options": options,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha,
        "use_rslora": config.lora.use_rslora,
        "targets": hashlib.sha256(canonical_json(sorted(target_names)).encode()).hexdigest(),
    }
    if needs_gram(method):
        inputs["calibrate"] = calibrate.digest
    return StageKey("initialize", inputs)
