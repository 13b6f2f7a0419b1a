"""The DeepSpeed config of a trial, resolved from its TrainSpec and the hardware it landed on."""

from __future__ import annotations

import torch

from trials.config import TrainSpec

# The dtype a trial loads and computes its model in, per training precision; fp32 keeps model.dtype.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSpeed's dynamic loss scaling for fp16 (loss_scale 0): start at 2^16, halve on an overflowing step
# (skipped), double after 1000 clean steps.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}  # fmt: skip


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 natively (Ampere, compute capability 8, and later).
    torch.cuda.is_bf16_supported() also says yes for V100s, which only emulate it."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` on this worker's device: ``auto`` is bf16 on a CUDA device with native bf16,
    fp16 (with loss scaling) on older CUDA devices (V100, T4), fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def compute_dtype(precision: str, model_dtype: str) -> torch.dtype:
    """The dtype the model is loaded and computes in: the training precision's, else ``model.dtype``."""
    return PRECISION_DTYPES.get(precision) or getattr(torch, model_dtype)


def deepspeed_config(train: TrainSpec, *, world_size: int, precision: str) -> dict:
    """``precision``: resolved (bf16, fp16 or fp32), see resolve_precision."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train.zero_stage},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW instead of DeepSpeed's compiled CPU/fused Adam: no op build on any machine.
            "params": {"lr": train.learning_rate, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", **FP16_LOSS_SCALING},
        "steps_per_print": 2**31 - 1,  # progress goes to MLflow, not stdout
        "wall_clock_breakdown": False,
    }


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (1-based): linear warm-up to 1 over
    ``warmup_steps`` steps, then constant; 0 warm-up steps means the full rate from the first step."""
    return 1.0 if step >= warmup_steps else step / warmup_steps


def warmup_scheduler(warmup_steps: int):
    """The scheduler deepspeed.initialize builds on its optimizer. Not DeepSpeed's WarmupLR: that one
    stretches any warm-up to at least 2 steps and starts from its minimum, so with warmup_steps=0 the first
    two steps ran at learning rate 0 and the third at half of it."""
    from torch.optim.lr_scheduler import LambdaLR

    # LambdaLR applies f(0) before the first step and f(k) after the k-th: step k runs at f(k - 1).
    return lambda optimizer: LambdaLR(optimizer, lambda done: warmup_factor(done + 1, warmup_steps))
