"""Checkpoint reads (quailora.checkpoint): tensors in their stored dtype straight onto the target device,
converted there, on a thread pool, bit-identical to the float32 CPU copies reads used to make."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quailora import checkpoint as ckpt
from quailora.checkpoint import INDEX_FILE, SafetensorsWeights, read_threads
from quailora.errors import QuailoraInputError

STORED = {
    "model.embed_tokens.weight": torch.bfloat16,
    "model.layers.0.self_attn.q_proj.weight": torch.bfloat16,
    "model.layers.0.self_attn.q_proj.bias": torch.float16,
    "model.layers.0.mlp.down_proj.weight": torch.float32,
    "model.layers.0.input_layernorm.weight": torch.bfloat16,
    "model.layers.0.scale": torch.float32,  # 0-d
    "model.layers.0.position_ids": torch.int64,
    "model.layers.1.self_attn.q_proj.weight": torch.float16,
    "model.layers.1.mlp.down_proj.weight": torch.bfloat16,
    "model.layers.1.input_layernorm.weight": torch.float32,
    "lm_head.weight": torch.float64,
}


def _tensor(name: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.arange(37, dtype=dtype)
    if name.endswith("scale"):
        return torch.tensor(0.3, dtype=dtype)
    shape = (48,) if name.endswith(("bias", "layernorm.weight")) else (96, 64)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A three-shard checkpoint of mixed stored dtypes (bf16, fp16, fp32, fp64, int64, a 0-d tensor)."""
    root = tmp_path_factory.mktemp("sharded")
    generator = torch.Generator().manual_seed(0)
    tensors = {name: _tensor(name, dtype, generator) for name, dtype in STORED.items()}
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, tensor) in enumerate(tensors.items()):
        shards.setdefault(f"model-{i % 3 + 1:05d}-of-00003.safetensors", {})[name] = tensor
    weight_map = {}
    for shard, state in shards.items():
        save_file(state, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, shard))
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def old_get(weights: SafetensorsWeights, name: str) -> torch.Tensor:
    """What ``get`` did before reads went device-direct: a float32 copy on the CPU, one thread."""
    key, path = weights.stored_key(name)
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key).to(torch.float32, copy=True)


def stored(weights: SafetensorsWeights, name: str) -> torch.Tensor:
    key, path = weights.stored_key(name)
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key).clone()


@pytest.fixture(autouse=True)
def pooled(monkeypatch):
    """These tensors are small: hand them all to the pool, as a checkpoint's weights are."""
    monkeypatch.setattr(ckpt, "INLINE_BYTES", 0)


