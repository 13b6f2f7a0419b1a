"""One real trial: 2 Ray Train workers, DeepSpeed ZeRO-2, bnb NF4 micro model, logged to a real `mlflow server`."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from ray.train import UserCallback
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from orchestrator.cli import main
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from testkit.micro import micro_trial_config
from tests.mlflow_server import mlflow_server as start_mlflow_server
from tests.test_export import load_readme_snippet, rel_max_error
from trials.cache import StageCache
from trials.contract import TRIAL_KEY_TAG, stage_param, stage_tag
from trials.probe import TOP_K, at_probe
from trials.run import run_trial
from trials.tracking import flat_params, trial_key

pytestmark = pytest.mark.slow
EXPERIMENT = "e2e"


class RecordReports(UserCallback):
    """Appends what each Ray Train report carries (rank 0's metrics) to a JSON-lines file: the callback
    runs in Ray Train's controller actor, not in the test process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        record = {
            "step": metrics[0]["step"],
            "val_ppl": metrics[0].get("val_ppl"),
            "checkpoint": checkpoint is not None,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback with its own SQLite store and proxied artifacts."""
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


@pytest.fixture(scope="module")
def trial(tmp_path_factory, mlflow_server, micro_trial, local_ray):
    root = tmp_path_factory.mktemp("trial")
    checkpoint, texts = micro_trial
    # Eval at 2 and 4, a checkpoint at 3: one report of each kind before the final one (the eval at the
    # last step is not reported on its own: the final report follows).
    config = micro_trial_config(checkpoint, texts, train={"eval_every": 2, "checkpoint_every": 3})
    reports = root / "reports.jsonl"
    began = time.perf_counter()
    metrics = run_trial(
        config,
        tracking_uri=mlflow_server,
        experiment_name=EXPERIMENT,
        storage_path=str(root / "ray"),
        callbacks=[RecordReports(reports)],
        cache_path=str(root / "cache"),
    )
    seconds = time.perf_counter() - began
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return {"config": config, "metrics": metrics, "seconds": seconds, "client": client, "runs": runs,
            "root": root, "checkpoint": checkpoint, "texts": texts, "uri": mlflow_server,
            "reports": reports, "logs": logs}  # fmt: skip


def test_two_worker_trial_reports_every_metric(trial):
    metrics, config = trial["metrics"], trial["config"]
    stage_metrics = {f"{stage}_{kind}" for stage in ("quantize", "calibrate", "initialize")
                     for kind in ("seconds", "saved_seconds", "peak_memory_mb")}  # fmt: skip
    assert set(metrics) == {"val_ppl_init", "val_ppl_final", "test_ppl_final", "train_seconds", "tokens_per_second",
                            "init_peak_memory_mb", "train_peak_memory_mb", "model_size_mb", "baseline_memory_mb",
                            "stage_transfer_bytes", "stage_wait_seconds", "artifact_bytes", *stage_metrics}  # fmt: skip
    assert metrics["stage_transfer_bytes"] == 0  # both workers on one node read the cache entries in place
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values()), metrics
    assert 1 < metrics["val_ppl_final"] < 2 * 320 and 1 < metrics["val_ppl_init"] < 2 * 320
    assert 1 < metrics["test_ppl_final"] < 2 * 320 and metrics["test_ppl_final"] != metrics["val_ppl_final"]
    assert metrics["initialize_seconds"] > 0 and 0 < metrics["train_seconds"] < trial["seconds"]
    train = config.train
    tokens = train.max_steps * train.grad_accum * train.batch_size * config.data.seq_len * 2  # 2 workers
    assert metrics["tokens_per_second"] * metrics["train_seconds"] == pytest.approx(tokens)
    # per worker process: more than the model, less than the whole machine
    assert 0 < metrics["model_size_mb"] < metrics["init_peak_memory_mb"] < 64 * 1024
    assert 0 < metrics["train_peak_memory_mb"] < 64 * 1024
    # on CPU the runtime and data a worker holds before its first stage, which every peak includes
    assert (
        0
        < metrics["baseline_memory_mb"]
        < min(metrics["init_peak_memory_mb"], metrics["train_peak_memory_mb"])
    )


def test_worker_logs_carry_no_bytecode(trial):
    """datasets hashes each map function with dill, which prints the function's bytecode into a captured
    stream; Ray Train's print patch used to copy it to the worker's log (~1000 lines a trial)."""
    logs = {
        p.name: p.read_text(errors="replace")
        for p in trial["logs"].glob("worker-*")
        if p.suffix in (".out", ".err")
    }
    assert any("RayTrainWorker" in text for text in logs.values())
    bytecode = re.compile(r"^\s*\d*\s+\d+ (LOAD_GLOBAL|LOAD_FAST|RESUME)\b", re.MULTILINE)
    assert not [name for name, text in logs.items() if bytecode.search(text)]


def test_ray_trains_placement_group_cleaner_runs_without_a_warning_loop(trial):
    """Issue 26 item 8: the cleaner that removes a Train run's placement group when its controller dies polls
    the State API; without the dashboard (or with two Ray instances on the host and no RAY_ADDRESS) it logged
    "Failed to query Ray Train Controller actor state" every second and could clean nothing."""
    logs = {p.name: p.read_text(errors="replace") for p in trial["logs"].glob("worker-*")}
    assert any("PlacementGroupCleaner" in text for text in logs.values()), sorted(logs)
    assert not [name for name, text in logs.items() if "Failed to query Ray Train Controller" in text]


def test_eval_points_reach_ray_train_and_checkpoints_keep_their_steps(trial):
    reports = [json.loads(line) for line in trial["reports"].read_text().splitlines()]
    assert [(r["step"], r["val_ppl"] is not None, r["checkpoint"]) for r in reports] == [
        (2, True, False), (3, False, True), (4, False, True),
    ]  # fmt: skip
    run = trial["runs"][0]
    logged = {m.step: m.value for m in trial["client"].get_metric_history(run.info.run_id, "val_ppl")}
    assert set(logged) == {2, 4}
    assert {r["step"]: r["val_ppl"] for r in reports if r["val_ppl"] is not None} == pytest.approx(
        {2: logged[2]}
    )


def test_mlflow_run_records_params_metrics_tags_and_artifacts(trial):
    client, config = trial["client"], trial["config"]
    assert len(trial["runs"]) == 1
    run = trial["runs"][0]
    assert run.info.status == "FINISHED"
    stage_keys = {stage_param(s): run.data.params.get(stage_param(s), "") for s in ("quantize", "initialize")}
    assert all(len(key) == 24 for key in stage_keys.values()), stage_keys  # svd is not calibrated: no key
    assert run.data.params == {**flat_params(config), **stage_keys}
    expected = {"quant.method": "nf4", "lora.rank": "4", "init.method": "svd", "train.max_steps": "4",
                "train.eval_every": "2", "resources.num_workers": "2"}  # fmt: skip
    assert {k: run.data.params[k] for k in expected} == expected
    tags = run.data.tags
    assert (tags["family"], tags["bits"], tags["method"], tags["rank"]) == ("llama", "4", "svd", "4")
    assert {s: tags[stage_tag(s)] for s in ("quantize", "calibrate", "initialize")} == {
        "quantize": "computed", "calibrate": "skipped", "initialize": "computed",
    }  # fmt: skip
    assert tags["size"] and tags[TRIAL_KEY_TAG] == trial_key(config)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    # No warm-up configured: every step runs at the full rate, the first one included.
    rates = client.get_metric_history(run.info.run_id, "learning_rate")
    assert [m.value for m in sorted(rates, key=lambda m: m.step)] == [config.train.learning_rate] * 4
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")) == [2, 4]
    assert run.data.metrics["val_ppl_final"] == pytest.approx(trial["metrics"]["val_ppl_final"])
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter

    def files(path: str = ""):
        for f in client.list_artifacts(run.info.run_id, path):
            yield from files(f.path) if f.is_dir else [f]

    logged = {f.path: f.file_size for f in files()}
    assert run.data.metrics["artifact_bytes"] == sum(logged.values())  # issue 27: the bytes it logged
    # The probe: top-32 logits and their tokens (fp32, int32) + logsumexp per position, not the full logits.
    blocks, seq = 2, config.data.seq_len
    assert logged["probe/logits.safetensors"] < blocks * seq * (TOP_K * 8 + 4 + 8) + 1024
    ds = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(trial["root"]))
        ).read_text()
    )
    assert ds["zero_optimization_stage"] == 2 and ds["world_size"] == 2 and ds["train_batch_size"] == 2 * 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 1)
    assert ds["bf16_enabled"] is False and ds["fp16_enabled"] is False and ds["gradient_clipping"] == 1.0
    # Resolved, not the dict given: DeepSpeed's defaults are there, which the given dict leaves out.
    assert ds["zero_optimization"]["stage"] == 2 and "reduce_bucket_size" in ds["zero_optimization"]
    assert "reduce_bucket_size" not in ds["user_config"]["zero_optimization"]
    assert ds["optimizer"]["params"]["lr"] == config.train.learning_rate
    assert ds["scheduler"] == {"type": "LambdaLR", "warmup_steps": 0}


def test_logged_adapter_reloads_through_plain_peft_with_the_same_logits(trial):
    client, run = trial["client"], trial["runs"][0]
    local = Path(client.download_artifacts(run.info.run_id, "", str(trial["root"] / "download")))
    probe = load_file(local / "probe" / "logits.safetensors")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(
        trial["checkpoint"], quantization_config=quantization, device_map="cpu"
    )
    model = PeftModel.from_pretrained(base, local / "adapter").eval()
    exact_cpu_4bit(model)  # the trial evaluated with bnb's exact fp32 CPU path; use the same here
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
        without_adapter = model.get_base_model()
        with model.disable_adapter():
            base_logits = without_adapter(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(at_probe(logits, probe), probe["top_logits"], atol=1e-4, rtol=1e-4)
    assert (
        at_probe(base_logits, probe) - probe["top_logits"]
    ).abs().max() > 1e-3  # the adapter changes the output


def test_same_trial_again_reuses_its_finished_run(trial):
    config, client = trial["config"], trial["client"]
    again = run_trial(
        config, tracking_uri=trial["uri"], experiment_name=EXPERIMENT, storage_path=str(trial["root"] / "ray")
    )
    assert again == pytest.approx(trial["metrics"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_export_loads_with_stock_transformers_and_peft_and_gives_the_trials_logits(trial, tmp_path):
    """`quailora export` from the tracking server; the README's snippet loads it (no project import)."""
    run_id = trial["runs"][0].info.run_id
    for out, flags, bound in ((tmp_path / "export", [], 1e-2), (tmp_path / "merged", ["--merged"], 1e-5)):
        assert main(["export", run_id, str(out), "--tracking-uri", trial["uri"], *flags]) == 0
        loaded = load_readme_snippet(out)
        # bnb's stock CPU path computes NF4 layers through bf16 (the trial used the exact fp32 one)
        assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= bound


def test_another_learning_rate_on_one_worker_reuses_every_stage(trial):
    """A learning-rate arm shares the quantize and initialize keys: both come from the cache, and the
    model it starts from is the first trial's (same perplexity before fine-tuning)."""
    config = micro_trial_config(trial["checkpoint"], trial["texts"], name="lr-arm",
                                train={"learning_rate": 1e-3, "max_steps": 1}, resources={"num_workers": 1})  # fmt: skip
    cache = StageCache(trial["root"] / "cache")
    computed = {e.stage: e.compute_seconds for e in cache.entries()}
    metrics = run_trial(config, tracking_uri=trial["uri"], experiment_name=EXPERIMENT,
                        storage_path=str(trial["root"] / "ray"), cache_path=str(cache.root))  # fmt: skip
    client = trial["client"]
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.trial_name = 'lr-arm'"
    )
    assert {s: run.data.tags[stage_tag(s)] for s in ("quantize", "calibrate", "initialize")} == {
        "quantize": "reused", "calibrate": "skipped", "initialize": "reused",
    }  # fmt: skip
    assert {e.stage for e in cache.entries()} == {"quantize", "initialize"} and len(cache.entries()) == 2
    assert metrics["quantize_saved_seconds"] == pytest.approx(computed["quantize"])
    assert metrics["initialize_saved_seconds"] == pytest.approx(computed["initialize"])
    first = trial["runs"][0].data.params
    assert all(run.data.params[stage_param(s)] == first[stage_param(s)] for s in ("quantize", "initialize"))
    assert metrics["val_ppl_init"] == pytest.approx(trial["metrics"]["val_ppl_init"], rel=1e-5)


