"""What each Ray Train worker of a trial runs, as a recipe of named stages:

load data -> quantize -> calibrate -> attach adapter -> initialize -> evaluate the start -> fine-tune ->
evaluate -> save. The first three stages and the init are cached across trials (trials/stages.py).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from transformers import AutoTokenizer

from quailora.base_layers import eval_path
from quailora.initializers import needs_gram
from quailora.peak_memory import PhasePeaks, held_memory_mb, peak_memory_mb, reset_peak_memory
from quailora.peft_init import save_base_residuals
from quailora.text import perplexity, tokenize_blocks
from quailora.zero_start import start_parameters
from trials import stages
from trials.cache import StageCache, StageOutcome, tree_size
from trials.checkpoint_policy import CheckpointPolicy
from trials.checkpointing import report_final
from trials.config import TrialConfig
from trials.contract import (
    ADAPTER_ARTIFACT,
    ARTIFACT_BYTES,
    BASE_ARTIFACT,
    BASELINE_MEMORY,
    DEEPSPEED_ARTIFACT,
    EVAL_PATH_TAG,
    MODEL_SIZE_MB,
    PROBE_ARTIFACT,
    PROBE_LOGITS,
    RESUMED_FROM_STEP,
    STAGE_TRANSFER_BYTES,
    STAGE_WAIT_SECONDS,
    STOPPED_AT_STEP,
    TEST_PPL_FINAL,
    TOKENS_PER_SECOND,
    TRAIN_SECONDS,
    UNCALIBRATED_TAG,
    VAL_PPL_FINAL,
    VAL_PPL_INIT,
    stage_param,
    stage_peak_memory,
    stage_saved_seconds,
    stage_seconds,
    stage_tag,
)
from trials.deepspeed_config import compute_dtype, resolve_precision
from trials.evaluation import lm_eval_accuracies
from trials.finetune import fine_tune
from trials.probe import make_probe
from trials.quantized_model import serialized_size_mb
from trials.sources import load_texts, token_blocks
from trials.stage_transfer import EntryTransfer
from trials.tracking import log_metrics, mark_failed

STOP_METRIC = "stopped_nonfinite_loss"


class RankZeroTracker:
    """MLflow logging from rank 0 only; other ranks call the same methods and nothing happens."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool) -> None:
        self.client = MlflowClient(tracking_uri) if enabled else None
        self.run_id = run_id
        self.artifact_bytes = 0  # what this trial logged as artifacts

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.client:
            log_metrics(self.client, self.run_id, values, step, int(time.time() * 1000))

    def artifacts(self, local_dir: str, path: str) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, local_dir, path)
            self.artifact_bytes += tree_size(Path(local_dir))

    def tag(self, name: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, name, value)

    def json_artifact(self, name: str, value: dict) -> None:
        if self.client:
            text = json.dumps(value, indent=2, default=str)
            self.client.log_text(self.run_id, text, name)
            self.artifact_bytes += len(text.encode())

    def stages(self, outcomes: list[StageOutcome]) -> None:
        """Each stage's status as a tag (a restart may reuse what the first attempt computed) and key as a param."""
        if self.client:
            for outcome in outcomes:
                self.client.set_tag(self.run_id, stage_tag(outcome.stage), outcome.status)
                if outcome.digest:
                    self.client.log_param(self.run_id, stage_param(outcome.stage), outcome.digest)

    def changed_base(self, updates: dict) -> None:
        """A method that changed the base (LoftQ) leaves what rebuilds it from the checkpoint: thin factors,
        not a copy of the base (`quailora export` writes the changed base from these)."""
        if self.client:
            with tempfile.TemporaryDirectory() as tmp:
                if save_base_residuals(updates, tmp):
                    self.artifacts(tmp, BASE_ARTIFACT)

    def failed(self, reason: str) -> None:
        if self.client:
            mark_failed(self.client, self.run_id, reason)


@dataclass
class TrialData:
    tokenizer: object
    train: torch.Tensor  # [n, 2, seq_len]: input ids and labels, paired rows (see finetune.micro_batch)
    validation: torch.Tensor
    validation_labels: torch.Tensor
    calibration: torch.Tensor | None
    test: tuple[torch.Tensor, torch.Tensor] | None  # input ids and labels; None without data.test


