"""plan's memory estimate against hand-computed values for LLaMA-7B at 4 and 8 bits, from its config alone."""

from __future__ import annotations

import functools
import json

import pytest
from transformers import LlamaConfig

from orchestrator.expand import expand
from orchestrator.memory import adapter_params, estimate
from orchestrator.model_shapes import ModelShape, resolve_shape, shape_from_config
from orchestrator.plan import plan_trials
from orchestrator.sweep_config import SweepConfig
from trials.config import TrialConfig

# The published config.json of huggyllama/llama-7b (the fields that size the model).
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
            "max_position_embeddings": 2048}  # fmt: skip
OPT_1_3B = {"model_type": "opt", "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
            "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2048,
            "max_position_embeddings": 2048}  # fmt: skip


@functools.cache
def llama7b():
    return shape_from_config(LlamaConfig(**{k: v for k, v in LLAMA_7B.items() if k != "model_type"}))


@pytest.fixture
def llama7b_dir(tmp_path):
    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "llama-7b" / "config.json").write_text(json.dumps(LLAMA_7B))
    return str(tmp_path / "llama-7b")


# LLaMA-7B: hidden h=4096, intermediate i=11008, 32 layers, vocab 32000, 32 heads, untied lm_head.
# Trial: rank 16 on all linears, bf16 model, batch 1, sequence 512, bf16 training, 1 worker.
LINEAR_PARAMS_PER_LAYER = 4 * 4096 * 4096 + 3 * 4096 * 11008  # q,k,v,o + gate,up,down = 202_375_168
LINEAR_PARAMS = 32 * LINEAR_PARAMS_PER_LAYER  # 6_476_005_376

# NF4, blocksize 64, double quant: 0.5 B/param; per linear, 1 B per block + 4 B per 256 blocks.
# q/k/v/o: 16_777_216/64 = 262_144 blocks -> 262_144 + 1024*4 = 266_240 B
# gate/up/down: 45_088_768/64 = 704_512 blocks -> 704_512 + 2752*4 = 715_520 B
NF4_BYTES = LINEAR_PARAMS // 2 + 32 * (4 * 266_240 + 3 * 715_520)  # 3_238_002_688 + 102_768_640
# LLM.int8: 1 B/param + an fp32 scale per output row (4*4096 + 2*11008 + 4096 = 42_496 rows per layer).
INT8_BYTES = LINEAR_PARAMS + 32 * 42_496 * 4  # 6_481_444_864
# Embedding + lm_head (2 * 32000 * 4096) + 65 RMSNorm vectors of 4096, at 2 bytes.
OTHER_BYTES = (2 * 32000 * 4096 + 65 * 4096) * 2  # 524_820_480
# Adapters r*(in+out): 4 attention * 16*8192 + 3 MLP * 16*(4096+11008) = 1_249_280 per layer; 16 B each
# (fp32 weight, fp32 grad, two fp32 Adam moments).
ADAPTER_BYTES = 32 * (4 * 16 * 8192 + 3 * 16 * 15104) * 16  # 639_631_360
# Activations: 32 layers * b*s*h*(34 + 5*a*s/h) = 512*4096*(34 + 20) bytes, + fp32 logits and grad 2*4*512*32000.
ACTIVATION_BYTES = 32 * 512 * 4096 * 54 + 2 * 4 * 512 * 32000  # 3_754_950_656


def _trial(method: str, bits: int, **override) -> TrialConfig:
    fields = {
        "model": {"path": "llama-7b", "dtype": "bfloat16"},
        "quant": {"method": method, "bits": bits},
        "lora": {"rank": 16},
        "data": {"seq_len": 512},
        "train": {"batch_size": 1, "precision": "bf16"},
    }
    for key, value in override.items():
        fields[key] = {**fields.get(key, {}), **value}
    return TrialConfig(**fields)


