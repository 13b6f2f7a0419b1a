"""``quailora export RUN_ID DIR``: a finished trial's model as files that stock transformers and peft load.

DIR/load.json says what to load, paths relative to DIR:
``{"base": dir, "quantization_config": BitsAndBytesConfig kwargs | null, "adapter": dir | null}``.
DIR/README.md has the loading snippet (and the stock lm-eval command when the trial ran lm-eval tasks),
DIR/probe.safetensors the trial's probe (trials/probe.py: input ids, top logits and their tokens) to check a load against.

- The base is the trial's quantized model written by its quantizer's stock format (QuantBackend.save_stock,
  QuantizerSpec.export_format): bitsandbytes layers serialize themselves (NF4/FP4/LLM.int8, pre-quantized,
  so quantization_config is null and config.json carries it), group-wise INT-k layers become a
  compressed-tensors checkpoint (quailora.quantizers.groupwise.compressed).
- The adapter is the trial's peft adapter; a pooled (QA-LoRA) adapter becomes the equal plain LoRA adapter,
  and an init.zero_start trial's two adapters (trained and frozen start) one adapter of rank 2r equal to their
  sum (peft's add_weighted_adapter, "cat"; quailora/zero_start.py).
- ``--merged``: QA-LoRA folds into the zero points and stays INT-k (compressed-tensors); other methods
  are written as one float checkpoint with Q + sBA in each quantized layer. No adapter.
- MoE: the trial's split experts (quailora.architectures.experts) are written back into transformers' fused
  experts, which stock bitsandbytes loading keeps in full precision: they hold the trial's dequantized Q
  (or Q + sBA merged), and the adapter is rewritten for them (quailora.architectures.stock_adapter: LoRA on
  the fused parameters, peft's target_parameters). Stock transformers 5 cannot read fused experts from a
  compressed-tensors checkpoint written here (it dequantizes experts assuming symmetric codes, and finds
  no float ones), so an INT-k MoE trial exports only --merged, and only with a plain LoRA adapter.

Methods that change the base (quailora.initializers.changes_base, e.g. loftq) need their modified
full-precision weights: one function registered in BASE_WEIGHTS per method. LoftQ's is rebuilt from the
thin factors its trial logs (base_residuals/): W' = W − L·R in each changed layer, whose quantization by
the trial's own loading code is the trial's Q' bit for bit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from quailora.architectures import Layout, ModelWeights
from quailora.architectures.experts import LinearExperts, fuse_experts, split_experts
from quailora.architectures.stock_adapter import stock_adapter
from quailora.base_layers import base_layer_kind, base_layers
from quailora.errors import QuailoraInputError
from quailora.initializers import adapter_kind, changes_base, rebuilt_base
from quailora.peft_init import checkpoint_name, load_base_residuals
from quailora.qalora.adapter import load_groupwise_adapter, lora_from_qalora
from quailora.qalora.merge import merge_qalora
from quailora.quantizers import quantizer_spec
from quailora.registry import Registry
from quailora.zero_start import START_ADAPTER, combine_zero_start, load_start_adapter, save_combined
from reference.cache import resolve_model
from trials.config import TrialConfig
from trials.contract import ADAPTER_ARTIFACT, BASE_ARTIFACT, DEEPSPEED_ARTIFACT, PROBE_ARTIFACT, PROBE_LOGITS
from trials.evaluation import config_parameters
from trials.quantized_model import load_quantized_model
from trials.tracking import config_from_params

LOAD_FILE = "load.json"
README_FILE = "README.md"
PROBE_FILE = "probe.safetensors"
CPU = torch.device("cpu")


@dataclass(frozen=True)
class TrialRun:
    """A finished trial's MLflow run: its config, downloaded artifacts and compute dtype."""

    run_id: str
    config: TrialConfig
    artifacts: Path
    compute_dtype: torch.dtype

    @property
    def adapter(self) -> Path:
        return self.artifacts / ADAPTER_ARTIFACT

    @property
    def probe(self) -> Path:
        return self.artifacts / PROBE_ARTIFACT / PROBE_LOGITS

    @property
    def pooled(self) -> bool:
        """A QA-LoRA adapter, as the trial's init method declares."""
        return adapter_kind(self.config.init.method) == "pooled"