def load_data(config: TrialConfig, checkpoint: Path) -> TrialData:
    """Token blocks of the training and validation data (labels mask prompts out of the loss), and of the
    calibration text for calibrated methods."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    data = config.data
    shape = {"template": data.template, "text_field": data.text_field}
    train = token_blocks(tokenizer, data.train, data.seq_len, field="data.train", **shape)
    validation, validation_labels = token_blocks(tokenizer, data.validation, data.seq_len,
                                                 field="data.validation", max_blocks=data.max_eval_sequences,
                                                 **shape)  # fmt: skip
    test = None
    if data.test and config.eval.perplexity:
        test = token_blocks(tokenizer, data.test, data.seq_len, field="data.test",
                            max_blocks=data.max_eval_sequences, **shape)  # fmt: skip
    calibration = calibration_ids(config, tokenizer)
    return TrialData(tokenizer, torch.stack(train, dim=1), validation, validation_labels, calibration, test)


def calibration_ids(config: TrialConfig, tokenizer) -> torch.Tensor | None:
    """The calibration sequences' token ids, for calibrated methods; None for the others."""
    if not needs_gram(config.init.method):
        return None
    cal = config.calibration
    texts = load_texts(cal.dataset, "calibration.dataset", cal.text_field)
    return tokenize_blocks(tokenizer, texts, cal.seq_len, cal.num_sequences)


def stage_metrics(outcomes: list[StageOutcome]) -> dict[str, float]:
    """Seconds each stage took in this trial, and the compute seconds a reused entry saved it."""
    values = {}
    for outcome in outcomes:
        values[stage_seconds(outcome.stage)] = outcome.seconds
        values[stage_saved_seconds(outcome.stage)] = outcome.saved_seconds
    return values


def _all_max(values: dict[str, float], device: torch.device) -> dict[str, float]:
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist(), strict=True))


def _phase_peaks(phase: str, peaks: dict[str, float], device: torch.device) -> dict[str, float]:
    """``<phase>_peak_memory_mb`` etc.: each the max over the workers."""
    return {f"{phase}_{name}": value for name, value in _all_max(peaks, device).items()}


def _save_adapter_and_probe(
    engine, config: TrialConfig, probe_ids: torch.Tensor, tracker: RankZeroTracker
) -> None:
    """Log the adapter as a peft directory (safetensors) and the probe of the final model (trials/probe.py).
    With init.zero_start the directory also holds the frozen start adapter, in peft's subfolder ``start/``
    (quailora/zero_start.py; `quailora export` combines the two into one adapter)."""
    model = engine.module
    saved = [p for p in model.parameters() if p.requires_grad]
    if config.init.zero_start:
        saved += start_parameters(model)  # written too: gathered under ZeRO-3 like the trained ones
    model.eval()
    with torch.no_grad():  # every rank: ZeRO-3 forwards are collective
        probe = make_probe(probe_ids, model(input_ids=probe_ids).logits)
    with tempfile.TemporaryDirectory() as tmp:
        with deepspeed.zero.GatheredParameters(saved, enabled=config.train.zero_stage == 3):
            if dist.get_rank() == 0:
                model.save_pretrained(f"{tmp}/adapter", safe_serialization=True)
                Path(f"{tmp}/probe").mkdir()
                save_file(probe, f"{tmp}/probe/{PROBE_LOGITS}")
        tracker.artifacts(f"{tmp}/adapter", ADAPTER_ARTIFACT)
        tracker.artifacts(f"{tmp}/probe", PROBE_ARTIFACT)


def evaluate_final(
    model, config: TrialConfig, data: TrialData, evaluate, last_val_ppl: float | None = None
) -> dict[str, float]:
    """Perplexity after fine-tuning (validation; test where data.test is set) and the lm-eval accuracies, on
    every rank (ZeRO-3 forwards are collective), each scoring its share of the rows and requests.
    `last_val_ppl`: the validation perplexity the last training step already measured on these weights
    (FineTuned.last_val_ppl), not computed again."""
    results = {}
    if config.eval.perplexity:
        results[VAL_PPL_FINAL] = evaluate(model) if last_val_ppl is None else last_val_ppl
    if data.test is not None:
        results[TEST_PPL_FINAL] = evaluate(model, data.test)
    if config.eval.lm_eval_tasks:
        # every rank scores its share of the requests (trials.evaluation.ProcessGroupLM)
        accuracies = [lm_eval_accuracies(model, data.tokenizer, config.eval, config.train.batch_size)]
        dist.broadcast_object_list(accuracies, src=0)  # only rank 0 gets lm-eval's results
        results.update(accuracies[0])
    return results


