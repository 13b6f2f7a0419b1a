"""The fine-tuning stage: a DeepSpeed engine over the adapter, a deterministic data order, and checkpoints
that carry the training progress so a resumed trial reports cumulative figures."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from trials.checkpoint_policy import CheckpointPolicy
from trials.checkpointing import CheckpointClock, TrainProgress, report_checkpoint, restore
from trials.config import TrialConfig
from trials.contract import LEARNING_RATE, STEP, TRAIN_LOSS, VAL_PPL
from trials.deepspeed_config import deepspeed_config, warmup_scheduler
from trials.deepspeed_ops import build_deepspeed_ops


@dataclass
class FineTuned:
    """The engine after training, how far it got, and why it stopped early (None if it did not)."""

    engine: deepspeed.DeepSpeedEngine
    progress: TrainProgress
    resumed_from_step: int
    stop_reason: str | None = None
    # val_ppl of the last step when it was an eval point: the weights the final evaluation would score again
    last_val_ppl: float | None = None


def micro_batch(
    blocks: torch.Tensor, seed: int, index: int, rank: int, world_size: int, batch_size: int
) -> torch.Tensor:
    """Micro-batch ``index`` of this rank: a pure function of its arguments, so a resumed trial sees the
    same data order as an uninterrupted one (epochs are seeded permutations of the blocks)."""
    n = len(blocks)
    first = (index * world_size + rank) * batch_size
    rows = []
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(order[offset])
    return blocks[torch.stack(rows)]


def synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them so a timer read covers the compute queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_mean(value: torch.Tensor) -> float:
    t = value.detach().double().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def resolved_deepspeed_config(engine, warmup_steps: int) -> dict:
    """What the engine runs with: DeepSpeed keeps the given dict as is (``user_config``) and puts the
    resolved values, defaults filled in and batch sizes derived, in the engine's config attributes."""
    ds = engine._config
    return {
        "train_batch_size": engine.train_batch_size(),
        "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "gradient_clipping": engine.gradient_clipping(),
        "zero_optimization_stage": engine.zero_optimization_stage(),
        "zero_optimization": ds.zero_config.model_dump(),
        "bf16_enabled": engine.bfloat16_enabled(),
        "fp16_enabled": engine.fp16_enabled(),
        "bf16": ds.bfloat16_config.model_dump(),
        "fp16": ds.float16_config.model_dump(),
        "optimizer": {"type": engine.optimizer_name(), "params": engine.optimizer_params()},
        "scheduler": {"type": type(engine.lr_scheduler).__name__, "warmup_steps": warmup_steps},
        "world_size": dist.get_world_size(),
        "user_config": ds._param_dict,
    }


def fine_tune(
    model: nn.Module,
    config: TrialConfig,
    train_blocks: torch.Tensor,  # [n, 2, seq_len]: input ids and labels
    device: torch.device,
    precision: str,  # resolved: bf16, fp16 or fp32 (trials.deepspeed_config.resolve_precision)
    policy: CheckpointPolicy,  # trials.checkpointing.checkpoint_policy, resolved by the driver
    log: Callable[[dict[str, float], int], None],
    evaluate: Callable[[nn.Module], float],
    log_config: Callable[[dict], None],
) -> FineTuned:
    """Train the adapter from the last checkpoint (if any) to ``train.max_steps``; every eval point is
    logged and reported to Ray Tune (whose ASHA stops trials on val_ppl)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    train = config.train
    model.train()
    build_deepspeed_ops()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, world_size=world_size, precision=precision),
        lr_scheduler=warmup_scheduler(train.warmup_steps),
        dist_init_required=False,  # Ray Train already created the process group
    )
    log_config(resolved_deepspeed_config(engine, train.warmup_steps))
    progress = restore(engine, device, zero3=train.zero_stage == 3)
    clock = CheckpointClock(policy, device)
    result = FineTuned(engine, progress, resumed_from_step=progress.step)
    for step in range(progress.step + 1, train.max_steps + 1):
        synchronize(device)
        began = time.perf_counter()
        learning_rate = engine.get_lr()[0]  # the rate this step runs at (read before the scheduler moves)
        loss_sum = torch.zeros((), device=device)
        for micro in range(train.grad_accum):
            index = (step - 1) * train.grad_accum + micro
            batch = micro_batch(train_blocks, config.seed, index, rank, world_size, train.batch_size)
            ids, labels = batch.to(device).unbind(1)
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            progress.tokens += ids.numel() * world_size
        synchronize(device)
        progress.train_seconds += time.perf_counter() - began
        progress.step = step
        train_loss = all_mean(loss_sum / train.grad_accum)
        if not math.isfinite(train_loss):
            result.stop_reason = f"non-finite loss: train_loss={train_loss} at step {step}"
            return result
        values = {TRAIN_LOSS: train_loss, LEARNING_RATE: learning_rate}
        if train.eval_every and step % train.eval_every == 0:
            values[VAL_PPL] = evaluate(engine.module)
            if step == train.max_steps:
                result.last_val_ppl = values[VAL_PPL]
        log(values, step)
        if step < train.max_steps and clock.due(step):
            report_checkpoint(engine, progress, values, device)
            clock.saved()
        elif VAL_PPL in values and step < train.max_steps:
            # Eval points reach Ray Tune, whose ASHA stops trials on val_ppl. Not the last step: the final
            # report follows at once, and ASHA would stop a trial whose step reached max_t before it.
            ray.train.report({**values, STEP: step})
    return result
