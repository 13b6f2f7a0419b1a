"""The names a trial and the orchestrator agree on: the metrics a trial logs and returns, and its MLflow tags.

Defined once here; the worker, the trial runner, the sweep schema (ASHA's metric), the Tune side, status
and the report import them. Plain strings, no imports: the sweep schema loads this without MLflow or Ray.
"""

from __future__ import annotations

# Logged by rank 0 at every optimizer step (TRAIN_LOSS) or eval point (VAL_PPL), and reported to Ray Train
# with STEP at each eval point, where Tune's scheduler (ASHA) reads them.
STEP = "step"
TRAIN_LOSS = "train_loss"
VAL_PPL = "val_ppl"
# The step at which a trial stopped before its end (non-finite loss, or stopped by the sweep's scheduler).
STOPPED_AT_STEP = "stopped_at_step"

# What a finished trial returns (the sweep metric and the report read these), plus every LMEVAL_PREFIX..._acc.
VAL_PPL_INIT = "val_ppl_init"
VAL_PPL_FINAL = "val_ppl_final"
# Perplexity after fine-tuning on the held-out test split (`data.test`): a sweep chooses on validation and
# reports on test, so what it chose with never scores the choice.
TEST_PPL_FINAL = "test_ppl_final"
MODEL_SIZE_MB = "model_size_mb"
# The cached stages of a trial (trials/cache.py), in order; each logs what it took in this trial and, when it
# reused a cached entry, the compute seconds that entry cost (what the reuse saved).
STAGES = ("quantize", "calibrate", "initialize")


def stage_seconds(stage: str) -> str:
    return f"{stage}_seconds"


def stage_saved_seconds(stage: str) -> str:
    return f"{stage}_saved_seconds"


def stage_peak_memory(stage: str) -> str:
    """The stage's own peak memory (MiB, max over the workers): which stage sets the trial's init peak."""
    return f"{stage}_peak_memory_mb"


# Memory (MiB, max over the workers) a worker held before its first stage: on CPU the runtime, libraries and
# tokenized data; on CUDA what was allocated (about 0). Stage and phase peaks include it; `quailora plan`'s
# phase estimates (orchestrator/memory.py) are of what comes on top of it.
BASELINE_MEMORY = "baseline_memory_mb"
# Bytes of stage entries the trial's rank 0 sent to its ranks on other nodes (trials/stage_transfer.py).
STAGE_TRANSFER_BYTES = "stage_transfer_bytes"
# Seconds the trial waited for its stages: for the sweep's stage job that computes them ahead of it, and on
# a cache entry another trial was computing (trials/cache.py obtain).
STAGE_WAIT_SECONDS = "stage_wait_seconds"
# Bytes of everything the trial logged as MLflow artifacts (adapter, probe, LoftQ's base factors, configs).
ARTIFACT_BYTES = "artifact_bytes"
# Optimizer-step seconds and tokens over them, cumulative across restarts (they travel in the checkpoint);
# the step a restarted trial resumed from; the learning rate each step ran at.
TRAIN_SECONDS, TOKENS_PER_SECOND = "train_seconds", "tokens_per_second"
RESUMED_FROM_STEP = "resumed_from_step"
LEARNING_RATE = "learning_rate"

RESULT_METRICS = (
    VAL_PPL_INIT,
    VAL_PPL_FINAL,
    TEST_PPL_FINAL,
    *(f(stage) for stage in STAGES for f in (stage_seconds, stage_saved_seconds, stage_peak_memory)),
    STAGE_TRANSFER_BYTES,
    STAGE_WAIT_SECONDS,
    ARTIFACT_BYTES,
    TRAIN_SECONDS,
    TOKENS_PER_SECOND,
    BASELINE_MEMORY,
    "init_peak_memory_mb",
    "train_peak_memory_mb",
    MODEL_SIZE_MB,
)
LMEVAL_PREFIX, LMEVAL_SUFFIX = "lmeval_", "_acc"


def accuracy_metric(task: str) -> str:
    """The metric of an lm-eval task's accuracy, ``lmeval_<task>_acc``."""
    return f"{LMEVAL_PREFIX}{task}{LMEVAL_SUFFIX}"


def is_accuracy(name: str) -> bool:
    return name.startswith(LMEVAL_PREFIX) and name.endswith(LMEVAL_SUFFIX)


def is_result_metric(name: str) -> bool:
    return name in RESULT_METRICS or is_accuracy(name)


# Tags of a trial's MLflow run.
TRIAL_KEY_TAG = "quailora.trial_key"  # hash of the whole config: a retry or resume finds the run by it
FAILURE_TAG = "quailora.failure_reason"
STOPPED_EARLY_TAG = "quailora.stopped_early"  # "true": the sweep's scheduler (ASHA) stopped the trial
TRIAL_ID_TAG = "tune_trial_id"
TRIAL_NAME_TAG = "trial_name"
# "tested" or "derived, untested": whether the model type is one quailora.supported_architectures lists
ARCHITECTURE_TAG = "quailora.architecture"
EVAL_PATH_TAG = "quailora.eval_path"  # how the quantized base computed: quailora.base_layers.eval_path
# Layers a calibrated init solved uncalibrated (H = I): MoE experts too few calibration tokens were routed to
# (quailora.peft_init.too_few_tokens); trials.stages.uncalibrated_note writes the value. Absent: none.
UNCALIBRATED_TAG = "quailora.uncalibrated_layers"
# What the report groups and matches runs on.
FAMILY_TAG, SIZE_TAG, BITS_TAG, QUANTIZER_TAG = "family", "size", "bits", "quantizer"
METHOD_TAG, RANK_TAG, SEED_TAG = "method", "rank", "seed"
REPORT_TAGS = (FAMILY_TAG, SIZE_TAG, BITS_TAG, METHOD_TAG, RANK_TAG, SEED_TAG, QUANTIZER_TAG)

STAGE_TAG_PREFIX = (
    "quailora.stage."  # + stage: computed, reused, precomputed or skipped (in the last attempt)
)
STAGE_KEY_PREFIX = "stage_key."  # + stage: the param holding the stage's cache key


def stage_tag(stage: str) -> str:
    return f"{STAGE_TAG_PREFIX}{stage}"


def stage_param(stage: str) -> str:
    return f"{STAGE_KEY_PREFIX}{stage}"


# Artifacts of a trial's run.
ADAPTER_ARTIFACT = "adapter"  # the peft adapter directory (safetensors)
PROBE_ARTIFACT = "probe"  # input ids and logits of the final model, to check a reloaded adapter against
PROBE_LOGITS = "logits.safetensors"  # the file in PROBE_ARTIFACT: trials/probe.py's make_probe
PROBE_TOP_K = 32  # the probe keeps each position's PROBE_TOP_K largest logits (trials/probe.py says why)
DEEPSPEED_ARTIFACT = "deepspeed_config.json"  # the engine's resolved DeepSpeed config
BASE_ARTIFACT = "base_residuals"  # methods that change the base: Q = quant(W − L·R) per changed layer
