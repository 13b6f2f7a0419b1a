"""A stage job: quantize, calibrate and initialize computed ahead of the sweep's trials that share them.

One Ray Train run per (quantized base, calibration) of the sweep (orchestrator/stage_graph.py plans them),
with as many workers as the cluster can give it: the calibration is data-parallel over all of them and
each init key's decoder layers are shared out among them, exactly as inside a trial (trials/stages.py),
which is what runs here, one init key after another. Its entries land in the shared stage cache, where
the trials then find them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from quailora.quantizers.bnb.layers import exact_cpu_4bit
from trials import stages
from trials.adapters import build_adapter
from trials.cache import StageCache, tree_size
from trials.config import TrialConfig
from trials.deepspeed_config import compute_dtype, resolve_precision
from trials.worker import calibration_ids

RECORDS_FILE = "stage_records.json"


def compute_stages(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: the stages of each init key in ``loop_config["trials"]``."""
    device = ray.train.torch.get_device()
    cache = StageCache(loop_config["cache_path"])
    records = []
    for item in loop_config["trials"]:
        config = TrialConfig.model_validate(item["config"])
        checkpoint, targets = Path(item["checkpoint"]), item["target_names"]
        dtype = compute_dtype(resolve_precision(config.train.precision, device), config.model.dtype)
        ctx = stages.StageContext(config, checkpoint, device, dtype, cache,
                                  node=ray.train.get_context().get_node_rank(), run_id=loop_config["name"])  # fmt: skip
        torch.manual_seed(config.seed)
        base, quantized, q = stages.quantize(ctx)
        ids = calibration_ids(config, AutoTokenizer.from_pretrained(checkpoint))
        grams, calibrated, c = stages.calibrate(ctx, ids)
        model = build_adapter(base, config, targets)
        if device.type == "cpu":
            exact_cpu_4bit(model)
        _, i, _ = stages.initialize(ctx, model, grams, targets, quantized, calibrated)
        ctx.transfer.release()
        records.append(
            {
                o.stage: {
                    "status": o.status,
                    "digest": o.digest,
                    "seconds": o.seconds,
                    "bytes": tree_size(o.path)
                    if o.status == "computed" and o.path and dist.get_rank() == 0
                    else 0,
                }
                for o in (q, c, i)
                if o.digest
            }  # fmt: skip
        )
        del model, base, grams
    # Ray Train's Result carries the metrics of a report with a checkpoint only: the records travel as one.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RECORDS_FILE).write_text(json.dumps(records))
        ray.train.report(
            {"records": json.dumps(records)}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )
