"""Per-worker accelerator memory estimate of one trial, so `plan` can refuse what cannot fit.

The estimate is of what a trial allocates on top of what its worker holds before the first stage (the
trial's ``baseline_memory_mb`` metric: about 0 on a GPU; on a CPU worker, whose accelerator is its host
memory, the runtime, libraries and tokenized data, about 0.6 GiB here). benchmarks/layer_shapes_trial.py
checks it per phase against a real trial's peaks (docs/results/scale.md).

A worker runs its trial in phases (trials/worker.py), and the estimate is the largest of them, each the
sum of what is resident at once:
- calibrate: the quantized base (quantize runs first and keeps it) + the one-block calibration set;
- initialize: the quantized base + the attached adapters + the computed updates + one layer's problem,
  with the damping copies of its Gram;
- train: the quantized base + adapters with grads and optimizer state + activations;
- evaluate (perplexity during and after training, the probe, lm-eval): the quantized base + adapters with
  grads and optimizer state (DeepSpeed keeps them) + the evaluation logits.

Terms (bytes), all stated so a reader can check them by hand:
- quantized linear weights: each quantizer's own count (QuantizerSpec.linear_bytes, stated in its
  package's docstring: quailora.quantizers.bnb for NF4/FP4/LLM.int8, .groupwise for INT-k).
- other weights (embeddings, lm_head unless tied, norms, biases, MoE routers) at the dtype the worker
  loads the model in (weight_bytes: the training precision's when it trains in bf16/fp16, else model.dtype).
- every linear layer of every decoder layer is quantized: fused projections (qkv, gate_up) as they are,
  MoE experts one by one, all resident (orchestrator.model_shapes derives them from the config).
- adapters r·(in+out) per targeted linear (r·(in/group_size + out) for a pooled QA-LoRA adapter), in fp32,
  plus fp32 grads and Adam's two fp32 moments; ZeRO-2/3 shard grads and optimizer state over the workers.
  With init.zero_start, a second frozen adapter of the same size (quailora/zero_start.py), fp32, no state.
- weights count whole per worker under ZeRO-3 too: each worker loads the whole quantized model before
  deepspeed.initialize partitions it (transformers 5 never loads a quantized model under zero.Init), so
  that is the worker's peak at load; ZeRO-3 saves memory only once training runs.
- activations per layer b·s·h·(34 + 5·a·s/h) bytes at 16 bits (Korthikanti et al. 2022, eq. 2),
  x2 for fp32 training (precision "auto" is fp32 on CPU workers, trials.deepspeed_config.resolve_precision);
  with gradient checkpointing 2·b·s·h per layer plus one full layer; plus fp32 logits and their
  gradient 2·4·b·s·V.
- calibration (inits that need the Gram, quailora.initializers.needs_gram): the largest block's weights
  at the load dtype + fp32 Grams of its distinct linear inputs (ModelShape.gram_widths: q/k/v and gate/up
  share one) + fp32 hidden states in and out. On a CPU worker the Grams are then written in the same
  memory: each packed to its upper triangle and then dropped (quailora.calibration.store.write_layer), so
  the write holds at most the Grams and the largest one packed; the phase holds the larger of the forward
  and the write (a GPU worker writes from host memory).
- initialization (quailora.peft_init.compute_adapters, every method): the updates it computes, A and B in
  fp32 (plus LoftQ's thin base residuals, 4·r·(in+out)), held on the device until gathered, and the
  largest targeted linear's problem: W, Q and E = W − Q in fp32 (quailora.initializers.InitProblem) plus
  one product of that size the methods form (E·L, E·H, W − Q − sBA): 4·4·out·in; with its fp32 Gram 4·in²
  for the calibrated methods.
- damping (quailora.linalg.damp, methods with a ``damping`` option > 0): H + λ·mean(diag H)·I makes the
  identity, its scaled copy and the sum, three more fp32 in x in matrices (in/group_size for the pooled
  Gram of qalora_closed_form) beside the Gram: 3·4·in².
- dequantization (train and evaluate): a forward and backward through a quantized linear dequantize its
  weight, holding for the largest one its quantizer's dequant_bytes(c) per weight (QuantizerSpec, measured
  by benchmarks/dequant_memory.py), c the compute dtype's bytes.
- evaluation logits (quailora.text.perplexity at train.batch_size): the forward's logits at the compute dtype,
  c·b·s·V, and one chunk of positions scored in fp32 (quailora.text.loss_chunk_positions: n = LOSS_CHUNK_BYTES
  / 8V positions, at most s - 1, at least 1): their fp32 copy (none when c = 4) and cross_entropy's fp32
  log-probabilities, (4 + 4)·n·V (4·n·V when c = 4); at least the probe's (trials.worker: two validation blocks' logits at the
  compute dtype and their fp32 copy, 2·s·V·(c + 4), c = 4 meaning no copy). lm-eval (trials.evaluation) is no
  term of its own: a batch of train.batch_size requests padded to its longest, L tokens (at most the model's
  positions), holds logits and log-softmax at the compute dtype, 2·c·b·L·V, within the train phase's fp32
  logits and their gradient 2·4·b·s·V while L <= 4·s/c; tasks with longer requests are not covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from orchestrator.model_shapes import ModelShape
from quailora.initializers import adapter_kind, changes_base, needs_gram, traits
from quailora.quantizers import quantizer_spec
from trials.config import TrialConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3
PROBE_ROWS = 2  # trials.worker: the probe's logits are of the first two validation blocks
# quailora.text.LOSS_CHUNK_BYTES, repeated because plan imports no torch (tests/test_eval_sizing.py: they agree)
LOSS_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    quantized_weights: int
    other_weights: int
    adapters: int  # params + grads + optimizer state
    activations: int
    calibration: int
    initialization: int = 0  # the init's updates and one layer's problem (without the damping copies)
    damping: int = 0  # the damping copies of that layer's Gram
    eval_logits: int = 0
    dequantized: int = 0  # the largest quantized linear's weight while a forward or backward dequantizes it

    @property
    def base(self) -> int:
        """The quantized base model, resident from the quantize stage on."""
        return self.quantized_weights + self.other_weights

    def phases(self) -> dict[str, int]:
        """What each phase of the trial holds at once; a phase the trial skips holds 0."""
        return {
            "calibrate": self.base + self.calibration if self.calibration else 0,
            "initialize": self.base + self.initialization + self.damping,
            "train": self.training,
            "evaluate": self.base + self.adapters + self.eval_logits + self.dequantized,
        }

    @property
    def training(self) -> int:
        return (
            self.quantized_weights + self.other_weights + self.adapters + self.activations + self.dequantized
        )

    @property
    def peak(self) -> int:
        return max(self.phases().values())

    @property
    def peak_phase(self) -> str:
        phases = self.phases()
        return max(phases, key=phases.__getitem__)


def quantized_linear_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """Bytes of every quantized linear weight as its quantizer stores it; an unknown quant.method is an
    error (TrialConfig validation refuses one, so this guards configs built around it)."""
    spec = quantizer_spec(trial.quant.method)
    return sum(spec.linear_bytes(n_in, n_out, trial.quant) for _, n_in, n_out in shape.linears())


def _is_targeted(name: str, targets: tuple[str, ...] | str) -> bool:
    return targets == "all-linear" or any(name == t or name.endswith(t) for t in targets)


def _targets(trial: TrialConfig) -> tuple[str, ...] | str:
    targets = trial.lora.target_modules
    return targets if isinstance(targets, str) else tuple(targets)


@cache  # plan sizes every grid point of a sweep against a few shapes: each sum is made once
def _targeted(shape: ModelShape, targets: tuple[str, ...] | str) -> tuple[tuple[str, int, int], ...]:
    return tuple(linear for linear in shape.linears() if _is_targeted(linear[0], targets))


@cache
def _adapter_width(shape: ModelShape, targets: tuple[str, ...] | str, pool: int) -> int:
    """Σ (in/pool + out) over the targeted linears: adapter parameters per unit of rank."""
    return sum(n_in // pool + n_out for _, n_in, n_out in _targeted(shape, targets))


def targeted_linears(trial: TrialConfig, shape: ModelShape) -> list[tuple[str, int, int]]:
    return list(_targeted(shape, _targets(trial)))


def pool_size(trial: TrialConfig) -> int:
    """How many inputs a targeted linear's lora_A reads as one: 1, or for a pooled (QA-LoRA) adapter
    quant.group_size (trials.adapters.build_qalora pools by it), so lora_A is r x in/group_size."""
    return trial.quant.group_size if adapter_kind(trial.init.method) == "pooled" else 1


def adapter_params(trial: TrialConfig, shape: ModelShape) -> int:
    return trial.lora.rank * _adapter_width(shape, _targets(trial), pool_size(trial))


def base_residual_params(trial: TrialConfig, shape: ModelShape) -> int:
    """A method that moves Q (LoftQ) keeps per targeted linear the thin factors sBA = (U·S, Vh) that Q was
    quantized from, r·(out + in) (quailora.initializers.Initialization.base_residual); an upper bound,
    as a one-iteration LoftQ keeps none."""
    if not changes_base(trial.init.method):
        return 0
    return trial.lora.rank * _adapter_width(shape, _targets(trial), 1)


def activation_bytes(trial: TrialConfig) -> int:
    """2 when the trial trains in bf16 or fp16. "auto" is fp32 on CPU workers and bf16 or fp16 on GPU
    workers (trials.deepspeed_config.resolve_precision); plan checked that devices.kind agrees with
    resources.use_gpu (orchestrator.plan.check_devices)."""
    precision = trial.train.precision
    half = precision in ("bf16", "fp16") or (precision == "auto" and trial.resources.use_gpu)
    return 2 if half else 4


def weight_bytes(trial: TrialConfig) -> int:
    """Bytes per unquantized weight as the worker loads the model (trials.deepspeed_config.compute_dtype):
    the training precision's dtype when it trains in bf16/fp16, else model.dtype."""
    return 2 if activation_bytes(trial) == 2 else DTYPE_BYTES[trial.model.dtype]


