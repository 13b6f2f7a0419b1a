"""Layer-sharded calibration against the whole model loaded normally, bad input, memory and partitioning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, BloomModel

from quailora.calibration import GramStore, LayerwiseModel, collect_grams, partition_layers, run_layers
from quailora.checkpoint import SafetensorsWeights
from quailora.errors import QuailoraInputError
from quailora.quantizers import get_quantizer
from testkit.micro import make_micro_checkpoint

# family -> {module of a decoder layer: the module whose input it reads too}
SHARING = {
    "llama": {
        "self_attn.k_proj": "self_attn.q_proj",
        "self_attn.v_proj": "self_attn.q_proj",
        "mlp.up_proj": "mlp.gate_proj",
    },
    "mistral": {
        "self_attn.k_proj": "self_attn.q_proj",
        "self_attn.v_proj": "self_attn.q_proj",
        "mlp.up_proj": "mlp.gate_proj",
    },
    "qwen2": {
        "self_attn.k_proj": "self_attn.q_proj",
        "self_attn.v_proj": "self_attn.q_proj",
        "mlp.up_proj": "mlp.gate_proj",
    },
    "opt": {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj"},
    "bloom": {},
    "gpt_neox": {},
}
LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "bloom": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def calibration_ids(num_seq: int = 5, seq_len: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (num_seq, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_run(model: nn.Module, layers_path: str, input_ids: torch.Tensor):
    """Grams (float64 sums / N) of every Linear in the decoder layers and the last layer's output, from one
    ordinary forward of the whole model."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return record

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith(layers_path + ".")
    ]
    outputs = []
    last = model.get_submodule(layers_path)[-1]
    handles.append(
        last.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
    )
    model(input_ids=input_ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: (s / input_ids.numel()).float() for n, s in sums.items()}, outputs[0]


def assert_grams_match(store: GramStore, expected: dict[str, torch.Tensor]) -> None:
    assert store.names() == sorted(expected)
    for name, gram in expected.items():
        torch.testing.assert_close(store.get(name), gram, rtol=1e-4, atol=1e-6 * gram.abs().max().item())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("micro")
    return {
        family: make_micro_checkpoint(family, root / family, num_layers=2, hidden=64) for family in LAYERS
    }


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_layer_sharded_grams_and_outputs_match_full_model(family, checkpoints, tmp_path):
    ckpt = checkpoints[family]
    assert (ckpt / "model.safetensors.index.json").is_file() and len(list(ckpt.glob("*.safetensors"))) > 1
    ids = calibration_ids()
    store = collect_grams(ckpt, ids, tmp_path / "grams", batch_size=2)  # 3 batches, the last one smaller

    full = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    grams, last_hidden = reference_run(full, LAYERS[family], ids)
    assert_grams_match(store, grams)
    assert store.num_tokens == ids.numel()
    assert store.layers() == [0, 1]

    prefix = f"{LAYERS[family]}.0."
    for module, leader in SHARING[family].items():
        assert store.shared_key(prefix + module) == prefix + leader
    stored = {store.shared_key(n) for n in store.names(layer=0)}
    assert len(stored) == len(store.names(layer=0)) - len(SHARING[family])

    model = LayerwiseModel(ckpt)
    calls = model.capture_inputs(ids, batch_size=2)
    run_layers(model, calls, tmp_path / "again")
    torch.testing.assert_close(torch.cat([c.hidden for c in calls]), last_hidden, rtol=1e-5, atol=1e-5)


def test_bfloat16_checkpoint_is_computed_in_float32(tmp_path):
    ckpt = make_micro_checkpoint("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    assert SafetensorsWeights(ckpt).get("model.layers.0.mlp.up_proj.weight").dtype == torch.float32
    ids = calibration_ids()
    store = collect_grams(ckpt, ids, tmp_path / "grams")
    grams, _ = reference_run(
        AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), LAYERS["llama"], ids
    )
    assert_grams_match(store, grams)