def fetch_run(tracking_uri: str, run_id: str, dest: Path) -> TrialRun:
    """The run's config (from its params) and the artifacts export reads; bad input as QuailoraInputError."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise QuailoraInputError(f"run {run_id!r}: no such MLflow run at {tracking_uri}") from None
    if run.info.status != "FINISHED":
        raise QuailoraInputError(f"run {run_id!r}: status {run.info.status}, only finished trials export")
    names = {f.path for f in client.list_artifacts(run_id)}
    if not {ADAPTER_ARTIFACT, PROBE_ARTIFACT, DEEPSPEED_ARTIFACT} <= names:
        raise QuailoraInputError(
            f"run {run_id!r}: artifacts {sorted(names)} lack adapter/, probe/ or {DEEPSPEED_ARTIFACT}; "
            "is it a trial's run (not a sweep's parent run)?"
        )
    config = config_from_params(run.data.params)
    check_base_exportable(config)  # before any download
    wanted = [ADAPTER_ARTIFACT, PROBE_ARTIFACT, DEEPSPEED_ARTIFACT]
    if changes_base(config.init.method):
        if BASE_ARTIFACT not in names:
            raise QuailoraInputError(
                f"run {run_id!r}: init.method={config.init.method!r} changed the base, but the run has no "
                f"{BASE_ARTIFACT}/ artifact (trials log it since the stage cache; rerun the trial)"
            )
        wanted.append(BASE_ARTIFACT)
    for name in wanted:
        client.download_artifacts(run_id, name, str(dest))
    # The trial computed in bf16 exactly when its DeepSpeed engine did (precision "auto" depends on the GPU).
    bf16 = json.loads((dest / DEEPSPEED_ARTIFACT).read_text())["bf16_enabled"]
    dtype = torch.bfloat16 if bf16 else getattr(torch, config.model.dtype)
    return TrialRun(run_id=run_id, config=config, artifacts=dest, compute_dtype=dtype)


BaseWeights = Callable[[TrialRun, Path, Path], Path]
# Per method that changes the base: (run, checkpoint, work dir) -> a full-precision checkpoint whose
# quantization with the trial's quantizer gives the trial's Q' bit for bit. Registering one is all that
# export needs for such a method; everything downstream treats it like the trial's own checkpoint.
BASE_WEIGHTS: Registry[BaseWeights] = Registry("base rebuild for a base-changing method")


def check_base_exportable(config: TrialConfig) -> None:
    method = config.init.method
    if changes_base(method) and method not in BASE_WEIGHTS:
        raise QuailoraInputError(
            f"init.method={method!r} changes the base weights, and exporting such a trial is not supported yet "
            "(only its adapter is logged, not the re-quantized base it goes with)"
        )


@BASE_WEIGHTS.register("loftq")
def rebuilt_from_residuals(run: TrialRun, checkpoint: Path, work_dir: Path) -> Path:
    """The checkpoint with every changed layer's weight replaced by W − L·R (float32, as the trial computed
    it), one weight file at a time; the other files are copied."""
    residuals = load_base_residuals(run.artifacts / BASE_ARTIFACT)
    weights = ModelWeights(checkpoint)
    changed: dict[Path, dict[str, torch.Tensor]] = {}
    for peft_name, residual in residuals.items():
        key = f"{checkpoint_name(peft_name)}.weight"
        stored, path, transposed = weights.locate(key)
        rebuilt = rebuilt_base(weights.get(key), residual)
        changed.setdefault(path, {})[stored] = (rebuilt.T if transposed else rebuilt).contiguous()
    work_dir.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item not in changed:
            shutil.copyfile(item, work_dir / item.name)
    for path, tensors in changed.items():
        state = load_file(path)
        state.update({k: v.to(torch.float32) for k, v in tensors.items()})
        save_file(state, work_dir / path.name, metadata={"format": "pt"})
    return work_dir


def check_experts_exportable(config: TrialConfig, merged: bool) -> None:
    """An MoE trial whose export would hold its experts in a compressed-tensors checkpoint is refused: stock
    transformers 5 reads no fused experts from one written here (module docstring)."""
    spec = quantizer_spec(config.quant.method)
    float_merge = merged and adapter_kind(config.init.method) != "pooled"
    if spec.export_format != "compressed-tensors" or float_merge:
        return
    if Layout.from_config(str(resolve_model(config.model.path))).experts():
        raise QuailoraInputError(
            f"quant.method={config.quant.method!r} on a mixture of experts: stock transformers cannot load its "
            "experts from a compressed-tensors checkpoint (it dequantizes fused experts as symmetric codes; "
            "these have zero points); export it with --merged (plain LoRA trials: a float checkpoint)"
        )


def base_weights(run: TrialRun, work_dir: Path) -> Path:
    """The full-precision checkpoint whose quantization is the trial's base."""
    checkpoint = resolve_model(run.config.model.path)
    method = run.config.init.method
    if not changes_base(method):
        return checkpoint
    check_base_exportable(run.config)
    return BASE_WEIGHTS.get(method)(run, checkpoint, work_dir)