def damping_factor(trial: TrialConfig) -> float:
    """The init's damping λ (init.options, else the method's default); 0 for a method without one."""
    defaults = traits(trial.init.method).options.defaults()
    if "damping" not in defaults:
        return 0.0
    return float(trial.init.options.get("damping", defaults["damping"]))


def layer_problem_bytes(trial: TrialConfig, shape: ModelShape) -> tuple[int, int]:
    """(the largest targeted linear's init problem with its Gram, its damping copies): see the module
    docstring, terms initialization and damping."""
    calibrated, damped = needs_gram(trial.init.method), damping_factor(trial) > 0
    return _layer_problem(shape, _targets(trial), calibrated, calibrated and damped, pool_size(trial))


@cache
def _layer_problem(
    shape: ModelShape, targets: tuple[str, ...] | str, calibrated: bool, damped: bool, pool: int
) -> tuple[int, int]:
    worst = (0, 0)
    for _, n_in, n_out in _targeted(shape, targets):
        problem = 4 * 4 * n_out * n_in + (4 * n_in * n_in if calibrated else 0)
        width = n_in // pool  # the Gram qalora_closed_form damps is the pooled P H Pᵀ
        worst = max(worst, (problem, 3 * 4 * width * width if damped else 0), key=sum)
    return worst


