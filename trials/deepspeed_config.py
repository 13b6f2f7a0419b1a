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
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": train.learning_rate,
                "warmup_num_steps": max(train.warmup_steps, 1),
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,  # progress goes to MLflow, not stdout
        "wall_clock_breakdown": False,
    }
