"""QA-LoRA selected from a trial config: group-wise INT-4 base, pooled adapter, calibrated init, ZeRO-3,
lm-eval on the in-memory model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orchestrator.cli import main
from quailora.qalora.adapter import load_groupwise_adapter
from quailora.quantizers.groupwise.layer import quantize_model_groupwise
from testkit.micro import micro_trial_config
from tests.test_export import load_readme_snippet, rel_max_error
from trials.probe import at_probe
from trials.run import run_trial
from trials.tracking import default_tracking_uri

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trial(tmp_path_factory, micro_trial, local_ray):
    root = tmp_path_factory.mktemp("qalora")
    checkpoint = micro_trial[0]
    config = micro_trial_config(
        *micro_trial,
        quant={"method": "int", "bits": 4, "group_size": 16},
        init={"method": "qalora_closed_form"},
        train={"zero_stage": 3},
        eval={
            "lm_eval_tasks": ["reference:cloze"],
            "lm_eval_limit": 8,
        },  # ZeRO-3: the ranks split its requests
    )
    uri = default_tracking_uri(root)
    metrics = run_trial(config, tracking_uri=uri, experiment_name="qalora", storage_path=str(root / "ray"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("qalora").experiment_id])
    return {
        "metrics": metrics,
        "client": client,
        "run": run,
        "root": root,
        "checkpoint": checkpoint,
        "uri": uri,
    }


def test_qalora_trial_reports_quality_and_a_smaller_base(trial):
    metrics, run = trial["metrics"], trial["run"]
    assert run.info.status == "FINISHED"
    assert (run.data.tags["quantizer"], run.data.tags["bits"], run.data.tags["method"]) == (
        "int", "4", "qalora_closed_form",
    )  # fmt: skip
    assert 1 < metrics["val_ppl_init"] < 2 * 320 and 1 < metrics["val_ppl_final"] < 2 * 320
    assert metrics["calibrate_seconds"] > 0 and metrics["tokens_per_second"] > 0
    assert 0 <= metrics["lmeval_quailora_cloze_acc"] <= 1
    assert run.data.metrics["lmeval_quailora_cloze_acc"] == metrics["lmeval_quailora_cloze_acc"]
    full_precision = sum(f.stat().st_size for f in trial["checkpoint"].glob("*.safetensors"))
    # codes (4 bits) + float16 scales and float32 zeros per group of 16: well under half of fp32
    assert 0 < metrics["model_size_mb"] * 2**20 < 0.5 * full_precision
    ds = json.loads(
        Path(
            trial["client"].download_artifacts(run.info.run_id, "deepspeed_config.json", str(trial["root"]))
        ).read_text()
    )
    assert ds["zero_optimization_stage"] == 3 and ds["world_size"] == 2


def test_qalora_adapter_reloads_on_a_fresh_groupwise_base_with_the_same_logits(trial):
    local = Path(trial["client"].download_artifacts(trial["run"].info.run_id, "", str(trial["root"] / "dl")))
    probe = load_file(local / "probe" / "logits.safetensors")
    config = json.loads((local / "adapter" / "adapter_config.json").read_text())
    assert config["use_qalora"] and config["qalora_group_size"] == 16
    base = quantize_model_groupwise(AutoModelForCausalLM.from_pretrained(trial["checkpoint"]), 4, 16)
    model = load_groupwise_adapter(base, local / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(at_probe(logits, probe), probe["top_logits"], atol=1e-4, rtol=1e-4)
    assert (at_probe(base_logits, probe) - probe["top_logits"]).abs().max() > 1e-3


def test_export_reproduces_logits_and_stock_lm_eval_gives_the_logged_accuracy(trial, tmp_path):
    """The QA-LoRA export (compressed-tensors INT-4 base and the equal plain LoRA adapter) through the README's
    snippet, its merged INT-4 model, and the README's stock `lm_eval` command as a subprocess."""
    run_id, uri = trial["run"].info.run_id, trial["uri"]
    for out, flags in ((tmp_path / "export", []), (tmp_path / "merged", ["--merged"])):
        assert main(["export", run_id, str(out), "--tracking-uri", uri, *flags]) == 0
        loaded = load_readme_snippet(out)
        assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= 1e-5

    command = re.search(r"```bash\n(.*?)```", (tmp_path / "export" / "README.md").read_text(), re.S).group(1)
    assert "peft=" in command and "--limit 8" in command and "--include_path" in command
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", f"{command.strip()} --output_path {tmp_path / 'lm_eval'}"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "lm_eval").rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["quailora_cloze"]["acc,none"]
    assert accuracy == trial["metrics"]["lmeval_quailora_cloze_acc"]