# The largest linear (MLP, 11008 x 4096) dequantized in a bf16 forward/backward (QuantizerSpec.dequant_bytes at
# c = 2): NF4 c + 1 = 3 bytes per weight, LLM.int8 4 + 3c = 10.
DEQUANT_BYTES = {"nf4": 3 * 11008 * 4096, "int8": 10 * 11008 * 4096}


@pytest.mark.parametrize(("method", "bits", "quant_bytes"), [("nf4", 4, NF4_BYTES), ("int8", 8, INT8_BYTES)])
def test_llama7b_estimate_matches_hand_computation(method, bits, quant_bytes, llama7b_dir):
    est = estimate(_trial(method, bits), resolve_shape(llama7b_dir))
    assert est.quantized_weights == quant_bytes
    assert est.other_weights == OTHER_BYTES
    assert est.adapters == ADAPTER_BYTES
    assert est.activations == ACTIVATION_BYTES
    assert est.dequantized == DEQUANT_BYTES[method]
    assert est.peak == quant_bytes + OTHER_BYTES + ADAPTER_BYTES + ACTIVATION_BYTES + DEQUANT_BYTES[method]
    assert est.calibration == 0  # gaussian init needs no calibration pass


def test_headline_numbers():
    assert NF4_BYTES == 3_340_771_328
    assert INT8_BYTES == 6_481_444_864
    # 4-bit 7B trains in ~7.8 GiB, 8-bit in ~11.0 GiB with these settings.
    assert round(estimate(_trial("nf4", 4), llama7b()).peak / 2**30, 2) == 7.82
    assert round(estimate(_trial("int8", 8), llama7b()).peak / 2**30, 2) == 11.04