def dequantized_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    """The largest quantized linear dequantized for a forward or backward: its quantizer's bytes per weight."""
    per_weight = quantizer_spec(trial.quant.method).dequant_bytes(weight_bytes(trial))
    return per_weight * max(n_in * n_out for _, n_in, n_out in shape.linears())


def eval_logits_bytes(trial: TrialConfig, shape: ModelShape) -> int:
    s, b, V, c = trial.data.seq_len, trial.train.batch_size, shape.vocab, weight_bytes(trial)
    chunk = min(max(s - 1, 1), max(1, LOSS_CHUNK_BYTES // (8 * V)))  # quailora.text.loss_chunk_positions
    perplexity = c * b * s * V + (4 + (4 if c != 4 else 0)) * chunk * V
    probe = PROBE_ROWS * s * V * (c + 4 if c != 4 else 4)
    return max(perplexity, probe)


def estimate(trial: TrialConfig, shape: ModelShape) -> MemoryEstimate:
    dtype = weight_bytes(trial)
    h, s, b, L, V = shape.hidden, trial.data.seq_len, trial.train.batch_size, shape.layers, shape.vocab
    n_adapter = adapter_params(trial, shape)
    workers = trial.resources.num_workers  # ZeRO-2 and ZeRO-3 both shard grads and optimizer state
    adapters = 4 * n_adapter * (2 if trial.init.zero_start else 1) + (4 + 8) * n_adapter // workers

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
        widths = shape.gram_widths()
        grams = sum(4 * n * n for n in widths)
        hidden_states = 2 * 4 * trial.calibration.num_sequences * trial.calibration.seq_len * h
        calibration = block_weights + grams + hidden_states
        if not trial.resources.use_gpu:
            largest = max(widths)  # written while the others are still whole: at most one more, packed
            calibration = max(calibration, grams + 4 * largest * (largest + 1) // 2)

    problem, damping = layer_problem_bytes(trial, shape)
    # the attached adapters and the computed updates (with any base residuals), both fp32
    updates = 4 * n_adapter + 4 * n_adapter + 4 * base_residual_params(trial, shape)
    return MemoryEstimate(
        quantized_weights=quantized_linear_bytes(trial, shape),
        other_weights=shape.other_params * dtype,
        adapters=adapters,
        activations=layers_act + logits,
        calibration=calibration,
        initialization=updates + problem,
        damping=damping,
        eval_logits=eval_logits_bytes(trial, shape),
        dequantized=dequantized_bytes(trial, shape),
    )