def test_batches_of_one_size_share_their_masks(checkpoints):
    """Bloom's eager attention gets a 4-D mask and an alibi tensor per batch: equal ones are kept once."""
    calls = LayerwiseModel(checkpoints["bloom"]).capture_inputs(calibration_ids(num_seq=5), batch_size=2)
    first, second, last = calls
    for key in ("attention_mask", "alibi"):
        assert isinstance(first.kwargs[key], torch.Tensor)
        assert second.kwargs[key] is first.kwargs[key]
        assert last.kwargs[key].shape[0] < first.kwargs[key].shape[0]  # the smaller last batch has its own


def test_store_reopens_and_layers_split_across_workers(checkpoints, tmp_path):
    ids = calibration_ids()
    written = collect_grams(checkpoints["llama"], ids, tmp_path)
    reopened = GramStore(tmp_path)  # what a worker in another process does
    assert reopened.names() == written.names() and reopened.num_tokens == ids.numel()
    assert reopened.layers() == [0, 1]
    for part in partition_layers(reopened.layers(), 2):
        for name in (n for layer in part for n in reopened.names(layer=layer)):
            assert torch.equal(reopened.get(name), written.get(name))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # one file per decoder layer


def test_unpack_gram_mirrors_across_blocks(monkeypatch):
    """The lower triangle is filled in square blocks: widths below, at and across several blocks, the last
    one partial, come back exactly."""
    from quailora.calibration import store

    monkeypatch.setattr(store, "MIRROR_BLOCK", 8)
    for n in (5, 8, 19, 32):
        x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(n))
        gram = x.T @ x
        symmetric = (gram + gram.T) / 2
        assert torch.equal(store.unpack_gram(store.pack_gram(symmetric)), symmetric), n


