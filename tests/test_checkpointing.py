"""Checkpoints hold what a resume needs and nothing else (trials/checkpointing.py), on real DeepSpeed engines
over real gloo process groups (no Ray; tests/test_trial_recovery.py resumes through Ray Train):

- a resume from a mid-run checkpoint trains on exactly as an uninterrupted run (with LoRA dropout, so the RNG
  state must come back too);
- the checkpoint holds the trainable parameters, the optimizer and the progress, not the quantized base
  (DeepSpeed's own exclude_frozen_parameters keeps an INT-k base's code buffers and a bnb base's
  quantization state);
- the final checkpoint is the adapter and the progress alone, and restores the trained adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port
from tests.test_trial_fixtures import make_texts, make_trial_checkpoint, micro_trial_config

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


def _worker(rank, world_size, port, checkpoint, texts, quant, zero_stage, root):
    from trials.checkpointing import TrainProgress, restore_from, save_final_state, save_training_state
    from trials.worker import load_data

    torch.set_num_threads(1)  # the same BLAS blocking in every run: bit-comparable losses
    # as Ray Train sets them for its workers (DeepSpeed reads LOCAL_RANK)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world_size))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        config = micro_trial_config(checkpoint, texts, quant=quant, lora={"rank": 4, "dropout": 0.2},
                                    train={"zero_stage": zero_stage, "max_steps": STEPS},
                                    resources={"num_workers": world_size})  # fmt: skip
        blocks = load_data(config, Path(checkpoint)).train
        zero3, cpu, cache = zero_stage == 3, torch.device("cpu"), f"{root}/cache"
        uninterrupted = _engine(config, checkpoint, cache)
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
                "trainable": {n: v.numel() for n, v in trained.items()},
            }))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("quant", "zero_stage"),
    [({"method": "int", "bits": 3, "group_size": 32}, 2), ({"method": "nf4"}, 3)],
    ids=["int3-zero2", "nf4-zero3"],
)
def test_resume_is_exact_and_checkpoints_hold_no_base(tmp_path, quant, zero_stage):
    checkpoint, texts = make_trial_checkpoint(tmp_path / "ckpt"), make_texts(tmp_path)
    mp.spawn(
        _worker, args=(WORLD, free_port(), checkpoint, texts, quant, zero_stage, str(tmp_path)), nprocs=WORLD
    )
    result = json.loads((tmp_path / "result.json").read_text())

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
        assert (mid / f).stat().st_size <= 4 * n + 256 * 1024
    optimizer_bytes = sum((mid / f).stat().st_size for f in files if f.endswith("optim_states.pt"))
    assert 12 * n <= optimizer_bytes <= 12 * n + WORLD * 256 * 1024  # fp32 master + two Adam moments

    # The final checkpoint: the adapter and the progress, which restore the trained adapter exactly
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["adapter.safetensors", "progress.json"]
    assert (tmp_path / "final" / "adapter.safetensors").stat().st_size <= 4 * n + 64 * 1024
    assert result["final_progress"] == STEPS and result["adapter_equal"] and result["adapter_moved"]
