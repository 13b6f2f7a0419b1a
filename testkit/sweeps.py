"""The GPU check's one-trial sweep: its spec, its outcome read back from MLflow with plan's memory estimate
beside it, and what that outcome must show. tests/test_gpu.py runs it on a small checkpoint,
scripts/gpu_check.py on its own larger one (testkit/__init__.py says why this lives top-level).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MIB = 2**20


def one_trial_sweep(name: str, checkpoint: Path, texts: dict, storage: Path, *, gpu: bool, **train) -> dict:
    """A sweep of one trial: NF4, calibrated QuAILoRA init (calibration on the device), ZeRO-2, bf16,
    gradient checkpointing; ``train`` updates its train section."""
    return {
        "name": name,
        "base": {
            "model": {"path": str(checkpoint), "dtype": "bfloat16"},
            "quant": {"method": "nf4", "bits": 4},
            "lora": {"rank": 16, "alpha": 32.0},
            "init": {"method": "quailora", "options": {"iterations": 5}},
            "calibration": {"dataset": str(texts["calibration"]), "num_sequences": 8, "seq_len": 128},
            "data": {"train": str(texts["train"]), "validation": str(texts["validation"]), "seq_len": 128,
                     "max_eval_sequences": 16},
            "train": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "zero_stage": 2, "precision": "bf16",
                      "gradient_checkpointing": True, "eval_every": 5, "checkpoint_every": 10, **train},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": gpu, "gpus_per_worker": 1 if gpu else 0},
        },
        "space": {"seed": {"grid": [0]}},
        "search": {"max_failures": 0},
        "devices": {"kind": "gpu" if gpu else "cpu", "memory_gb": 80 if gpu else 16},
        "storage_path": str(storage),
        "tracking_uri": f"sqlite:///{storage}/mlflow.db",
        "driver_cpus": 0.5,
    }  # fmt: skip


def sweep_outcome(sweep: dict, scratch: Path) -> dict:
    """The finished sweep's one trial, read back from MLflow, with plan's memory estimate beside it."""
    from mlflow.tracking import MlflowClient

    from orchestrator.expand import expand
    from orchestrator.experiment import ExperimentState
    from orchestrator.plan import plan_trials
    from orchestrator.sweep_config import SweepConfig
    from orchestrator.tracking import child_runs

    state = ExperimentState.load(str(Path(sweep["storage_path"]) / sweep["name"]))
    client = MlflowClient(state.tracking_uri)
    (run,) = child_runs(client, state.parent_run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for folder in ("adapter", "probe"):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder)}
    resolved = json.loads(
        Path(client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(scratch))).read_text()
    )
    (planned,) = plan_trials(expand(SweepConfig.model_validate(sweep)))
    return {"status": run.info.status, "metrics": run.data.metrics, "tags": run.data.tags,
            "artifacts": sorted(artifacts), "deepspeed": resolved,
            "estimate_mb": {"peak": planned.memory.peak / MIB, "training": planned.memory.training / MIB,
                            "calibration": planned.memory.calibration / MIB}}  # fmt: skip


def check_sweep_outcome(outcome: dict, device: str) -> None:
    """What the one-trial sweep must have produced (``device``: "cuda" or "cpu"); AssertionError if not."""
    metrics, tags = outcome["metrics"], outcome["tags"]
    assert outcome["status"] == "FINISHED"
    assert math.isfinite(metrics["val_ppl_final"]) and metrics["val_ppl_final"] < metrics["val_ppl_init"]
    assert tags["quailora.eval_path"] == f"{device}-bfloat16"
    assert tags["quailora.stage.calibrate"] == "computed"
    assert (
        outcome["deepspeed"]["bf16_enabled"] is True and outcome["deepspeed"]["zero_optimization_stage"] == 2
    )
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "probe/logits.safetensors",
            "deepspeed_config.json"} <= set(outcome["artifacts"])  # fmt: skip
    for phase in ("init", "train"):
        assert metrics[f"{phase}_peak_memory_mb"] > metrics["model_size_mb"] > 0
        if device == "cuda":  # the caching allocator holds at least what it handed out
            assert metrics[f"{phase}_peak_reserved_mb"] >= metrics[f"{phase}_peak_memory_mb"]
            assert metrics[f"{phase}_device_used_mb"] >= metrics[f"{phase}_peak_reserved_mb"] * 0.5
