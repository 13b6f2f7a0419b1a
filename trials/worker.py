"""What each Ray Train worker of a trial runs: load, initialize, fine-tune with DeepSpeed, evaluate, log."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from transformers import AutoTokenizer

from quailora.base_layers import exact_cpu_4bit
from quailora.initializers import needs_gram
from trials.adapters import build_adapter
from trials.config import TrialConfig
from trials.contract import (
    MODEL_SIZE_MB,
    STEP,
    STOPPED_AT_STEP,
    TRAIN_LOSS,
    VAL_PPL,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
)
from trials.deepspeed_config import deepspeed_config, use_bf16
from trials.evaluation import lm_eval_accuracies, perplexity
from trials.initialization import initialize_distributed
from trials.quantized_model import load_quantized_model, serialized_size_mb
from trials.sources import load_texts, tokenize_blocks
from trials.tracking import log_metrics, mark_failed

CHECKPOINT_TAG = "trial"
PROBE_ARTIFACT = "probe"  # input ids and logits of the final model, to check a reloaded adapter against
STOP_METRIC = "stopped_nonfinite_loss"


class RankZeroTracker:
    """MLflow logging from rank 0 only; other ranks call the same methods and nothing happens."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool) -> None:
        self.client = MlflowClient(tracking_uri) if enabled else None
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client:
            log_metrics(self.client, self.run_id, values, step, int(time.time() * 1000))

    def artifacts(self, local_dir: str, path: str) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, local_dir, path)

    def failed(self, reason: str) -> None:
        if self.client:
            mark_failed(self.client, self.run_id, reason)


@dataclass
class TrainProgress:
    """How far training got, saved in every checkpoint so a resumed trial reports cumulative figures."""

    step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0


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


def _synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them so a timer read covers the compute queued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory phase, so training's peak is not hidden behind initialization's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS; where refused, the peak spans the process
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(device: torch.device) -> float:
    """Peak since the last reset: CUDA max allocated, or the process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB


def _all_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _all_mean(value: torch.Tensor) -> float:
    t = value.detach().double().reshape(1).clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _save_adapter_and_probe(
    engine, config: TrialConfig, probe_ids: torch.Tensor, tracker: RankZeroTracker
) -> None:
    """Log the adapter as a peft directory (safetensors) and the final logits on a few validation blocks."""
    model = engine.module
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids).logits.float().cpu()  # every rank: ZeRO-3 forwards are collective
    with tempfile.TemporaryDirectory() as tmp:
        with deepspeed.zero.GatheredParameters(trainable, enabled=config.train.zero_stage == 3):
            if dist.get_rank() == 0:
                model.save_pretrained(f"{tmp}/adapter", safe_serialization=True)
                Path(f"{tmp}/probe").mkdir()
                save_file({"input_ids": probe_ids.cpu(), "logits": logits}, f"{tmp}/probe/logits.safetensors")
        tracker.artifacts(f"{tmp}/adapter", "adapter")
        tracker.artifacts(f"{tmp}/probe", PROBE_ARTIFACT)


def _log_deepspeed_config(engine, tracker: RankZeroTracker) -> None:
    """Log what the engine runs with: DeepSpeed keeps the given dict as is (``user_config``) and puts the
    resolved values, defaults filled in and batch sizes derived, in the engine's config attributes."""
    ds = engine._config
    resolved = {
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
        "scheduler": {"type": engine.scheduler_name(), "params": engine.scheduler_params()},
        "world_size": dist.get_world_size(),
        "user_config": ds._param_dict,
    }
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "deepspeed_config.json").write_text(json.dumps(resolved, indent=2, default=str))
        tracker.artifacts(tmp, "")