def test_zero_start_arm_reuses_the_init_entry_and_exports_as_one_stock_adapter(trial, tmp_path):
    """init.zero_start on one worker: the svd init entry is the first trial's (same key), the logged adapter
    holds the frozen start adapter in peft's start/ subfolder, and the export (one rank-2r adapter, and the
    merged model) gives the trial's logits. Runs last: it adds a run to the experiment."""
    config = micro_trial_config(trial["checkpoint"], trial["texts"], name="zero-start",
                                init={"method": "svd", "zero_start": True},
                                train={"max_steps": 1}, resources={"num_workers": 1})  # fmt: skip
    run_trial(config, tracking_uri=trial["uri"], experiment_name=EXPERIMENT,
              storage_path=str(trial["root"] / "ray"), cache_path=str(trial["root"] / "cache"))  # fmt: skip
    client = trial["client"]
    (run,) = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.trial_name = 'zero-start'"
    )
    assert run.data.tags[stage_tag("initialize")] == "reused" and run.data.params["init.zero_start"] == "True"
    assert (
        run.data.params[stage_param("initialize")] == trial["runs"][0].data.params[stage_param("initialize")]
    )
    assert "adapter/start/adapter_model.safetensors" in {
        f.path for f in client.list_artifacts(run.info.run_id, "adapter/start")
    }
    for out, flags, bound in ((tmp_path / "export", [], 1e-2), (tmp_path / "merged", ["--merged"], 1e-5)):
        assert main(["export", run.info.run_id, str(out), "--tracking-uri", trial["uri"], *flags]) == 0
        loaded = load_readme_snippet(out)
        assert rel_max_error(loaded["top"], loaded["probe"]["top_logits"]) <= bound
    assert json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())["r"] == 2 * 4