def load_trial_base(run: TrialRun, weights: Path) -> nn.Module:
    """The trial's quantized base on the CPU, loaded as the trial loads it."""
    # ZeRO-3 trials keep bnb's 4-bit codes in float storage; the codes are the same, and uint8 storage
    # (the stage-2 choice) is the layout every bitsandbytes reader expects.
    config = run.config.model_copy(update={"train": run.config.train.model_copy(update={"zero_stage": 2})})
    return load_quantized_model(weights, config, run.compute_dtype, CPU)


def load_trial_model(run: TrialRun, weights: Path) -> PeftModel:
    """The trial's model on the CPU: its quantized base and its adapter (with init.zero_start, both of its
    adapters, active together as the trial trained them)."""
    return _with_adapters(run, load_trial_base(run, weights)).eval()


def _with_adapters(run: TrialRun, base: nn.Module) -> PeftModel:
    """``base`` with the trial's adapter (and an init.zero_start trial's start adapter) loaded onto it."""
    model = load_groupwise_adapter(base, run.adapter)
    if run.config.init.zero_start:
        load_start_adapter(model, run.adapter / START_ADAPTER)
    return model


def _write_stock(model: nn.Module, config: TrialConfig, out: Path) -> None:
    quantizer_spec(config.quant.method).backend().save_stock(model, out)


@torch.no_grad()
def _float_merged(model: PeftModel, weights: Path, dtype: torch.dtype) -> nn.Module:
    """The full-precision model with each quantized layer's weight replaced by Q + s·B·A, as the trial computes."""
    merged = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    split_experts(merged)  # MoE: named like the trial's experts, fused back below
    base = model.get_base_model()
    for name, module in base.named_modules():
        kind = base_layer_kind(module, name) if isinstance(module, tuple(base_layers())) else None
        if kind is None or kind.quantizer(module) is None:  # the head and other unquantized layers stay
            continue
        target = name.removesuffix(".base_layer")
        weight = kind.dequantize(module).float()
        wrapper = base.get_submodule(target)
        if isinstance(wrapper, LoraLayer):
            for adapter in wrapper.active_adapters:
                b, a = wrapper.lora_B[adapter].weight.float(), wrapper.lora_A[adapter].weight.float()
                weight += wrapper.scaling[adapter] * (b @ a)
        merged.get_submodule(target).weight.copy_(weight)
    fuse_experts(merged)
    return merged.to(dtype)


def _fuse_quantized_experts(model: nn.Module, dtype: torch.dtype) -> bool:
    """MoE: the split, quantized experts back into transformers' fused module, holding their dequantized
    weights (stock bitsandbytes keeps fused experts in full precision). Whether the model had any."""
    if not any(isinstance(m, LinearExperts) for m in model.modules()):
        return False
    fuse_experts(model, lambda linear: base_layer_kind(linear).dequantize(linear).to(dtype))
    return True


def write_adapter_export(run: TrialRun, weights: Path, out: Path) -> dict:
    """The trial's quantized base and its adapter (QA-LoRA as the equal plain LoRA adapter; MoE: the
    experts fused, the adapter rewritten for them)."""
    base = load_trial_base(run, weights)
    if run.config.init.zero_start:  # the trained and the frozen start adapter as one, of rank 2r
        model = _with_adapters(run, base)
        combine_zero_start(model)
        save_combined(model, out / "adapter")
        base = model.unload()  # the same base layers, without LoRA: the base is loaded once, not twice
    moe = _fuse_quantized_experts(base, run.compute_dtype)
    _write_stock(base, run.config, out / "base")
    if run.pooled:
        lora_from_qalora(run.adapter, out / "adapter")
    elif not run.config.init.zero_start:
        shutil.copytree(run.adapter, out / "adapter")
    if moe:  # per-expert adapters as LoRA on the fused expert parameters
        split = out / "adapter.split"
        (out / "adapter").rename(split)
        stock_adapter(split, weights, out / "adapter")
        shutil.rmtree(split)
    return {"base": "base", "quantization_config": None, "adapter": "adapter"}


def write_merged_export(run: TrialRun, weights: Path, out: Path) -> dict:
    """One model with the adapter folded in: INT-k zero points for QA-LoRA, Q + sBA floats otherwise."""
    model = load_trial_model(run, weights)
    if run.pooled:  # the pooled update folds into zero points: the model stays in the quantizer's format
        _write_stock(merge_qalora(model), run.config, out / "model")
    else:
        _float_merged(model, weights, getattr(torch, run.config.model.dtype)).save_pretrained(out / "model")
    return {"base": "model", "quantization_config": None, "adapter": None}


