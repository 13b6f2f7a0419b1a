"""The trial's fine-tuning stage in bf16 and fp16 on 2 gloo workers (no Ray): DeepSpeed runs the precision
the trial asked for, and ZeRO-3 partitions the NF4 base stored in bf16 (bnb_4bit_quant_storage).

The stages and the fine-tuning loop are the trial's own; only Ray Train's session is absent, so
``ray.train.get_checkpoint`` (no checkpoint to resume from) is replaced in the workers. The same settings
run through Ray on a GPU in tests/test_gpu.py, and bf16 through a Ray sweep in tests/test_gpu_check.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testkit.micro import micro_trial_config
from tests.ports import free_port


def train_worker(rank, world_size, port, checkpoint, texts, train, out, device_type="cpu"):
    """One worker of the trial's stages (quantize, initialize) and its fine-tuning; writes what it saw to
    ``out/rank<r>.json``. ``device_type`` cuda: NCCL, worker r on GPU r (tests/test_gpu.py)."""
    import bitsandbytes as bnb
    import ray.train

    from quailora.quantizers.bnb.layers import exact_cpu_4bit
    from trials import stages
    from trials.adapters import build_adapter
    from trials.cache import StageCache
    from trials.checkpoint_policy import checkpoint_policy
    from trials.contract import VAL_PPL_FINAL
    from trials.deepspeed_config import compute_dtype, resolve_precision
    from trials.finetune import fine_tune
    from trials.validation import validate_trial
    from trials.worker import evaluate_final, load_data

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank)
    )  # as Ray Train does
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    ray.train.get_checkpoint = lambda: None  # no Ray Train session: nothing to resume from
    try:
        config = micro_trial_config(checkpoint, texts, resources={"num_workers": world_size},
                                    train={**train, "max_steps": 3, "checkpoint_every": 0, "eval_every": 3})  # fmt: skip
        targets = validate_trial(config).target_names
        precision = resolve_precision(config.train.precision, device)
        dtype = compute_dtype(precision, config.model.dtype)
        ctx = stages.StageContext(config, checkpoint, device, dtype, StageCache(f"{out}/cache"))
        base, quantized, _ = stages.quantize(ctx)
        data = load_data(config, checkpoint)
        model = build_adapter(base, config, targets)
        if device.type == "cpu":
            exact_cpu_4bit(model)
        stages.initialize(ctx, model, None, targets, quantized, None)
        packed = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        record = {"storage": sorted({str(p.dtype) for p in packed}), "losses": [], "numel": packed[0].numel()}
        evaluated = []  # which blocks each evaluation scored

        def evaluate(module, blocks=(data.validation,)) -> float:
            evaluated.append("test" if blocks is data.test else "validation")
            return 7.0

        tuned = fine_tune(
            model, config, data.train, device, precision, checkpoint_policy(config.train, 0),
            log=lambda values, step: record["losses"].append(values["train_loss"]),
            evaluate=evaluate,
            log_config=lambda resolved: record.update(resolved=resolved),
        )  # fmt: skip
        final = evaluate_final(model, config, data, evaluate, tuned.last_val_ppl)
        record.update(evaluated=evaluated, val_ppl_final=final[VAL_PPL_FINAL])
        if config.train.zero_stage == 3:  # each worker now holds its share of the packed base
            record["partition"] = [p.ds_tensor.numel() for p in packed[:1]] + [packed[0].ds_numel]
        record["stop_reason"] = tuned.stop_reason
        record["precision"] = precision
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(record, f, default=str)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("train", "engine_flag"),
    [({"zero_stage": 3, "precision": "bf16"}, "bf16_enabled"), ({"zero_stage": 2, "precision": "fp16"}, "fp16_enabled")],
)  # fmt: skip
def test_fine_tuning_runs_the_asked_precision(micro_trial, tmp_path, train, engine_flag):
    if train["precision"] == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            pytest.skip("DeepSpeed's CPU accelerator has no fp16 on this CPU (needs AVX512-FP16 / AMX-FP16)")
    checkpoint, texts = micro_trial
    world_size = 2
    mp.spawn(
        train_worker,
        args=(world_size, free_port(), checkpoint, texts, train, str(tmp_path)),
        nprocs=world_size,
    )
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    for record in records:
        resolved = record["resolved"]
        assert resolved[engine_flag] is True
        assert resolved["zero_optimization_stage"] == train["zero_stage"]
        assert record["stop_reason"] is None and len(record["losses"]) == 3
        # the last step was an eval point: the final validation perplexity is its value, not scored again
        assert record["evaluated"] == ["validation", "test"] and record["val_ppl_final"] == 7.0
        assert all(math.isfinite(loss) for loss in record["losses"])
    if train["precision"] == "fp16":
        assert records[0]["resolved"]["fp16"]["initial_scale_power"] == 16  # dynamic loss scaling
        assert records[0]["storage"] == ["torch.uint8"]
    else:  # ZeRO-3 shards the packed NF4 bytes, stored as bf16 so they can be partitioned like any weight
        assert records[0]["storage"] == ["torch.bfloat16"]
        for record in records:
            share, whole = record["partition"]
            assert whole == records[0]["numel"] and share == math.ceil(whole / world_size)
