"""Per-worker accelerator memory estimate of one trial, so `plan` can refuse what cannot fit.

Terms (bytes), all stated so a reader can check them by hand:
- quantized linear weights: each quantizer's own count (QuantizerSpec.linear_bytes, stated in its
  package's docstring: quailora.quantizers.bnb for NF4/FP4/LLM.int8, .groupwise for INT-k).
- other weights (embeddings, lm_head unless tied, norms, biases, MoE routers) stay at `model.dtype`.
- every linear layer of every decoder layer is quantized: fused projections (qkv, gate_up) as they are,
  MoE experts one by one, all resident (orchestrator.model_shapes derives them from the config).
- adapters r·(in+out) per targeted linear, in fp32, plus fp32 grads and Adam's two fp32 moments;
  ZeRO-2/3 shard grads and optimizer state over the workers.
- weights count whole per worker under ZeRO-3 too: each worker loads the whole quantized model before
  deepspeed.initialize partitions it (transformers 5 never loads a quantized model under zero.Init), so
  that is the worker's peak at load; ZeRO-3 saves memory only once training runs.
- activations per layer b·s·h·(34 + 5·a·s/h) bytes at 16 bits (Korthikanti et al. 2022, eq. 2),
  x2 for fp32 training (precision "auto" is fp32 on CPU workers, trials.deepspeed_config.resolve_precision);
  with gradient checkpointing 2·b·s·h per layer plus one full layer; plus fp32 logits and their
  gradient 2·4·b·s·V.
- calibration (inits that need the Gram, quailora.initializers.needs_gram): the largest block's weights
  at model.dtype + fp32 Grams of its linear inputs (an upper bound: inputs read by several layers share
  one Gram at run time) + fp32 hidden states in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.model_shapes import ModelShape
from quailora.initializers import needs_gram
from quailora.quantizers import quantizer_spec
from trials.config import TrialConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    quantized_weights: int
    other_weights: int
    adapters: int  # params + grads + optimizer state
    activations: int
    calibration: int

    @property
    def training(self) -> int:
        return self.quantized_weights + self.other_weights + self.adapters + self.activations

    @property
    def peak(self) -> int:
        return max(self.training, self.calibration)


def quantized_linear_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """Bytes of every quantized linear weight as its quantizer stores it; an unknown quant.method is an
    error (TrialConfig validation refuses one, so this guards configs built around it)."""
    spec = quantizer_spec(trial.quant.method)
    return sum(spec.linear_bytes(n_in, n_out, trial.quant) for _, n_in, n_out in shape.linears())


def _is_targeted(name: str, targets: list[str] | str) -> bool:
    return targets == "all-linear" or any(name == t or name.endswith(t) for t in targets)


def adapter_params(trial: TrialConfig, shape: ModelShape) -> int:
    r = trial.lora.rank
    return sum(
        r * (n_in + n_out)
        for name, n_in, n_out in shape.linears()
        if _is_targeted(name, trial.lora.target_modules)
    )


def activation_bytes(trial: TrialConfig) -> int:
    """2 when the trial trains in bf16 or fp16. "auto" is fp32 on CPU workers and bf16 or fp16 on GPU
    workers (trials.deepspeed_config.resolve_precision); plan checked that devices.kind agrees with
    resources.use_gpu (orchestrator.plan.check_devices)."""
    precision = trial.train.precision
    half = precision in ("bf16", "fp16") or (precision == "auto" and trial.resources.use_gpu)
    return 2 if half else 4


def estimate(trial: TrialConfig, shape: ModelShape) -> MemoryEstimate:
    dtype = DTYPE_BYTES[trial.model.dtype]
    h, s, b, L, V = shape.hidden, trial.data.seq_len, trial.train.batch_size, shape.layers, shape.vocab
    n_adapter = adapter_params(trial, shape)
    workers = trial.resources.num_workers  # ZeRO-2 and ZeRO-3 both shard grads and optimizer state
    adapters = 4 * n_adapter + (4 + 8) * n_adapter // workers

    act_bytes = activation_bytes(trial)
    full_layer = b * s * h * (34 + 5 * shape.heads * s // h) * act_bytes // 2
    layers_act = (
        (L * 2 * b * s * h * act_bytes // 2 + full_layer)
        if trial.train.gradient_checkpointing
        else L * full_layer
    )
    logits = 2 * 4 * b * s * V

    calibration = 0
    if needs_gram(trial.init.method):
        block_weights = shape.layer_params() * dtype
        grams = sum(4 * n * n for n in shape.gram_widths())
        hidden_states = 2 * 4 * trial.calibration.num_sequences * trial.calibration.seq_len * h
        calibration = block_weights + grams + hidden_states

    return MemoryEstimate(
        quantized_weights=quantized_linear_bytes(trial, shape),
        other_weights=shape.other_params * dtype,
        adapters=adapters,
        activations=layers_act + logits,
        calibration=calibration,
    )