def train_trial(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker for one trial (config and plan arrive as plain dicts)."""
    config = TrialConfig.model_validate(loop_config["config"])
    checkpoint = Path(loop_config["checkpoint"])
    device = ray.train.torch.get_device()
    precision = resolve_precision(config.train.precision, device)
    dtype = compute_dtype(precision, config.model.dtype)
    tracker = RankZeroTracker(
        loop_config["tracking_uri"], loop_config["run_id"], enabled=dist.get_rank() == 0
    )
    transfer = EntryTransfer(ray.train.get_context().get_node_rank(), device, loop_config["run_id"])
    peaks = PhasePeaks(device)  # the init phase: loading data, the stages (each measured), the first eval
    ctx = stages.StageContext(
        config, checkpoint, device, dtype, StageCache(loop_config["cache_path"]), transfer, peaks
    )

    data = load_data(config, checkpoint)
    torch.manual_seed(config.seed)
    measured: dict[str, float] = {}

    def before_adapter(base) -> None:
        measured["model_size_mb"] = serialized_size_mb(base)
        if config.train.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()

    baseline = held_memory_mb(device)
    model, outcomes, updates = stages.prepare_model(
        ctx, data.calibration, loop_config["target_names"], before_adapter
    )
    transfer.release()
    precomputed = set(loop_config.get("precomputed", ()))  # what the sweep's stage jobs computed for it
    outcomes = [
        dataclasses.replace(o, status="precomputed")
        if o.status == "reused" and o.digest in precomputed
        else o
        for o in outcomes
    ]
    tracker.stages(outcomes)
    tracker.changed_base(updates)
    tracker.tag(EVAL_PATH_TAG, eval_path(device, dtype))
    if (uncalibrated := stages.uncalibrated_note(updates)) is not None:
        tracker.tag(UNCALIBRATED_TAG, uncalibrated)

    def evaluate(module, blocks=(data.validation, data.validation_labels)) -> float:
        return perplexity(module, blocks[0], config.train.batch_size, device, blocks[1])

    summary: dict[str, float] = {
        **stage_metrics(outcomes),
        STAGE_WAIT_SECONDS: loop_config.get("waited_seconds", 0.0) + sum(o.waited_seconds for o in outcomes),
        STAGE_TRANSFER_BYTES: transfer.sent_bytes,
        MODEL_SIZE_MB: measured["model_size_mb"],
    }
    summary[VAL_PPL_INIT] = evaluate(model)
    stage_peaks = {stage_peak_memory(o.stage): o.peak_memory_mb for o in outcomes}
    summary.update(_all_max({**stage_peaks, BASELINE_MEMORY: baseline}, device))
    peaks.end_span()
    summary.update(_phase_peaks("init", peaks.whole, device))
    tracker.metrics(dict(summary), 0)
    logged_at_start = set(summary)
    reset_peak_memory(device)  # from here on: fine-tuning and the final evaluation

    tuned = fine_tune(
        model,
        config,
        data.train,
        device,
        precision,
        CheckpointPolicy(**loop_config["checkpoint_policy"]),
        log=tracker.metrics,
        evaluate=evaluate,
        log_config=lambda resolved: tracker.json_artifact(DEEPSPEED_ARTIFACT, resolved),
    )
    engine, progress = tuned.engine, tuned.progress
    summary[RESUMED_FROM_STEP] = tuned.resumed_from_step
    if tuned.stop_reason:
        summary.update({STOP_METRIC: 1.0, STOPPED_AT_STEP: progress.step})
        tracker.metrics({STOP_METRIC: 1.0}, progress.step)
        tracker.failed(tuned.stop_reason)
        ray.train.report(summary)  # no checkpoint: the weights are not finite any more
        return

    summary[TRAIN_SECONDS] = progress.train_seconds
    summary[TOKENS_PER_SECOND] = progress.tokens / progress.train_seconds if progress.train_seconds else 0.0
    summary.update(evaluate_final(engine.module, config, data, evaluate, tuned.last_val_ppl))
    _save_adapter_and_probe(
        engine, config, data.validation[: min(2, len(data.validation))].to(device), tracker
    )
    summary.update(_phase_peaks("train", peak_memory_mb(device), device))
    summary[ARTIFACT_BYTES] = float(tracker.artifact_bytes)  # rank 0's: it logs them
    tracker.metrics({k: v for k, v in summary.items() if k not in logged_at_start}, config.train.max_steps)
    # Ray Train's Result carries the metrics of the last checkpoint, so the final report comes with one
    # (a restart after this point re-evaluates instead of re-training).
    report_final(engine, progress, summary, zero3=config.train.zero_stage == 3)
