"""A stage job: quantize, calibrate and initialize computed ahead of the sweep's trials that share them.

One Ray Train run per (quantized base, calibration) of the sweep (orchestrator/stage_graph.py plans them),
with as many workers as the cluster can give it: the calibration is data-parallel over all of them and
each init key's decoder layers are shared out among them, exactly as inside a trial (trials/stages.py),
which is what runs here (stages.prepare_model), one init key after another. Its entries land in the shared stage cache, where
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

from trials import stages
from trials.cache import StageCache, tree_size
from trials.config import TrialConfig
from trials.deepspeed_config import compute_dtype, resolve_precision
from trials.stage_transfer import EntryTransfer
from trials.worker import calibration_ids

RECORDS_FILE = "stage_records.json"


def compute_stages(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: the stages of each init key in ``loop_config["trials"]``."""
    device = ray.train.torch.get_device()
    cache = StageCache(loop_config["cache_path"])
    # One transfer for the whole job: the Grams and base its init keys share reach another node once.
    transfer = EntryTransfer(ray.train.get_context().get_node_rank(), device, loop_config["name"])
    records = []
    ids = None  # the job's trials share one calibration (or none): tokenized once, by the first
    for n, item in enumerate(loop_config["trials"]):
        config = TrialConfig.model_validate(item["config"])
        checkpoint = Path(item["checkpoint"])
        dtype = compute_dtype(resolve_precision(config.train.precision, device), config.model.dtype)
        ctx = stages.StageContext(config, checkpoint, device, dtype, cache, transfer)
        if n == 0:
            ids = calibration_ids(config, AutoTokenizer.from_pretrained(checkpoint))
        torch.manual_seed(config.seed)
        model, outcomes, _ = stages.prepare_model(ctx, ids, item["target_names"])
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
                for o in outcomes
                if o.digest
            }  # fmt: skip
        )
        del model
    transfer.release()
    # Ray Train's Result carries the metrics of a report with a checkpoint only: the records travel as one.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, RECORDS_FILE).write_text(json.dumps(records))
        ray.train.report(
            {"records": json.dumps(records)}, checkpoint=ray.train.Checkpoint.from_directory(tmp)
        )
