"""The DeepSpeed config of a trial, resolved from its TrainSpec and the hardware it landed on."""

from __future__ import annotations

import torch

from trials.config import TrainSpec


def use_bf16(precision: str, use_gpu: bool) -> bool:
    """bf16 where the hardware computes it natively (CUDA with bf16 support); fp32 on CPU."""
    if precision == "auto":
        return use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def deepspeed_config(train: TrainSpec, *, world_size: int, bf16: bool) -> dict:
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
        "bf16": {"enabled": bf16},
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
