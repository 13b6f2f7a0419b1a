"""Checkpoints hold what a resume needs and nothing else (trials/checkpointing.py), on real DeepSpeed engines
over real gloo process groups (no Ray; tests/test_trial_recovery.py resumes through Ray Train):

- a resume from a mid-run checkpoint trains on exactly as an uninterrupted run (with LoRA dropout, so the RNG
  state must come back too);
- the checkpoint holds the trainable parameters, the optimizer and the progress, not the quantized base
  (DeepSpeed's own exclude_frozen_parameters keeps an INT-k base's code buffers and a bnb base's
  quantization state);
- the final checkpoint is the adapter and the progress alone, and restores the trained adapter;
- with init.zero_start (the trial's own stages.prepare_model), the model starts at its quantized base, the
  frozen start adapter is in no checkpoint and is rebuilt from the init entry, and the resume is as exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testkit.micro import micro_trial_config
from tests.ports import free_port

WORLD = 2
STEPS, SAVED_AT = 4, 2


def _engine(config, checkpoint, cache_root):
    import deepspeed

    from trials import stages
    from trials.adapters import build_adapter
    from trials.cache import StageCache
    from trials.deepspeed_config import deepspeed_config, warmup_scheduler
    from trials.deepspeed_ops import build_deepspeed_ops
    from trials.validation import validate_trial

    targets = validate_trial(config).target_names
    ctx = stages.StageContext(config, checkpoint, torch.device("cpu"), torch.float32, StageCache(cache_root))
    if config.init.zero_start:  # the trial's stages: svd's factors (from the cache after the first) + start
        model, _, _ = stages.prepare_model(ctx, None, targets)
    else:
        base, _, _ = stages.quantize(ctx)
        torch.manual_seed(
            config.seed
        )  # peft's own init of A: the same whether the quantize stage ran or was reused
        model = build_adapter(base, config, targets)
    model.train()
    build_deepspeed_ops()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(config.train, world_size=WORLD, precision="fp32"),
        lr_scheduler=warmup_scheduler(config.train.warmup_steps),
        dist_init_required=False,
    )
    return engine


def _start_error(model, blocks) -> float:
    """Relative max difference of the model's logits from its quantized base's (adapters off)."""
    ids = blocks[:2, 0]
    with torch.no_grad():
        adapted = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    model.train()
    return float((adapted - base).abs().max() / base.abs().max())


def _train(engine, config, blocks, steps: range) -> list[float]:
    from trials.finetune import micro_batch

    losses = []
    for step in steps:
        batch = micro_batch(blocks, config.seed, step - 1, dist.get_rank(), WORLD, config.train.batch_size)
        ids, labels = batch.unbind(1)
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world_size, port, checkpoint, texts, quant, zero_stage, root, zero_start=False):
    from trials.checkpointing import TrainProgress, restore_from, save_final_state, save_training_state
    from trials.worker import load_data

    torch.set_num_threads(1)  # the same BLAS blocking in every run: bit-comparable losses
    # as Ray Train sets them for its workers (DeepSpeed reads LOCAL_RANK)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = micro_trial_config(checkpoint, texts, quant=quant,
                                    lora={"rank": 4, "dropout": 0.0 if zero_start else 0.2},
                                    init={"method": "svd", "zero_start": zero_start},
                                    train={"zero_stage": zero_stage, "max_steps": STEPS},
                                    resources={"num_workers": world_size})  # fmt: skip
        blocks = load_data(config, Path(checkpoint)).train
        zero3, cpu, cache = zero_stage == 3, torch.device("cpu"), f"{root}/cache"
        uninterrupted = _engine(config, checkpoint, cache)
        start_error = _start_error(uninterrupted.module, blocks) if zero_start else None
        whole = _train(uninterrupted, config, blocks, range(1, STEPS + 1))
        # what DeepSpeed's own save keeps with exclude_frozen_parameters: the reference the test compares to
        uninterrupted.save_checkpoint(f"{root}/stock", tag="trial", exclude_frozen_parameters=True)

        first = _engine(config, checkpoint, cache)
        before = _train(first, config, blocks, range(1, SAVED_AT + 1))
        save_training_state(first, f"{root}/mid", TrainProgress(step=SAVED_AT, tokens=7), cpu)
        torch.manual_seed(12345)  # a fresh process's generator: the checkpoint must bring the saved one back
        resumed = _engine(config, checkpoint, cache)
        progress = restore_from(f"{root}/mid", resumed, cpu, zero3)
        after = _train(resumed, config, blocks, range(SAVED_AT + 1, STEPS + 1))

        Path(f"{root}/final").mkdir(exist_ok=True)
        save_final_state(resumed, f"{root}/final", TrainProgress(step=STEPS, tokens=9), zero3)
        dist.barrier()
        fresh = _engine(config, checkpoint, cache)
        final_progress = restore_from(f"{root}/final", fresh, cpu, zero3)
        import deepspeed

        def adapter(engine):
            trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters([p for _, p in trainable], enabled=zero3):
                return {n: p.detach().clone() for n, p in trainable}

        trained, restored = adapter(resumed), adapter(fresh)
        if rank == 0:
            Path(f"{root}/result.json").write_text(json.dumps({
                "whole": whole, "before": before, "after": after, "progress": progress.step,
                "tokens": progress.tokens, "final_progress": final_progress.step,
                "adapter_equal": all(torch.equal(trained[n], restored[n]) for n in trained),
                "adapter_moved": any(not torch.equal(trained[n], v) for n, v in adapter(first).items()),
                "trainable": {n: v.numel() for n, v in trained.items()}, "start_error": start_error,
            }))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("quant", "zero_stage", "zero_start"),
    [({"method": "int", "bits": 3, "group_size": 32}, 2, False), ({"method": "nf4"}, 3, False),
     ({"method": "nf4"}, 2, True)],
    ids=["int3-zero2", "nf4-zero3", "nf4-zero2-zero_start"],
)  # fmt: skip
def test_resume_is_exact_and_checkpoints_hold_no_base(micro_trial, tmp_path, quant, zero_stage, zero_start):
    checkpoint, texts = micro_trial
    args = (WORLD, free_port(), checkpoint, texts, quant, zero_stage, str(tmp_path), zero_start)
    mp.spawn(_worker, args=args, nprocs=WORLD)
    result = json.loads((tmp_path / "result.json").read_text())
    if zero_start:  # the model starts at Q; only the method's adapter trains (and is checkpointed)
        assert result["start_error"] <= 1e-6
        assert all(".default." in name for name in result["trainable"])

    # Resumed at step 2 with a reseeded generator, steps 3 and 4 are those of the uninterrupted run, bit for bit
    assert result["before"] + result["after"] == result["whole"]
    assert result["progress"] == SAVED_AT and result["tokens"] == 7

    # The mid-run checkpoint: trainable parameters, one optimizer shard per rank, nothing of the base
    mid, stock = tmp_path / "mid" / "trial", tmp_path / "stock" / "trial"
    files = sorted(p.name for p in mid.iterdir())
    assert all(f.endswith(("model_states.pt", "optim_states.pt")) for f in files), files
    assert sum(f.endswith("optim_states.pt") for f in files) == WORLD
    n = sum(result["trainable"].values())
    for f in (f for f in files if f.endswith("model_states.pt")):
        assert set(torch.load(mid / f, weights_only=False)["module"]) == set(result["trainable"])
        assert set(torch.load(stock / f, weights_only=False)["module"]) > set(
            result["trainable"]
        )  # + the base's
        # (+ DeepSpeed's frozen_param_fragments, this rank's share of each frozen parameter, which a resume
        # never reads: with zero_start they include the start adapter, at most the trainable size again)
        assert (mid / f).stat().st_size <= (8 if zero_start else 4) * n + 256 * 1024
    optimizer_bytes = sum((mid / f).stat().st_size for f in files if f.endswith("optim_states.pt"))
    assert 12 * n <= optimizer_bytes <= 12 * n + WORLD * 256 * 1024  # fp32 master + two Adam moments

    # The final checkpoint: the adapter and the progress, which restore the trained adapter exactly
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["adapter.safetensors", "progress.json"]
    assert (tmp_path / "final" / "adapter.safetensors").stat().st_size <= 4 * n + 64 * 1024
    assert result["final_progress"] == STEPS and result["adapter_equal"] and result["adapter_moved"]