@pytest.fixture(params=[False, True], ids=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Also read every tensor over 1 KiB in row chunks, as a large weight is."""
    if request.param:
        monkeypatch.setattr(ckpt, "CHUNK_BYTES", 1024)
    return request.param


def test_chunks_cover_the_rows(monkeypatch):
    monkeypatch.setattr(ckpt, "CHUNK_BYTES", 1000)
    tensor = torch.zeros(10, 100, dtype=torch.float32)  # 4000 bytes: 4 chunks of 3, 3, 3, 1 rows
    rows = ckpt._chunks(tensor)
    assert [(r.start, r.stop) for r in rows] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert ckpt._chunks(torch.zeros(1, 10_000)) == [None]
    assert ckpt._chunks(torch.tensor(1.0)) == [None]


@pytest.mark.parametrize("threads", [1, 4])
def test_float32_reads_bit_identical_to_the_old_path(sharded, chunking, threads):
    weights = SafetensorsWeights(sharded)
    for name in weights:
        got, want = weights.get(name, threads=threads), old_get(weights, name)
        if not STORED[name].is_floating_point:  # integer tensors keep their dtype now
            assert got.dtype == stored(weights, name).dtype and torch.equal(got.to(torch.float32), want), name
            continue
        assert got.dtype == torch.float32 and got.device.type == "cpu", name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_converted_reads_equal_the_old_path_then_converted(sharded, chunking, dtype):
    """A compute dtype other than float32: the same values as the float32 copy converted afterwards (what
    the callers did), fp64 included (rounded through float32)."""
    weights = SafetensorsWeights(sharded)
    for name in weights:
        want = old_get(weights, name)
        if not STORED[name].is_floating_point:
            continue
        got = weights.get(name, device="cpu", dtype=dtype, threads=3)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype)), name


def test_stored_dtype_kept_when_asked(sharded, chunking):
    weights = SafetensorsWeights(sharded)
    for name, dtype in STORED.items():
        got = weights.get(name, dtype=None, threads=2)
        assert got.dtype == dtype and torch.equal(got, stored(weights, name)), name
        # An owned copy, not a view of the memory-mapped file (which would keep the file's pages mapped).
        assert got.untyped_storage().resizable(), name


def test_parallel_state_dict_equals_the_serial_one(sharded, chunking):
    weights = SafetensorsWeights(sharded)
    for prefix in ("model.layers.0", "model.layers.1.", "model"):
        serial = weights.state_dict(prefix, threads=1)
        parallel = weights.state_dict(prefix, threads=4)
        names = [n for n in weights if n.startswith(prefix.rstrip(".") + ".")]
        old = {n[len(prefix.rstrip(".")) + 1 :]: old_get(weights, n) for n in names}
        assert list(parallel) == list(serial) and set(parallel) == set(old)
        for key, want in old.items():
            assert torch.equal(parallel[key], serial[key]) and parallel[key].dtype == serial[key].dtype, key
            assert torch.equal(parallel[key].to(want.dtype), want), key
    bf16 = weights.state_dict("model.layers.0", dtype=None, threads=4)
    assert bf16["self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert bf16["position_ids"].dtype == torch.int64


def test_read_keeps_order_and_bounds_tensors_in_flight(sharded, monkeypatch):
    started = []

    class Counted(ckpt._Read):
        def __init__(self, name, *args):
            started.append(name)
            super().__init__(name, *args)

    monkeypatch.setattr(ckpt, "_Read", Counted)
    weights = SafetensorsWeights(sharded)
    names = weights.keys()[::-1]
    yielded = []
    for name, _ in weights.read(names, threads=3):
        yielded.append(name)
        assert len(started) - len(yielded) <= 3 - 1  # the one just yielded counted, at most 3 at once
    assert yielded == names == started


def test_reads_overlap_on_the_thread_pool(sharded, monkeypatch):
    """The copies out of the mapped file run on pool threads, several at once: the first two copies wait
    for each other at a barrier, which only concurrent calls can pass."""
    barrier = threading.Barrier(2, timeout=10)
    idents: list[int] = []
    copy = ckpt._copy_chunk

    def waiting(out, stored):
        idents.append(threading.get_ident())
        if len(idents) <= 2:
            barrier.wait()
        copy(out, stored)

    monkeypatch.setattr(ckpt, "_copy_chunk", waiting)
    weights = SafetensorsWeights(sharded)
    state = weights.state_dict("model.layers.0", threads=2)
    assert len(state) == 6
    assert len(set(idents)) == 2 and threading.get_ident() not in idents


def test_one_large_tensor_is_read_by_several_threads(sharded, monkeypatch):
    monkeypatch.setattr(ckpt, "CHUNK_BYTES", 1024)  # a (96, 64) bf16 weight: 12 chunks
    idents: set[int] = set()
    barrier = threading.Barrier(3, timeout=10)
    copy = ckpt._copy_chunk

    def waiting(out, stored):
        first = len(idents) < 3 and threading.get_ident() not in idents
        idents.add(threading.get_ident())
        if first:
            barrier.wait()
        copy(out, stored)

    monkeypatch.setattr(ckpt, "_copy_chunk", waiting)
    weights = SafetensorsWeights(sharded)
    name = "model.embed_tokens.weight"
    assert torch.equal(weights.get(name, threads=3), old_get(weights, name))
    assert len(idents) == 3


def test_one_thread_reads_inline(sharded, monkeypatch):
    idents = set()
    copy = ckpt._copy_chunk
    monkeypatch.setattr(ckpt, "_copy_chunk", lambda out, s: (idents.add(threading.get_ident()), copy(out, s)))
    SafetensorsWeights(sharded).state_dict("model", threads=1)
    assert idents == {threading.get_ident()}


def test_small_tensors_are_copied_inline(sharded, monkeypatch):
    # The 0-d scale (4 bytes) is copied inline, the (96, 64) weights (12 KiB) on the pool.
    monkeypatch.setattr(ckpt, "INLINE_BYTES", 100)
    idents = {}
    copy = ckpt._copy_chunk

    def record(out, s):
        idents.setdefault(s.dim(), set()).add(threading.get_ident())
        copy(out, s)

    monkeypatch.setattr(ckpt, "_copy_chunk", record)
    state = SafetensorsWeights(sharded).state_dict("model.layers.0", threads=2)
    assert idents[0] == {threading.get_ident()} and threading.get_ident() not in idents[2]
    assert torch.equal(state["scale"], torch.tensor(0.3))


def test_missing_name_fails_before_any_read(sharded, monkeypatch):
    monkeypatch.setattr(ckpt, "_copy_chunk", lambda *a: pytest.fail("read before the names were checked"))
    weights = SafetensorsWeights(sharded)
    with pytest.raises(QuailoraInputError, match="not in checkpoint"):
        list(weights.read(["model.layers.0.scale", "model.layers.9.nothing"]))


def test_read_threads_from_affinity_or_environment(monkeypatch):
    monkeypatch.delenv(ckpt.READ_THREADS_ENV, raising=False)
    assert 1 <= read_threads() <= ckpt.MAX_READ_THREADS
    monkeypatch.setattr(ckpt.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert read_threads() == ckpt.MAX_READ_THREADS
    monkeypatch.setenv(ckpt.READ_THREADS_ENV, "3")
    assert read_threads() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(ckpt.READ_THREADS_ENV, bad)
        with pytest.raises(QuailoraInputError, match=ckpt.READ_THREADS_ENV):
            read_threads()


def test_model_weights_reads_on_a_device_and_transposes(tmp_path):
    """ModelWeights.read passes device and dtype through and still turns Conv1D weights into (out, in)."""
    from transformers import AutoConfig

    from quailora.architectures import Layout, ModelWeights, meta_model
    from testkit.micro import make_micro_checkpoint

    checkpoint = make_micro_checkpoint(
        "gpt2", tmp_path / "gpt2", num_layers=1, hidden=64, dtype=torch.bfloat16
    )
    model = meta_model(AutoConfig.from_pretrained(checkpoint))
    weights = ModelWeights(checkpoint, Layout.of(model))
    keys = [key for key in model.state_dict() if key in weights]
    assert any(weights.locate(key)[2] for key in keys)
    got = dict(weights.read(keys, device="cpu", dtype=torch.float16, threads=2))
    assert list(got) == keys
    for key in keys:
        name, _, transposed = weights.locate(key)
        old = old_get(weights.stored, name)
        old = old.T.contiguous() if transposed else old
        assert got[key].dtype == torch.float16 and torch.equal(got[key], old.to(torch.float16)), key
        assert torch.equal(weights.get(key), old), key
        assert weights.get(key, dtype=None).dtype == torch.bfloat16, key


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
)
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_reads_onto_cuda(sharded, chunking, device):
    """Read onto the GPU in the stored dtype and converted there: the old float32 CPU copy's values, moved."""
    weights = SafetensorsWeights(sharded)
    for name in weights:
        want = old_get(weights, name)
        raw = weights.get(name, device=device, dtype=None, threads=3)
        assert raw.device == torch.device("cuda", 0) and raw.dtype == STORED[name], name
        assert torch.equal(raw.cpu(), stored(weights, name)), name
        if STORED[name].is_floating_point:
            for dtype in (torch.float32, torch.bfloat16):
                got = weights.get(name, device=device, dtype=dtype, threads=3)
                assert got.device.type == "cuda" and torch.equal(got.cpu(), want.to(dtype)), (name, dtype)
    state = weights.state_dict("model.layers.0", device=device, dtype=torch.bfloat16, threads=4)
    assert all(t.device.type == "cuda" for t in state.values())
    assert state["position_ids"].dtype == torch.int64