def _report_checkpoint(engine, progress: TrainProgress, metrics: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Only the adapter and optimizer: the frozen quantized base is rebuilt from the model checkpoint.
        engine.save_checkpoint(
            tmp, tag=CHECKPOINT_TAG, client_state=asdict(progress), exclude_frozen_parameters=True
        )
        ray.train.report(
            {**metrics, STEP: progress.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )


def _resume_progress(engine) -> TrainProgress:
    """The progress saved with the last checkpoint (a field older checkpoints lack keeps its default)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainProgress()
    with checkpoint.as_directory() as path:
        _, client_state = engine.load_checkpoint(path, tag=CHECKPOINT_TAG, load_module_strict=False)
    return TrainProgress(
        **{f.name: client_state[f.name] for f in fields(TrainProgress) if f.name in client_state}
    )


def train_trial(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker for one trial (config and plan arrive as plain dicts)."""
    config = TrialConfig.model_validate(loop_config["config"])
    checkpoint = Path(loop_config["checkpoint"])
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = use_bf16(config.train.precision, config.resources.use_gpu)
    dtype = torch.bfloat16 if bf16 else getattr(torch, config.model.dtype)
    tracker = RankZeroTracker(loop_config["tracking_uri"], loop_config["run_id"], enabled=rank == 0)
    batch_size = config.train.batch_size
    _reset_peak_memory(device)

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    train_blocks = tokenize_blocks(
        tokenizer, load_texts(config.data.train, "data.train"), config.data.seq_len
    )
    val_blocks = tokenize_blocks(
        tokenizer,
        load_texts(config.data.validation, "data.validation"),
        config.data.seq_len,
        config.data.max_eval_sequences,
    )
    calib_ids = None
    if needs_gram(config.init.method):
        calib_ids = tokenize_blocks(
            tokenizer,
            load_texts(config.calibration.dataset, "calibration.dataset"),
            config.calibration.seq_len,
            config.calibration.num_sequences,
        )

    torch.manual_seed(config.seed)
    base = load_quantized_model(checkpoint, config, dtype, device)
    model_size_mb = serialized_size_mb(base)
    if config.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = build_adapter(base, config, loop_config["target_names"])
    if device.type == "cpu":
        exact_cpu_4bit(model)  # evaluation then computes with the same fp32 Q as training and initialization
    timings = initialize_distributed(model, config, checkpoint, calib_ids, Path(loop_config["gram_dir"]))
    summary: dict[str, float] = {**timings, MODEL_SIZE_MB: model_size_mb}
    summary[VAL_PPL_INIT] = perplexity(model, val_blocks, batch_size, device)
    summary["init_peak_memory_mb"] = _all_max(_peak_memory_mb(device), device)
    tracker.metrics(dict(summary), 0)
    logged_at_start = set(summary)
    _reset_peak_memory(device)  # from here on: fine-tuning and the final evaluation

    model.train()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(config.train, world_size=world_size, bf16=bf16),
        dist_init_required=False,  # Ray Train already created the process group
    )
    _log_deepspeed_config(engine, tracker)
    progress = _resume_progress(engine)
    summary["resumed_from_step"] = progress.step

    stop_reason = None
    for step in range(progress.step + 1, config.train.max_steps + 1):
        _synchronize(device)
        began = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.train.grad_accum):
            ids = micro_batch(
                train_blocks,
                config.seed,
                (step - 1) * config.train.grad_accum + micro,
                rank,
                world_size,
                batch_size,
            ).to(device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            progress.tokens += ids.numel() * world_size
        _synchronize(device)
        progress.train_seconds += time.perf_counter() - began
        progress.step = step
        train_loss = _all_mean(loss_sum / config.train.grad_accum)
        if not math.isfinite(train_loss):
            stop_reason = f"non-finite loss: train_loss={train_loss} at step {step}"
            summary.update({STOP_METRIC: 1.0, STOPPED_AT_STEP: step})
            break
        values = {TRAIN_LOSS: train_loss, "learning_rate": engine.get_lr()[0]}
        if config.train.eval_every and step % config.train.eval_every == 0:
            values[VAL_PPL] = perplexity(engine.module, val_blocks, batch_size, device)
        tracker.metrics(values, step)
        if (
            config.train.checkpoint_every
            and step % config.train.checkpoint_every == 0
            and step < config.train.max_steps
        ):
            _report_checkpoint(engine, progress, values)
        elif VAL_PPL in values and step < config.train.max_steps:
            # Eval points reach Ray Tune, whose ASHA stops trials on val_ppl. Not the last step: the final
            # report follows at once, and ASHA would stop a trial whose step reached max_t before it.
            ray.train.report({**values, STEP: step})

    if stop_reason:
        tracker.metrics({STOP_METRIC: 1.0}, int(summary[STOPPED_AT_STEP]))
        tracker.failed(stop_reason)
        ray.train.report(summary)  # no checkpoint: the weights are not finite any more
        return
    summary["train_seconds"] = progress.train_seconds
    summary["tokens_per_second"] = progress.tokens / progress.train_seconds if progress.train_seconds else 0.0
    if config.eval.perplexity:
        summary[VAL_PPL_FINAL] = perplexity(engine.module, val_blocks, batch_size, device)
    if config.eval.lm_eval_tasks:  # every rank runs it: ZeRO-3 forwards are collective
        accuracies = [
            lm_eval_accuracies(
                engine.module, tokenizer, config.eval.lm_eval_tasks, config.eval.lm_eval_limit, batch_size
            )
        ]
        dist.broadcast_object_list(accuracies, src=0)  # only rank 0 gets lm-eval's results
        summary.update(accuracies[0])
    _save_adapter_and_probe(engine, config, val_blocks[: min(2, len(val_blocks))].to(device), tracker)
    summary["train_peak_memory_mb"] = _all_max(_peak_memory_mb(device), device)
    tracker.metrics({k: v for k, v in summary.items() if k not in logged_at_start}, config.train.max_steps)
    # Ray Train's Result carries the metrics of the last checkpoint, so the final report comes with one
    # (a restart after this point re-evaluates instead of re-training).
    _report_checkpoint(engine, progress, summary)
