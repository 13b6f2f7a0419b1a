"""Checkpoints that hold what a resume needs and nothing else, at an interval that does not stall a large model.

A mid-run checkpoint is the DeepSpeed engine's trainable parameters, its optimizer (ZeRO's fp32 master copy
and Adam's moments, one shard per rank), and the training progress with the RNG state; the frozen quantized
base is rebuilt from the model checkpoint and the stage cache. DeepSpeed's own ``exclude_frozen_parameters``
drops frozen *parameters* only: a group-wise INT-k base keeps its codes in buffers and a bitsandbytes base
its quantization state as extra state-dict entries, so the whole base would ride along in every checkpoint.

The checkpoint at the end carries the final metrics to Ray Train (whose Result reports those of the last
checkpoint) and lets a restart after it re-evaluate instead of re-training: it needs the trained adapter and
the progress, not the optimizer, so it is those alone.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from safetensors.torch import load_file, save_file

from trials.checkpoint_policy import CheckpointPolicy
from trials.contract import STEP

DEEPSPEED_TAG = "trial"  # the engine's save under a fixed tag: a checkpoint holds one state
FINAL_ADAPTER = "adapter.safetensors"  # the final checkpoint: trainable parameters by name
FINAL_PROGRESS = "progress.json"  # ... and the progress; their presence marks a final checkpoint
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies them beside every save


@dataclass
class TrainProgress:
    """How far training got, saved in every checkpoint so a resumed trial reports cumulative figures."""

    step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0


class CheckpointClock:
    """Decides, identically on every rank, whether a mid-run checkpoint is due after a step: a time-based
    interval is measured on rank 0 and broadcast (a DeepSpeed save is collective, so the ranks must agree)."""

    def __init__(self, policy: CheckpointPolicy, device: torch.device) -> None:
        self.policy, self.device = policy, device
        self.since = time.monotonic()

    def due(self, step: int) -> bool:
        due = bool(self.policy.steps) and step % self.policy.steps == 0
        if self.policy.minutes is not None:
            elapsed = torch.tensor(
                float(time.monotonic() - self.since >= 60 * self.policy.minutes), device=self.device
            )
            dist.broadcast(elapsed, src=0)
            due = due or bool(elapsed.item())
        return due

    def saved(self) -> None:
        self.since = time.monotonic()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators LoRA dropout draws from (the data order is a pure function of seed and step)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trainable(engine) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def save_training_state(engine, directory: str, progress: TrainProgress, device: torch.device) -> None:
    """The mid-run checkpoint: collective (every rank writes its optimizer shard into ``directory``)."""
    # DeepSpeed saves module.state_dict() minus frozen parameters, which keeps the base's buffers and extra
    # state (see the module docstring); this instance attribute narrows what it saves to the trainable ones.
    engine.module_state_dict = lambda **_: {name: p.detach() for name, p in _trainable(engine).items()}
    client_state = {**asdict(progress), "rng": _rng_state(device)}
    engine.save_checkpoint(directory, tag=DEEPSPEED_TAG, client_state=client_state, save_latest=False)
    for script in RECOVERY_SCRIPTS:  # for rebuilding fp32 weights by hand; a resume never runs them
        Path(directory, DEEPSPEED_TAG, script).unlink(missing_ok=True)


def save_final_state(engine, directory: str, progress: TrainProgress, zero3: bool) -> None:
    """The checkpoint at the end: the trained adapter and the progress, written by rank 0 (collective under
    ZeRO-3, whose parameters are gathered to be written)."""
    trainable = _trainable(engine)
    with deepspeed.zero.GatheredParameters(list(trainable.values()), enabled=zero3):
        if dist.get_rank() == 0:
            save_file(
                {name: p.detach().cpu().contiguous() for name, p in trainable.items()},
                f"{directory}/{FINAL_ADAPTER}",
            )
            Path(directory, FINAL_PROGRESS).write_text(json.dumps(asdict(progress)))


def restore(engine, device: torch.device, zero3: bool) -> TrainProgress:
    """The progress of the trial's last Ray Train checkpoint (a fresh TrainProgress without one), with the
    engine put back in the state it was saved in."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainProgress()
    with checkpoint.as_directory() as path:
        return restore_from(path, engine, device, zero3)


def restore_from(path: str, engine, device: torch.device, zero3: bool) -> TrainProgress:
    """``restore`` from a checkpoint directory: a final one (adapter + progress) or a mid-run one."""
    if Path(path, FINAL_PROGRESS).is_file():
        trainable = _trainable(engine)
        with deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=0, enabled=zero3):
            if not zero3 or dist.get_rank() == 0:
                for name, value in load_file(f"{path}/{FINAL_ADAPTER}").items():
                    trainable[name].data.copy_(value)
        return _progress(json.loads(Path(path, FINAL_PROGRESS).read_text()))
    _, client_state = engine.load_checkpoint(path, tag=DEEPSPEED_TAG, load_module_strict=False)
    if "rng" in client_state:  # (a checkpoint written before the RNG state was saved has none)
        _set_rng_state(client_state["rng"], device)
    return _progress(client_state)


def _progress(saved: dict) -> TrainProgress:
    """A field an older checkpoint lacks keeps its default."""
    return TrainProgress(**{f.name: saved[f.name] for f in fields(TrainProgress) if f.name in saved})


def report_checkpoint(
    engine, progress: TrainProgress, metrics: dict[str, float], device: torch.device
) -> None:
    """Save the mid-run checkpoint into a local directory and report it; Ray Train uploads it to storage in
    the background (and then deletes the local copy) while training goes on."""
    directory = tempfile.mkdtemp(prefix="quailora_ckpt_")
    save_training_state(engine, directory, progress, device)
    ray.train.report(
        {**metrics, STEP: progress.step},
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
    )


def report_final(engine, progress: TrainProgress, metrics: dict[str, float], zero3: bool) -> None:
    """Report the final metrics with the final checkpoint (only rank 0 has files to give)."""
    with tempfile.TemporaryDirectory() as directory:
        save_final_state(engine, directory, progress, zero3)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if dist.get_rank() == 0 else None
        ray.train.report({**metrics, STEP: progress.step}, checkpoint=checkpoint)
