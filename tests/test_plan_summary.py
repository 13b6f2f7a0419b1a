"""`quailora plan`'s summary (orchestrator/footprint.py) against hand-computed bytes for a tiny model whose
shape is written out here, and the table grouped by identical footprint (--trials: one row per trial)."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator import plan
from orchestrator.expand import expand
from orchestrator.footprint import (
    artifact_bytes,
    calibrate_entry_bytes,
    checkpoint_bytes,
    checkpoint_peak_bytes,
    describe_footprint,
    final_checkpoint_bytes,
    initialize_entry_bytes,
    quantize_entry_bytes,
    sweep_footprint,
)
from orchestrator.memory import quantized_linear_bytes
from orchestrator.model_shapes import ModelShape
from orchestrator.stage_graph import plan_stage_graph
from orchestrator.sweep_config import SweepConfig
from trials.config import TrialConfig

# A llama of hidden 64, intermediate 128, 2 layers, vocab 1000, untied head, fp32 (CPU, precision auto).
H, FF, L, V = 64, 128, 2, 1000
LAYER = (("self_attn.q_proj", H, H), ("self_attn.k_proj", H, H), ("self_attn.v_proj", H, H),
         ("self_attn.o_proj", H, H), ("mlp.gate_proj", H, FF), ("mlp.up_proj", H, FF), ("mlp.down_proj", FF, H))  # fmt: skip
TINY = ModelShape(
    model_type="llama",
    hidden=H,
    layers=L,
    vocab=V,
    heads=4,
    linear_layers=tuple(tuple((f"model.layers.{i}.{n}", a, b) for n, a, b in LAYER) for i in range(L)),
    other_params=2 * V * H + (2 * L + 1) * H,  # embedding + head + 5 RMSNorm vectors = 128_320
)
OTHER_BYTES = 128_320 * 4
# r·Σ(in + out) over the 7 linears of a layer (4·128 + 2·192 + 192 = 1088), 2 layers.
ADAPTER_PER_RANK = 2 * 1088
# NF4, blocksize 64, double quant: n/2 + a byte per block of 64 (+ 4 per full 256 blocks: none here).
NF4_BYTES = L * (4 * (2048 + 64) + 3 * (4096 + 128))  # 42_240
# LLM.int8: n + an fp32 scale per output row. q,k,v,o: 4096+256; gate,up: 8192+512; down: 8192+256.
INT8_BYTES = L * (4 * 4352 + 2 * 8704 + 8448)  # 86_528
# Grams: q/k/v share one (64), o (64), gate/up share one (64), down (128); each stored as its upper
# triangle in fp32, n(n+1)/2 values.
GRAM_BYTES = L * 4 * (3 * H * (H + 1) // 2 + FF * (FF + 1) // 2)  # 115_968
SEQ = 32
PROBE_BYTES = 2 * SEQ * (8 + 32 * 8 + 4)  # two blocks: int64 ids, top-32 fp32 logits + int32 ids, logsumexp


def _trial(**fields) -> TrialConfig:
    return TrialConfig(**{"model": {"path": "tiny"}, "data": {"seq_len": SEQ}, **fields})


def test_entry_checkpoint_and_artifact_bytes_by_hand():
    nf4, int8 = _trial(quant={"method": "nf4"}), _trial(quant={"method": "int8"})
    assert quantized_linear_bytes(nf4, TINY) == NF4_BYTES and quantized_linear_bytes(int8, TINY) == INT8_BYTES
    assert quantize_entry_bytes(nf4, TINY) == NF4_BYTES + OTHER_BYTES
    # bf16 training loads the other weights in bf16, the adapters train and save in bf16
    bf16 = _trial(quant={"method": "nf4"}, train={"precision": "bf16"}, lora={"rank": 8})
    assert quantize_entry_bytes(bf16, TINY) == NF4_BYTES + 128_320 * 2

    assert calibrate_entry_bytes(nf4, TINY) == 0  # gaussian: no Gram
    assert calibrate_entry_bytes(_trial(init={"method": "quailora"}), TINY) == GRAM_BYTES

    r8 = _trial(lora={"rank": 8})
    assert initialize_entry_bytes(r8, TINY) == 4 * 8 * ADAPTER_PER_RANK  # A and B in fp32
    # LoftQ keeps the thin factors of sBA too, r·(in + out) per linear in fp32
    assert (
        initialize_entry_bytes(_trial(lora={"rank": 8}, init={"method": "loftq"}), TINY)
        == 2 * 4 * 8 * ADAPTER_PER_RANK
    )

    # fp32 params + fp32 master + two Adam moments; bf16 params + the same fp32 state
    assert checkpoint_bytes(r8, TINY) == 8 * ADAPTER_PER_RANK * 16
    assert checkpoint_bytes(bf16, TINY) == 8 * ADAPTER_PER_RANK * 14
    assert final_checkpoint_bytes(r8, TINY) == 8 * ADAPTER_PER_RANK * 4  # the adapter alone
    assert final_checkpoint_bytes(bf16, TINY) == 8 * ADAPTER_PER_RANK * 2
    assert artifact_bytes(r8, TINY) == 8 * ADAPTER_PER_RANK * 4 + PROBE_BYTES
    assert artifact_bytes(bf16, TINY) == 8 * ADAPTER_PER_RANK * 2 + PROBE_BYTES


MID, FINAL = 8 * ADAPTER_PER_RANK * 16, 8 * ADAPTER_PER_RANK * 4  # rank 8 (the default), fp32


@pytest.mark.parametrize(
    ("train", "peak"),
    [({"max_steps": 50, "checkpoint_every": 25}, 2 * MID), ({"max_steps": 50, "checkpoint_every": 50}, FINAL),
     ({"max_steps": 50, "checkpoint_every": 0}, FINAL), ({"max_steps": 0}, FINAL),
     ({"max_steps": 50}, 2 * MID),  # by size: a small model checkpoints every 25 steps
     ({"max_steps": 20}, FINAL), ({"max_steps": 20, "checkpoint_minutes": 5}, 2 * MID)],
)  # fmt: skip
def test_checkpoint_peak(train, peak):
    """Two mid-run checkpoints while one replaces the other, or the final one alone."""
    assert checkpoint_peak_bytes(_trial(train=train), TINY) == peak


def test_large_models_checkpoint_by_wall_time():
    large = dataclasses.replace(TINY, other_params=10**9)
    assert checkpoint_peak_bytes(_trial(train={"max_steps": 20}), large) == 2 * MID


def _sweep(**overrides) -> SweepConfig:
    return SweepConfig.model_validate(
        {
            "name": "tiny",
            "base": {"model": {"path": "tiny"}, "data": {"seq_len": SEQ}},
            "space": {"quant": {"grid": [{"method": "nf4", "bits": 4}, {"method": "int8", "bits": 8}]},
                      "init.method": {"grid": ["gaussian", "quailora"]}, "lora.rank": {"grid": [4, 8]},
                      "seed": {"grid": [0, 1]}},
            "drop_if": ["quant.bits == 8 and init.method != 'gaussian'"],
            **overrides,
        }
    )  # fmt: skip


def test_sweep_summary_by_hand():
    matrix = expand(_sweep())
    assert len(matrix.points) == 12  # (nf4 gaussian, nf4 quailora, int8 gaussian) x 2 ranks x 2 seeds
    fp = sweep_footprint(matrix, lambda path: TINY)
    assert sorted(fp.entries["quantize"].sizes) == [NF4_BYTES + OTHER_BYTES, INT8_BYTES + OTHER_BYTES]
    assert fp.entries["calibrate"].sizes == [GRAM_BYTES]  # one model, one calibration set
    # every init is its own: gaussian and quailora's randomized SVD draw with the seed
    assert sorted(fp.entries["initialize"].sizes) == sorted(
        [4 * 4 * ADAPTER_PER_RANK] * 6 + [4 * 8 * ADAPTER_PER_RANK] * 6
    )
    assert fp.cache_total == 1_155_328 + 115_968 + 626_688
    assert {s: len(e.sizes) for s, e in fp.entries.items()} == {
        s: n for s, (n, _) in plan_stage_graph(matrix).counts().items()
    }
    assert not any(e.bounded for e in fp.entries.values())
    # the final checkpoint each trial leaves: N fp32 parameters, rank 4 and 8 six times each
    assert fp.checkpoints.total == 6 * 4 * ADAPTER_PER_RANK * (4 + 8) == 626_688
    # while training: two mid-run checkpoints of N·16 bytes (every 25 of the 50 steps, by size)
    assert (
        sorted(fp.checkpoint_peak.sizes)
        == [2 * 16 * 4 * ADAPTER_PER_RANK] * 6 + [2 * 16 * 8 * ADAPTER_PER_RANK] * 6
    )
    assert fp.artifacts.total == 6 * 4 * ADAPTER_PER_RANK * (4 + 8) + 12 * PROBE_BYTES == 832_512
    text = describe_footprint(fp, "/cache")
    assert "summary: 12 trials" in text
    assert "quantize 2 x 542.5 KiB to 585.8 KiB = 1.1 MiB; calibrate 1 x 113.2 KiB = 113.2 KiB" in text
    assert "initialize 12 x 34.0 KiB to 68.0 KiB = 612.0 KiB; 1.8 MiB in all" in text
    assert (
        "the final one each trial leaves: its trained adapter): 34.0 KiB to 68.0 KiB per trial, 612.0 KiB in all"
        in text
    )
    assert "two while one replaces the other): 272.0 KiB to 544.0 KiB per trial\n" in text
    assert "≤" not in text


def test_repeats_private_caches_sampled_fields_and_optuna():
    # num_samples repeats each grid point: shared entries once, checkpoints and artifacts per trial
    base = sweep_footprint(expand(_sweep()), lambda path: TINY)
    twice = sweep_footprint(expand(_sweep(search={"num_samples": 2})), lambda path: TINY)
    assert twice.cache_total == base.cache_total and twice.trials == 24
    assert twice.checkpoints.total == 2 * base.checkpoints.total

    # share_stages: false computes every stage in every trial, privately
    private = sweep_footprint(expand(_sweep(share_stages=False)), lambda path: TINY)
    assert [len(private.entries[s].sizes) for s in ("quantize", "calibrate", "initialize")] == [12, 4, 12]
    assert private.entries[
        "calibrate"
    ].total == 4 * GRAM_BYTES and "private stage cache" in describe_footprint(private, None)

    # a sampled rank makes each trial's init its own: at most one per trial, at the worst corner (rank 8)
    sampled = SweepConfig.model_validate(
        {"name": "s", "base": {"model": {"path": "tiny"}, "data": {"seq_len": SEQ}, "init": {"method": "quailora"}},
         "space": {"seed": {"grid": [0]}, "lora.rank": {"randint": [4, 9]}}, "search": {"algorithm": "random", "num_samples": 3}}
    )  # fmt: skip
    fp = sweep_footprint(expand(sampled), lambda path: TINY)
    assert (
        fp.entries["initialize"].sizes == [4 * 8 * ADAPTER_PER_RANK] * 3 and fp.entries["initialize"].bounded
    )
    assert len(fp.entries["quantize"].sizes) == 1 and not fp.entries["quantize"].bounded
    assert fp.checkpoints.total == 3 * 4 * 8 * ADAPTER_PER_RANK and fp.checkpoints.bounded
    assert "initialize ≤ 3 x" in describe_footprint(fp, "/cache")

    # Optuna runs num_samples trials over the grid: at most that many entries, the largest ones
    optuna = SweepConfig.model_validate(
        {"name": "o", "base": {"model": {"path": "tiny"}, "data": {"seq_len": SEQ}},
         "space": {"lora.rank": {"grid": [4, 8, 16]}}, "search": {"algorithm": "optuna", "num_samples": 2}}
    )  # fmt: skip
    fp = sweep_footprint(expand(optuna), lambda path: TINY)
    assert fp.entries["initialize"].sizes == [4 * 16 * ADAPTER_PER_RANK, 4 * 8 * ADAPTER_PER_RANK]
    assert len(fp.entries["quantize"].sizes) == 1 and fp.entries["calibrate"].sizes == []
    assert fp.checkpoints.counts == [(2, 4 * 16 * ADAPTER_PER_RANK)] and fp.checkpoints.bounded
    assert fp.checkpoint_peak.counts == [(2, 2 * 16 * 16 * ADAPTER_PER_RANK)]


def test_table_groups_identical_footprints_and_trials_shows_every_row(monkeypatch):
    monkeypatch.setattr(plan, "_shape", lambda path: TINY)
    matrix = expand(_sweep())
    planned = plan.plan_trials(matrix)
    groups = plan.grouped_rows(planned)
    # the seed changes no footprint: 6 groups of the 2 seeds each
    assert [g["grid points"] for g in groups] == [2] * 6
    assert [g["e.g."] for g in groups][:2] == [
        "quant=nf4-4_method=gaussian_rank=4_seed=0",
        "quant=nf4-4_method=gaussian_rank=8_seed=0",
    ]
    assert len({(g["quant weights MiB"], g["adapters+optim MiB"], g["calibration MiB"]) for g in groups}) == 6
    grouped, every = plan.describe(matrix, planned), plan.describe(matrix, planned, every_trial=True)
    assert "6 distinct footprint(s) over 12 grid point(s)" in grouped
    rows = [line for line in grouped.splitlines() if line.startswith("|") and "_seed=" in line]
    assert len(rows) == 6 and all(line.startswith("|             2 | ") for line in rows)
    assert len([line for line in every.splitlines() if line.startswith("| quant=")]) == 12
    assert grouped.index("summary: 12 trials") < grouped.index("| ")  # the summary comes first


def test_calibrate_entry_is_what_the_gram_store_writes(tmp_path):
    """The formula against the writer itself: one layer's Grams through quailora.calibration.store."""
    import torch
    from safetensors import safe_open

    from quailora.calibration.store import write_layer

    widths = TINY.gram_inputs(0)
    assert widths == [H, H, H, FF]  # q/k/v, o, gate/up, down
    name = write_layer(tmp_path, 0, {f"g{k}": torch.eye(n) for k, n in enumerate(widths)})
    with safe_open(tmp_path / name, "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert stored * L == calibrate_entry_bytes(_trial(init={"method": "quailora"}), TINY) == GRAM_BYTES


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "bloom", "gpt_neox"])
def test_gram_inputs_share_as_the_calibration_does(family):
    """ModelShape.gram_inputs counts one Gram per input tensor exactly where collect_grams stores one
    (tests/test_calibration.py SHARING, checked there against the written store)."""
    from orchestrator.model_shapes import input_key, shape_from_config
    from testkit.micro import make_micro_config
    from tests.test_calibration import LAYERS, SHARING

    shape = shape_from_config(make_micro_config(family))
    names = [name for name, _, _ in shape.linear_layers[0]]
    prefix = f"{LAYERS[family]}.0."
    for module, leader in SHARING[family].items():
        assert input_key(prefix + module) == input_key(prefix + leader)
    assert (
        len(shape.gram_inputs(0)) == len({input_key(n) for n in names}) == len(names) - len(SHARING[family])
    )


