"""The schema of one trial: every field a sweep can vary. Unknown fields are errors, not ignored."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quailora.errors import QuailoraInputError
from quailora.quantizers import QUANTIZER_SPECS, QuantizerSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    # A local checkpoint directory, a hub name (needs network), or "reference:<name>" for a
    # project-built reference model (built on first use into the reference cache).
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class QuantSpec(_Strict):
    # A name from quailora's quantizer registry (quailora.quantizers: nf4/fp4 bitsandbytes 4-bit, int8
    # bitsandbytes LLM.int8, int group-wise asymmetric RTN INT-k, ...); it says which bits it allows.
    method: str = "nf4"
    bits: int = 4  # when left out: the method's default (nf4: 4, int8: 8, int: 4)
    blocksize: int = 64  # bitsandbytes 4-bit block size
    double_quant: bool = True  # bitsandbytes 4-bit nested quantization of the absmax
    group_size: int = 64  # group-wise INT-k quantizer / QA-LoRA pooling group

    @model_validator(mode="before")
    @classmethod
    def _method_default_bits(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bits" not in data:
            spec = _quantizer_spec(data.get("method", cls.model_fields["method"].default))
            data = {**data, "bits": spec.default_bits}
        return data

    @field_validator("method")
    @classmethod
    def _method_registered(cls, method: str) -> str:
        _quantizer_spec(method)
        return method

    @model_validator(mode="after")
    def _bits_match_method(self) -> QuantSpec:
        allowed = _quantizer_spec(self.method).bits
        if self.bits not in allowed:
            raise ValueError(
                f"quant.bits={self.bits} is not possible with quant.method={self.method!r}; allowed: {sorted(allowed)}"
            )
        return self


def _quantizer_spec(method: object) -> QuantizerSpec:
    if not isinstance(method, str) or method not in QUANTIZER_SPECS:
        raise ValueError(
            f"quant.method={method!r} is not a registered quantizer; allowed: {QUANTIZER_SPECS.names()}"
        )
    return QUANTIZER_SPECS.get(method)


class LoraSpec(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    # Module-name suffixes (peft semantics) or "all-linear".
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class InitSpec(_Strict):
    # A name from quailora's initializer registry (gaussian, svd, quailora, closed_form, loftq, qalora_zero, qalora_closed_form, ...).
    method: str = "gaussian"
    # Method options passed through to the initializer (e.g. iterations, damping, solver).
    options: dict[str, float | int | str | bool] = Field(default_factory=dict)
    # Zero-correction start (quailora/zero_start.py): the method's factors train as usual, and a frozen copy
    # with lora_B negated cancels their product, so the model starts at the quantized base. Left out of the
    # dumped config while false, so every other trial's key (the hash of its config) stays what it was.
    zero_start: bool = Field(False, exclude_if=lambda value: not value)


class CalibrationSpec(_Strict):
    # A text source (trials.sources): reference:<split>, a local file or save_to_disk folder, hf:<dataset>[:<config>]:<split>.
    dataset: str = "reference:calibration"
    text_field: str = "text"  # the records' field holding the text
    num_sequences: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    # teacher: next layer sees full-precision outputs; quantized: quantized outputs (error propagates).
    propagate: Literal["teacher", "quantized"] = "teacher"


class DataSpec(_Strict):
    # Text sources as for calibration.dataset.
    train: str = "reference:finetune-train"
    validation: str = "reference:finetune-validation"  # eval points, ASHA and choosing (e.g. a learning rate)
    # Scored once after fine-tuning (test_ppl_final), on at most max_eval_sequences blocks; never chosen on.
    # None: no test evaluation.
    test: str | None = "reference:finetune-test"
    # text: the text_field of each record; alpaca: instruction/input/output with the prompt masked out of
    # the loss; chat: a messages list through the tokenizer's chat template (trials.sources.TEMPLATES).
    template: Literal["text", "alpaca", "chat"] = "text"
    text_field: str = "text"
    seq_len: int = Field(128, ge=8)
    max_eval_sequences: int = Field(64, ge=1)


class TrainSpec(_Strict):
    max_steps: int = Field(50, ge=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)  # per worker, per micro-step
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: Literal[2, 3] = 2
    # auto: bf16 on CUDA devices with native bf16, fp16 (loss-scaled) on older ones, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    # Mid-run checkpoints every this many steps (0: never) and/or minutes of wall time; neither set: chosen by
    # model size (trials/checkpointing.py: 25 steps below 1B parameters, else 30 minutes).
    checkpoint_every: int | None = Field(None, ge=0)
    checkpoint_minutes: float | None = Field(None, gt=0)
    max_failures: int = Field(
        1, ge=0
    )  # Ray Train restarts after a worker failure; each resumes from the last checkpoint


# eval.lm_eval_limit left unset: lm-eval scores every document of each task for a model below
# LM_EVAL_LARGE_MODEL_PARAMETERS parameters (the checkpoint's count, as validation counts it), and the first
# LM_EVAL_LARGE_MODEL_LIMIT documents of each task from there: an accuracy's standard error stays under 1.6
# points (0.5/sqrt(1000)) and two methods scored on the same documents compare more finely still, while a
# sweep of large-model trials is not dominated by full tasks of 10k+ documents (HellaSwag, MMLU). The same
# threshold as the checkpoint interval's (trials/checkpoint_policy.py). docs/trials.md, "Evaluation".
LM_EVAL_LARGE_MODEL_PARAMETERS = 1_000_000_000
LM_EVAL_LARGE_MODEL_LIMIT = 1000


class EvalSpec(_Strict):
    perplexity: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list)
    # Documents scored per lm-eval task (the first ones, as lm-eval's --limit); None: chosen by model size,
    # see lm_eval_limit_for. A value above a task's size scores all of it, also on a large model.
    lm_eval_limit: int | None = Field(None, ge=1)

    def lm_eval_limit_for(self, num_parameters: int) -> int | None:
        """The limit lm-eval runs with on a model of ``num_parameters``: ``lm_eval_limit`` when set, whatever
        the size; else None (every document) below LM_EVAL_LARGE_MODEL_PARAMETERS, LM_EVAL_LARGE_MODEL_LIMIT
        from there."""
        if self.lm_eval_limit is not None:
            return self.lm_eval_limit
        return LM_EVAL_LARGE_MODEL_LIMIT if num_parameters >= LM_EVAL_LARGE_MODEL_PARAMETERS else None


class ResourcesSpec(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # How long the trial's workers may wait for their resources (other trials holding them) before the trial
    # fails, instead of waiting forever for workers a shrunken cluster can no longer give.
    start_timeout_s: float = Field(1800, gt=0)


def check_resources(resources: ResourcesSpec) -> None:
    """Resources Ray Train would grant but the trial cannot use. A worker computes on the one device
    ray.train.torch.get_device gives it, so GPUs beyond one per worker would be held and idle; a fractional
    share lets Ray put two of a trial's workers on one GPU, and NCCL refuses two ranks on one device."""
    gpus, workers = resources.gpus_per_worker, resources.num_workers
    if not resources.use_gpu:
        if gpus:
            raise QuailoraInputError(
                f"resources.gpus_per_worker={gpus:g} needs resources.use_gpu: true (CPU workers use no GPU)"
            )
        return
    if gpus > 1:
        raise QuailoraInputError(
            f"resources.gpus_per_worker={gpus:g}: a worker computes on one GPU, the others would be reserved "
            f"and idle; use gpus_per_worker: 1 and resources.num_workers={workers * math.ceil(gpus)}"
        )
    if 0 < gpus < 1 and workers > 1:
        raise QuailoraInputError(
            f"resources.gpus_per_worker={gpus:g} with resources.num_workers={workers}: two of the trial's "
            "workers could share a GPU, which NCCL refuses; use gpus_per_worker: 1, or num_workers: 1 "
            "(one-worker trials may share a GPU)"
        )


class TrialConfig(_Strict):
    name: str = "trial"
    seed: int = 0
    model: ModelSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    init: InitSpec = Field(default_factory=InitSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    # Free-form labels copied to MLflow tags (family, size, ... are added automatically).
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\n"):
            raise ValueError(f"name={v!r} must be non-empty and contain no slashes or newlines")
        return v


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The parsed YAML of a config file. Text that is not UTF-8 (a binary file, UTF-16, Latin-1) and malformed
    YAML are bad input: one line naming the file and where, not a traceback. A UTF-8 byte-order mark is fine."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QuailoraInputError(
            f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QuailoraInputError(f"{path}: malformed YAML{where}: {problem}") from None