def test_grams_are_stored_as_their_upper_triangle_and_read_once_per_shared_input(checkpoints, tmp_path):
    """Issue 27: H is symmetric, so the store keeps its upper triangle (about half the bytes, in fp32: half
    precision moved the calibrated objective far beyond 1e-3, benchmarks/gram_precision.py), and modules
    that share an input read its Gram once."""
    from safetensors import safe_open

    from quailora.calibration.store import pack_gram, unpack_gram

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 24, generator=gen)
    gram = x.T @ x / 64
    symmetric = (gram + gram.T) / 2
    assert torch.equal(unpack_gram(pack_gram(symmetric)), symmetric)  # exact on a symmetric matrix
    assert pack_gram(gram).numel() == 24 * 25 // 2
    rows, cols = torch.triu_indices(24, 24)
    assert torch.equal(
        pack_gram(gram), gram[rows, cols]
    )  # the stored order: row by row, as entries always were

    store = collect_grams(checkpoints["llama"], calibration_ids(), tmp_path)
    names = store.names(layer=0)
    n = {name: store.get(name).shape[0] for name in names}
    with safe_open(tmp_path / store.index["layers"]["0"], "pt") as f:
        assert all(f.get_tensor(k).dim() == 1 for k in f.keys())  # noqa: SIM118
        stored = sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118
    full = sum(n[k] ** 2 for k in {store.shared_key(name): name for name in names})
    assert stored < 0.6 * full
    again = GramStore(tmp_path)
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    in_model_order = sorted(names, key=lambda name: order.index(name.rsplit(".", 1)[1]))
    got = [again.get(name) for name in in_model_order]  # as peft_init.compute_adapters solves them
    assert again.reads == len({store.shared_key(name) for name in names}) < len(names)
    for h in got:
        assert torch.equal(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > -1e-6


def test_checkpoint_without_base_model_prefix(tmp_path):
    """Hub bloom checkpoints are saved from BloomModel: keys read 'h.0...' instead of 'transformer.h.0...'."""
    ckpt = make_micro_checkpoint("bloom", tmp_path / "causal")
    bare = BloomModel.from_pretrained(ckpt, dtype=torch.float32)
    bare.config.architectures = ["BloomModel"]
    bare.save_pretrained(tmp_path / "bare", max_shard_size="100KB")
    assert not any(k.startswith("transformer.") for k in SafetensorsWeights(tmp_path / "bare"))
    ids = calibration_ids()
    a = collect_grams(ckpt, ids, tmp_path / "a")
    b = collect_grams(tmp_path / "bare", ids, tmp_path / "b")
    assert a.names() == b.names()
    for name in a.names():
        torch.testing.assert_close(a.get(name), b.get(name))


@torch.no_grad()
def test_quantized_propagation_feeds_fake_quantized_outputs(checkpoints, tmp_path):
    """Layer l's Grams equal those of the full model with layers < l fake-quantized; teacher ones differ."""
    ckpt, layers = checkpoints["llama"], LAYERS["llama"]
    quantizer = get_quantizer("nf4")
    ids = calibration_ids()
    store = collect_grams(ckpt, ids, tmp_path, propagate="quantized", quantizer=quantizer, batch_size=2)

    full = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    teacher, _ = reference_run(full, layers, ids)
    for module in full.get_submodule(f"{layers}.0").modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(quantizer.fake_quantize(module.weight))
    after_quantized_layer0, _ = reference_run(full, layers, ids)
    for name in store.names(layer=0):
        torch.testing.assert_close(store.get(name), teacher[name], rtol=1e-4, atol=1e-7)
    for name in store.names(layer=1):
        torch.testing.assert_close(store.get(name), after_quantized_layer0[name], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(store.get(name), teacher[name], rtol=1e-3, atol=0)


def test_float64_accumulation_agrees(checkpoints, tmp_path):
    ids = calibration_ids()
    f32 = collect_grams(checkpoints["opt"], ids, tmp_path / "f32")
    f64 = collect_grams(checkpoints["opt"], ids, tmp_path / "f64", dtype=torch.float64)
    assert json.loads((tmp_path / "f64" / "grams.index.json").read_text())["accumulate_dtype"] == "float64"
    for name in f32.names():
        assert f64.get(name).dtype == torch.float32
        torch.testing.assert_close(f64.get(name), f32.get(name), rtol=1e-4, atol=1e-7)


BAD_CALLS = {
    "float ids": (dict(input_ids=torch.zeros(2, 4)), "dtype"),
    "1-d ids": (dict(input_ids=torch.zeros(4, dtype=torch.long)), "input_ids"),
    "token beyond vocab": (dict(input_ids=torch.full((2, 4), 128)), "vocab_size=128"),
    "too long": (dict(input_ids=torch.zeros(1, 257, dtype=torch.long)), "max_position_embeddings=256"),
    "propagate": (dict(propagate="student"), "'student'"),
    "quantized without quantizer": (dict(propagate="quantized"), "quantizer"),
    "teacher with quantizer": (dict(quantizer=get_quantizer("nf4")), "propagate='quantized'"),
    "dtype": (dict(dtype=torch.float16), "torch.float16"),
    "batch_size": (dict(batch_size=0), "batch_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_rejected_before_compute(case, checkpoints, tmp_path):
    overrides, fragment = BAD_CALLS[case]
    kwargs = dict(input_ids=calibration_ids()) | overrides
    with pytest.raises(QuailoraInputError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        collect_grams(checkpoints["llama"], out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_are_named(checkpoints, tmp_path):
    with pytest.raises(QuailoraInputError, match="no config.json"):
        collect_grams(tmp_path, calibration_ids(), tmp_path / "out")
    with pytest.raises(QuailoraInputError, match=r"neither model.safetensors nor"):
        SafetensorsWeights(tmp_path)
    with pytest.raises(QuailoraInputError, match=r"'model.layers.9.mlp.up_proj.weight' is not in checkpoint"):
        SafetensorsWeights(checkpoints["llama"]).get("model.layers.9.mlp.up_proj.weight")

    broken = make_micro_checkpoint("llama", tmp_path / "broken", max_shard_size="10GB")
    weights = SafetensorsWeights(broken)
    state = {k: weights.get(k) for k in weights if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, broken / "model.safetensors")
    with pytest.raises(QuailoraInputError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        collect_grams(broken, calibration_ids(), tmp_path / "out")
    sharded = make_micro_checkpoint("opt", tmp_path / "sharded")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(QuailoraInputError, match=r"names missing shard\(s\) \['.*model-00002-of"):
        SafetensorsWeights(sharded)

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(QuailoraInputError, match=r"model_type 't5' is not a decoder-only causal LM"):
        collect_grams(t5, calibration_ids(), tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(QuailoraInputError, match="has no grams.index.json"):
        GramStore(tmp_path)
    store = collect_grams(checkpoints["llama"], calibration_ids(), tmp_path / "grams")
    with pytest.raises(QuailoraInputError, match="'model.layers.0.lm_head' has no Gram"):
        store.get("model.layers.0.lm_head")


@pytest.mark.parametrize(
    ("layers", "world_size", "expected"),
    [
        (list(range(7)), 3, [[0, 1, 2], [3, 4], [5, 6]]),
        (list(range(8)), 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ([4, 9], 3, [[4], [9], []]),
        ([], 2, [[], []]),
    ],
)
def test_partition_layers(layers, world_size, expected):
    assert partition_layers(layers, world_size) == expected


def test_partition_layers_rejects_bad_input():
    with pytest.raises(QuailoraInputError, match="world_size must be a positive int, got 0"):
        partition_layers([0, 1], 0)
    with pytest.raises(QuailoraInputError, match=r"distinct, got \[0, 1, 1\]"):
        partition_layers([0, 1, 1], 2)


# Peak RSS of one run, measured in a fresh process (quailora/peak_memory.py). The peak is reset
# after imports and a warm-up run; a fixed glibc mmap threshold makes freed tensors leave the RSS at once.
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from quailora.calibration import collect_grams
    from quailora.peak_memory import peak_memory_mb, reset_peak_memory

    def peak_kib():
        return peak_memory_mb()["peak_rss_mb"] * 1024

    def reset_peak():
        reset_peak_memory()
        return peak_kib()

    torch.set_num_threads(1)
    warmup, ckpt, out = sys.argv[1:4]
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    collect_grams(warmup, ids, out + "/warmup")
    base = reset_peak()
    collect_grams(ckpt, ids, out + "/grams", batch_size=4)
    layerwise = peak_kib() - base
    base = reset_peak()
    with torch.no_grad():
        AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)(input_ids=ids[:4], use_cache=False)
    print(json.dumps({"layerwise_kib": layerwise, "full_kib": peak_kib() - base}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_peak_memory_does_not_grow_with_layers(tmp_path):
    shape = dict(hidden=512, intermediate=1024, heads=8, max_shard_size="8MB")
    warmup = make_micro_checkpoint("llama", tmp_path / "warmup", num_layers=1, hidden=64)
    peaks = {}
    for num_layers in (2, 8):
        ckpt = make_micro_checkpoint("llama", tmp_path / f"l{num_layers}", num_layers=num_layers, **shape)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        run = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(warmup), str(ckpt), str(tmp_path / f"out{num_layers}")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[num_layers] = json.loads(run.stdout.strip().splitlines()[-1])
    layer_kib = (
        sum(t.numel() * 4 for t in SafetensorsWeights(tmp_path / "l2").state_dict("model.layers.0").values())
        / 1024
    )
    growth = peaks[8]["layerwise_kib"] - peaks[2]["layerwise_kib"]
    full_growth = peaks[8]["full_kib"] - peaks[2]["full_kib"]
    print(f"one layer {layer_kib:.0f} KiB; peaks {peaks}")
    assert full_growth > 4 * layer_kib, f"the measurement should see 6 extra resident layers: {peaks}"
    assert growth < layer_kib, f"layer-sharded peak grew by {growth} KiB from 2 to 8 layers: {peaks}"


def test_tf32_matmul_is_scoped_to_its_block():
    """The Gram accumulator turns TF32 on for bf16 inputs on CUDA only inside its matmul (tests/test_gpu.py
    checks the sums against fp64 on a GPU): the global setting comes back, also after an error."""
    from quailora.calibration.accumulate import tf32_matmul

    before = torch.backends.cuda.matmul.fp32_precision
    with tf32_matmul(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with pytest.raises(RuntimeError), tf32_matmul(True):
        raise RuntimeError("a failed matmul")
    with tf32_matmul(False):
        assert torch.backends.cuda.matmul.fp32_precision == before
    assert torch.backends.cuda.matmul.fp32_precision == before