def test_moe_parameters_grams_and_expected_fallbacks():
    """Issue 31: total and active parameters of a MoE, its per-expert Grams, and the experts a calibration
    size leaves below their Gram's width (quailora.peft_init.too_few_tokens), under uniform routing."""
    from transformers import AutoConfig

    from orchestrator.experts_plan import describe_experts, expected_fallbacks, expert_gram_widths
    from orchestrator.model_shapes import shape_from_config

    config = AutoConfig.for_model("qwen3_moe", hidden_size=64, moe_intermediate_size=32, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  num_experts=16, num_experts_per_tok=4, vocab_size=1000, tie_word_embeddings=False)  # fmt: skip
    shape = shape_from_config(config)
    assert shape.experts() == 16 and shape.experts_per_token == 4
    routed = 2 * 16 * 3 * 64 * 32  # per layer 16 experts x (gate, up: 64 -> 32; down: 32 -> 64)
    assert shape.active_parameters() == shape.num_parameters() - routed * 12 // 16
    assert expert_gram_widths(shape) == [64, 32]  # gate/up read the hidden state, down the expert's own

    # P(Binomial(4, 1/2) < 2) = 5/16 for each of 2 experts; none below 0 tokens; all with no tokens
    assert expected_fallbacks(4, 2, 1, 2) == pytest.approx(2 * 5 / 16)
    assert expected_fallbacks(10**6, 128, 8, 2048) < 1e-6 and expected_fallbacks(0, 128, 8, 768) == 128

    sweep = SweepConfig.model_validate({"name": "moe", "base": {"model": {"path": "tiny-moe"}, "init": {"method": "quailora"},
                                        "calibration": {"num_sequences": 4, "seq_len": 32}},
                                        "space": {"seed": {"grid": [0]}}})  # fmt: skip
    text = "\n".join(describe_experts(expand(sweep), lambda path: shape))
    # 128 tokens, 4 of 16 experts each: ~32 per expert; Grams 64 wide (gate/up) mostly fall back, 32 wide half
    assert "active per token (4 of 16 routed experts in 2 of 2 layers)" in text
    assert "2 Gram(s) per expert (inputs 64, 32 wide), 32 per MoE layer" in text
    assert (
        f"{expected_fallbacks(128, 16, 4, 64):.0f} of 16 below 64 tokens" in text and "~32 per expert" in text
    )
    assert describe_experts(expand(_sweep()), lambda path: TINY) == []  # a dense sweep: nothing