def export_run(tracking_uri: str, run_id: str, out_dir: str | Path, *, merged: bool = False) -> Path:
    """Write the export of trial run ``run_id`` into ``out_dir`` (new or empty); returns it."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuailoraInputError(f"export directory {str(out)!r} exists and is not empty")
    with tempfile.TemporaryDirectory(prefix="quailora-export-") as tmp:
        run = fetch_run(tracking_uri, run_id, Path(tmp) / "artifacts")
        check_experts_exportable(run.config, merged)
        weights = base_weights(run, Path(tmp) / "base_weights")
        out.mkdir(parents=True, exist_ok=True)
        spec = (write_merged_export if merged else write_adapter_export)(run, weights, out)
        AutoTokenizer.from_pretrained(resolve_model(run.config.model.path)).save_pretrained(
            out / spec["base"]
        )
        shutil.copyfile(run.probe, out / PROBE_FILE)
    (out / LOAD_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    (out / README_FILE).write_text(readme(run, spec, out))
    return out


LOAD_SNIPPET = """import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

export = Path(EXPORT_DIR)
spec = json.loads((export / "load.json").read_text())
# null: the base's config.json carries its quantization (or it has none). Pass nothing then: an explicit
# quantization_config=None makes transformers ignore the one in config.json.
quantization = spec["quantization_config"]
extra = {"quantization_config": BitsAndBytesConfig(**quantization)} if quantization else {}
model = AutoModelForCausalLM.from_pretrained(export / spec["base"], **extra)
if spec["adapter"]:
    model = PeftModel.from_pretrained(model, export / spec["adapter"])
model.eval()
tokenizer = AutoTokenizer.from_pretrained(export / spec["base"])

probe = load_file(export / "probe.safetensors")  # the trial's input ids, its top logits and their tokens
with torch.no_grad():
    logits = model(input_ids=probe["input_ids"]).logits.float()
top = logits.gather(-1, probe["top_indices"].long())  # this load's logits at the trial's top tokens
print("relative max error", float((top - probe["top_logits"]).abs().max() / probe["top_logits"].abs().max()))
"""


def lm_eval_command(run: TrialRun, spec: dict, out: Path) -> str | None:
    """The stock lm-eval CLI call that scores this export as the trial scored its model (same tasks, limit,
    batch size), or None when the trial ran no lm-eval task."""
    from reference.tasks import resolve_task, task_dir

    names = run.config.eval.lm_eval_tasks
    if not names:
        return None
    model_args = f"pretrained={out / spec['base']}"
    if spec["adapter"]:
        model_args += f",peft={out / spec['adapter']}"
    model_args += f",dtype={str(run.compute_dtype).removeprefix('torch.')}"
    parts = ["lm_eval --model hf", f"--model_args {model_args}"]
    if any(name.startswith("reference:") for name in names):
        parts.append(f"--include_path {task_dir()}")
    parts.append(f"--tasks {','.join(resolve_task(name) for name in names)}")
    limit = run.config.eval.lm_eval_limit_for(
        config_parameters(AutoConfig.from_pretrained(out / spec["base"]))
    )
    if limit is not None:  # the trial's own limit, also when chosen by model size
        parts.append(f"--limit {limit}")
    parts.append(f"--batch_size {run.config.train.batch_size}")
    return " \\\n    ".join(parts)


def readme(run: TrialRun, spec: dict, out: Path) -> str:
    config = run.config
    what = "merged model" if spec["adapter"] is None else "quantized base and adapter"
    extra = f" ({quantizer_spec(config.quant.method).export_format} checkpoint)"
    lines = [
        f"# Trial {config.name!r} (MLflow run {run.run_id}): {what}",
        "",
        f"init.method={config.init.method}, quant.method={config.quant.method} ({config.quant.bits}-bit), "
        f"LoRA rank {config.lora.rank}, model {config.model.path}. Loads with stock transformers and "
        f"peft{extra}; `probe.safetensors` holds the trial's own top logits (and their tokens) on two "
        "validation blocks:",
        "",
        "```python",
        LOAD_SNIPPET.replace("EXPORT_DIR", repr(str(out.resolve()))).rstrip(),
        "```",
    ]
    command = lm_eval_command(run, spec, out.resolve())
    if command:
        lines += ["", "The trial's lm-eval scores, with the stock CLI:", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"