def test_zero_shards_optimizer_state_and_checkpointing_shrinks_activations():
    two = _trial("nf4", 4, resources={"num_workers": 2})
    assert estimate(two, llama7b()).adapters == 32 * 1_249_280 * (4 + 12 // 2)
    ckpt = _trial("nf4", 4, train={"gradient_checkpointing": True})
    # 2*b*s*h per layer kept, plus one full layer recomputed, plus the logits.
    assert (
        estimate(ckpt, llama7b()).activations == 32 * 2 * 512 * 4096 + 512 * 4096 * 54 + 2 * 4 * 512 * 32000
    )


def test_calibrated_init_adds_gram_phase():
    trial = _trial("nf4", 4, init={"method": "quailora"})
    est = estimate(trial, llama7b())
    # One block in bf16 + fp32 Grams of its distinct linear inputs (q/k/v read one tensor, gate/up another:
    # 4096 for q/k/v, o, gate/up and 11008 for down) + fp32 hidden states in and out for 32 sequences of
    # 128 tokens.
    expected = LINEAR_PARAMS_PER_LAYER * 2 + 4 * (3 * 4096**2 + 11008**2) + 2 * 4 * 32 * 128 * 4096
    assert est.calibration == expected
    # calibrate runs with the quantized base already loaded (trials/worker.py: quantize, then calibrate)
    assert est.phases()["calibrate"] == NF4_BYTES + OTHER_BYTES + expected


def test_cpu_calibrate_holds_the_gram_write_where_it_exceeds_the_forward():
    """On a CPU worker the layer's Grams are packed and written in the same memory (store.write_layer drops
    each once packed: the write holds the Grams and the largest one packed); a GPU worker writes from host
    memory. A layer of one 4096 x 1 projection: its weights are small beside its Gram, so the write decides."""
    n = 4096
    shape = ModelShape("llama", hidden=n, layers=1, vocab=8, heads=1, linear_layers=((("mlp.down_proj", n, 1),),),
                       other_params=0)  # fmt: skip
    forward = n * 4 + 4 * n * n + 2 * 4 * 16 * n  # the block at fp32 (CPU), its Gram, hidden states
    write = 4 * n * n + 4 * n * (n + 1) // 2
    cpu = TrialConfig(model={"path": "x", "dtype": "float32"}, init={"method": "quailora"},
                      calibration={"num_sequences": 1, "seq_len": 16})  # fmt: skip
    assert write > forward
    assert estimate(cpu, shape).calibration == write
    gpu = cpu.model_copy(update={"resources": cpu.resources.model_copy(update={"use_gpu": True})})
    assert estimate(gpu, shape).calibration == n * 2 + 4 * n * n + 2 * 4 * 16 * n  # bf16 block on a GPU


# Adapter parameters of the rank-16 trial: 32 layers x 1_249_280.
ADAPTER_PARAMS = 32 * 1_249_280


def test_initialization_damping_and_evaluation_terms():
    est = estimate(_trial("nf4", 4, init={"method": "quailora"}), llama7b())
    # The attached adapters and the computed updates (fp32 each), and the largest linear's problem: W, Q,
    # E and one product (fp32, out x in) with its Gram. down_proj (in 11008) beats gate/up (in 4096).
    down = 4 * 4 * 4096 * 11008 + 4 * 11008**2
    assert est.initialization == 2 * 4 * ADAPTER_PARAMS + down
    # damp(): the identity, its scaled copy and the sum, three more fp32 11008 x 11008 matrices
    assert est.damping == 3 * 4 * 11008**2
    # the probe's 2 blocks of bf16 logits and their fp32 copy beat perplexity's 2·4·b·s·V at batch 1
    assert est.eval_logits == max(2 * 512 * 32000 * (2 + 4), 2 * 4 * 1 * 512 * 32000) == 196_608_000
    assert est.peak_phase == "train" and est.peak == est.training
    # gaussian draws A and B = 0: no Gram, no damping, the same problem without the Gram
    plain = estimate(_trial("nf4", 4), llama7b())
    assert plain.damping == 0 and plain.initialization == 2 * 4 * ADAPTER_PARAMS + 4 * 4 * 4096 * 11008


def test_new_terms_decide_the_peak_when_they_dominate():
    # Short sequences: training holds little, the init's problem and its damping copies are the peak.
    short = {"data": {"seq_len": 16}, "init": {"method": "closed_form"}}
    est = estimate(_trial("nf4", 4, **short), llama7b())
    assert est.peak_phase == "initialize"
    assert est.peak == NF4_BYTES + OTHER_BYTES + est.initialization + est.damping
    undamped = estimate(_trial("nf4", 4, **{**short, "init": {"method": "closed_form", "options": {"damping": 0}}}),
                        llama7b())  # fmt: skip
    assert undamped.damping == 0 and est.peak - undamped.peak == 3 * 4 * 11008**2

    # A small model with a large vocabulary at batch 1 in bf16: the probe's logits are the peak.
    tiny = ModelShape(model_type="llama", hidden=64, layers=2, vocab=32000, heads=4,
                      linear_layers=tuple(((f"model.layers.{i}.mlp.down_proj", 64, 64),) for i in range(2)),
                      other_params=64)  # fmt: skip
    est = estimate(_trial("nf4", 4, data={"seq_len": 128}), tiny)
    assert est.eval_logits == 2 * 128 * 32000 * 6 > est.activations
    assert est.peak_phase == "evaluate"
    assert est.peak == est.base + est.adapters + est.eval_logits + est.dequantized


def test_pooled_adapters_read_group_means():
    """QA-LoRA's lora_A is r x in/group_size (trials.adapters.build_qalora pools by quant.group_size)."""
    pooled = _trial("int", 4, quant={"group_size": 64}, init={"method": "qalora_zero"})
    per_layer = 16 * (4 * (4096 // 64 + 4096) + 2 * (4096 // 64 + 11008) + (11008 // 64 + 4096))
    assert adapter_params(pooled, llama7b()) == 32 * per_layer


def test_groupwise_int_packs_codes_in_words():
    trial = _trial("int", 3, quant={"group_size": 64})
    est = estimate(trial, llama7b())
    # 10 three-bit codes per int32 word, packed over the whole (out x in) weight as GroupwiseLinear
    # stores it: ceil(4096·4096/10) and ceil(11008·4096/10) words; plus fp16 scale + fp32 zero (6 B)
    # per group of 64.
    words = 4 * 1677722 + 3 * 4508877
    assert est.quantized_weights == 32 * (words * 4 + LINEAR_PARAMS_PER_LAYER // 64 * 6)


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_gpu():
    shape = llama7b()
    fp32 = estimate(_trial("nf4", 4, train={"precision": "fp32"}), shape).activations
    auto_cpu = estimate(_trial("nf4", 4, train={"precision": "auto"}), shape).activations
    auto_gpu = estimate(
        _trial("nf4", 4, train={"precision": "auto"}, resources={"use_gpu": True, "gpus_per_worker": 1}),
        shape,
    ).activations
    assert (
        auto_cpu == fp32 == 32 * 512 * 4096 * 54 * 2 + 2 * 4 * 512 * 32000
    )  # layers x2, logits already fp32
    assert auto_gpu == ACTIVATION_BYTES


def test_fp16_trains_at_two_bytes_and_zero3_loads_the_whole_model_per_worker():
    assert estimate(_trial("nf4", 4, train={"precision": "fp16"}), llama7b()).activations == ACTIVATION_BYTES
    zero3 = estimate(_trial("nf4", 4, train={"zero_stage": 3}, resources={"num_workers": 4}), llama7b())
    assert zero3.quantized_weights == NF4_BYTES and zero3.other_weights == OTHER_BYTES


def test_plan_sizes_sampled_fields_at_their_worst_corner(llama7b_dir, tmp_path):
    opt = tmp_path / "opt-1.3b"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps(OPT_1_3B))
    sweep = SweepConfig.model_validate(
        {
            "name": "sampled",
            "base": {"model": {"path": llama7b_dir, "dtype": "bfloat16"}, "quant": {"method": "nf4", "bits": 4},
                     "data": {"seq_len": 512}, "train": {"batch_size": 1, "precision": "bf16"}},
            "space": {"seed": {"grid": [0]}, "lora.rank": {"randint": [4, 17]},
                      "model.path": {"choice": [str(opt), llama7b_dir]}},
            "search": {"algorithm": "random"},
            "devices": {"memory_gb": 7.6},  # the base point (rank 8) needs 7.52 GiB
        }
    )  # fmt: skip
    (planned,) = plan_trials(expand(sweep))
    # rank 16 (randint's high end is exclusive) on llama-7b: the hand-computed 4-bit total, 7.82 GiB.
    assert (
        planned.memory.peak
        == NF4_BYTES + OTHER_BYTES + ADAPTER_BYTES + ACTIVATION_BYTES + DEQUANT_BYTES["nf4"]
    )
    assert not planned.fits


def test_shapes_are_derived_once_per_config_and_read_back_equal(tmp_path, monkeypatch):
    """plan keeps each derived shape keyed by the config's content: a second plan reads it back equal,
    a changed config.json gets its own, and the shipped sweeps' hub models size offline from their
    published configs."""
    import orchestrator.model_shapes as shapes

    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "llama-7b" / "config.json").write_text(json.dumps(LLAMA_7B))
    first = shapes.resolve_shape(str(tmp_path / "llama-7b"))
    assert len(list((tmp_path / "cache" / "shapes").glob("*.json"))) == 1
    monkeypatch.setattr(shapes, "shape_from_config", lambda config: pytest.fail("derived again"))
    assert shapes.resolve_shape(str(tmp_path / "llama-7b")) == first
    (tmp_path / "llama-7b" / "config.json").write_text(json.dumps({**LLAMA_7B, "num_hidden_layers": 2}))
    monkeypatch.undo()
    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    assert shapes.resolve_shape(str(tmp_path / "llama-7b")).layers == 2
    published = shapes.resolve_shape(
        "huggyllama/llama-7b"
    )  # offline: from orchestrator/published_configs.json
    assert published.linears() == first.linears() and published.other_params == first.other_params
