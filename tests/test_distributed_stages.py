"""The trial's shared stages on real gloo process groups (no Ray): data-parallel Gram collection equals one
process, and LoftQ solved on 2 workers (thin factors gathered, bases rebuilt locally) equals 1 worker."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from quailora.calibration import GramStore, ProcessGroupSum, collect_grams, sequence_share
from quailora.quantizers import get_quantizer
from testkit.micro import make_micro_checkpoint, micro_trial_config
from tests.ports import free_port


def _grams_worker(rank, world_size, port, checkpoint, ids, out, propagate):
    _init(rank, world_size, port)
    try:
        collect_grams(
            checkpoint,
            sequence_share(ids, rank, world_size),
            out if rank == 0 else None,
            propagate=propagate,
            quantizer=get_quantizer("nf4") if propagate == "quantized" else None,
            batch_size=2,
            reducer=ProcessGroupSum(torch.device("cpu")),
        )
    finally:
        dist.destroy_process_group()


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _spawn(fn, world_size, *args):
    """``world_size`` processes in one gloo group on loopback, as a trial's Ray Train workers are."""
    mp.spawn(fn, args=(world_size, free_port(), *args), nprocs=world_size)


@pytest.mark.parametrize(
    ("propagate", "num_sequences", "world_size"),
    [("teacher", 5, 2), ("quantized", 2, 3)],  # 3 + 2 sequences; 1 + 1 + none: a process with no data
)
def test_data_parallel_grams_equal_one_process(tmp_path, propagate, num_sequences, world_size):
    checkpoint = make_micro_checkpoint("llama", tmp_path / "ckpt", num_layers=3)
    ids = torch.randint(0, 128, (num_sequences, 16), generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("nf4") if propagate == "quantized" else None
    one = collect_grams(
        checkpoint, ids, tmp_path / "one", propagate=propagate, quantizer=quantizer, batch_size=2
    )
    _spawn(_grams_worker, world_size, str(checkpoint), ids, str(tmp_path / "many"), propagate)
    many = GramStore(tmp_path / "many")
    assert many.num_tokens == one.num_tokens == ids.numel()
    assert many.names() == one.names() and many.index["modules"] == one.index["modules"]
    for name in one.names():
        a, b = one.get(name).double(), many.get(name).double()
        assert (a - b).norm() <= 1e-6 * a.norm(), name


def _loftq_worker(rank, world_size, port, checkpoint, texts, cache_root, out):
    from quailora.base_layers import base_layer_kind
    from quailora.peft_init import lora_layer_names
    from quailora.quantizers.bnb.layers import exact_cpu_4bit
    from trials import stages
    from trials.adapters import build_adapter
    from trials.cache import StageCache
    from trials.validation import validate_trial

    torch.set_num_threads(1)  # the same BLAS blocking in every process: bit-comparable results
    _init(rank, world_size, port)
    try:
        config = micro_trial_config(checkpoint, texts, init={"method": "loftq", "options": {"iterations": 3}},
                                    resources={"num_workers": world_size})  # fmt: skip
        targets = validate_trial(config).target_names
        ctx = stages.StageContext(
            config, checkpoint, torch.device("cpu"), torch.float32, StageCache(cache_root)
        )
        base, quantized, _ = stages.quantize(ctx)
        model = build_adapter(base, config, targets)
        exact_cpu_4bit(model)
        _, outcome, _ = stages.initialize(ctx, model, None, targets, quantized, None)
        modules = dict(model.named_modules())
        state = {}
        for name in lora_layer_names(model):
            layer = modules[name]
            state[f"{name}.A"] = layer.lora_A["default"].weight.detach().clone()
            state[f"{name}.B"] = layer.lora_B["default"].weight.detach().clone()
            base_layer = layer.get_base_layer()
            state[f"{name}.Q"] = base_layer_kind(base_layer).dequantize(base_layer).clone()
        save_file(state, f"{out}/rank{rank}.safetensors", metadata={"status": outcome.status})
    finally:
        dist.destroy_process_group()


def test_loftq_on_two_workers_equals_one_worker(micro_trial, tmp_path):
    checkpoint, texts = micro_trial
    results = {}
    for world_size in (1, 2):
        out = tmp_path / f"w{world_size}"
        out.mkdir()
        _spawn(
            _loftq_worker,
            world_size,
            checkpoint,
            texts,
            str(tmp_path / f"cache{world_size}"),
            str(out),
        )
        results[world_size] = [load_file(out / f"rank{r}.safetensors") for r in range(world_size)]
    (one,) = results[1]
    original = {}
    for rank_state in results[2]:
        assert rank_state.keys() == one.keys()
        for key, value in one.items():
            assert torch.equal(rank_state[key], value), key  # adapters and re-quantized bases, bit for bit
    # LoftQ did move the bases: Q differs from the plain NF4 quantization of the same checkpoint.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quailora.base_layers import base_layer_kind

    plain = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True), device_map="cpu",
    )  # fmt: skip
    for name, module in plain.named_modules():
        key = f"base_model.model.{name}.Q"
        if key in one:
            original[key] = base_layer_kind(module).dequantize(module)
    assert original and all(not torch.equal(original[k], one[k]) for k in original)


class OnAccelerator:
    """Stands in for a tensor on an accelerator (this machine has none): ``.cpu()`` copies it back."""

    device = torch.device("cuda", 1)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def cpu(self) -> torch.Tensor:
        return self.tensor


def test_solved_updates_are_gathered_as_cpu_tensors(micro_trial, tmp_path, monkeypatch):
    """A pickled CUDA tensor unpickles onto the sender's GPU index, creating a context on the peer's GPU:
    every tensor a worker sends through all_gather_object must be on the CPU, whatever it was solved on."""
    from quailora.architectures import ModelWeights
    from quailora.peft_init import LayerUpdate
    from trials import stages
    from trials.adapters import build_adapter
    from trials.cache import StageCache
    from trials.validation import validate_trial

    checkpoint, texts = micro_trial
    config = micro_trial_config(checkpoint, texts, init={"method": "loftq", "options": {"iterations": 2}},
                                resources={"num_workers": 1})  # fmt: skip
    targets = validate_trial(config).target_names
    solve = stages.compute_adapters

    def solved_on_accelerator(*args, **kwargs):
        return {
            name: LayerUpdate(
                OnAccelerator(u.lora_A),
                OnAccelerator(u.lora_B),
                u.base_residual and tuple(OnAccelerator(t) for t in u.base_residual),
            )  # fmt: skip
            for name, u in solve(*args, **kwargs).items()
        }

    sent = []
    gather = dist.all_gather_object
    monkeypatch.setattr(stages, "compute_adapters", solved_on_accelerator)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: (sent.append(obj), gather(out, obj))[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ctx = stages.StageContext(
            config, checkpoint, torch.device("cpu"), torch.float32, StageCache(tmp_path / "cache")
        )
        model = build_adapter(stages.quantize(ctx)[0], config, targets)
        gathered = stages._solve_shared(model, ctx, ModelWeights(checkpoint), None)
    finally:
        dist.destroy_process_group()
    (payload,) = sent
    assert payload.keys() == gathered.keys() and len(payload) == len(targets)
    assert all(update.base_residual for update in payload.values())  # LoftQ moves Q: thin factors travel
    for update in (*payload.values(), *gathered.values()):
        for tensor in (update.lora_A, update.lora_B, *update.base_residual):
            assert isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"


def _two_node_worker(rank, world_size, port, checkpoint, texts, root, out):
    """One trial's two ranks on two 'nodes': each has its own temp dir, and rank 1's cache path does not
    exist, as on a node whose local disk lacks the leader's cache."""
    import tempfile

    from quailora.peft_init import lora_layer_names
    from quailora.quantizers.bnb.layers import exact_cpu_4bit
    from trials import stages
    from trials.adapters import build_adapter
    from trials.cache import StageCache
    from trials.stage_transfer import EntryTransfer
    from trials.validation import validate_trial
    from trials.worker import load_data

    torch.set_num_threads(1)
    tempfile.tempdir = f"{root}/tmp{rank}"
    os.makedirs(tempfile.tempdir, exist_ok=True)
    _init(rank, world_size, port)
    try:
        config = micro_trial_config(checkpoint, texts, init={"method": "quailora", "options": {"iterations": 2}},
                                    resources={"num_workers": world_size})  # fmt: skip
        targets = validate_trial(config).target_names
        cache = StageCache(f"{root}/cache" if rank == 0 else f"{root}/absent")
        ctx = stages.StageContext(config, checkpoint, torch.device("cpu"), torch.float32, cache,
                                  EntryTransfer(rank, torch.device("cpu"), "run"))  # fmt: skip
        base, quantized, q = stages.quantize(ctx)
        grams, calibrated, c = stages.calibrate(ctx, load_data(config, checkpoint).calibration)
        model = build_adapter(base, config, targets)
        exact_cpu_4bit(model)
        _, i, _ = stages.initialize(ctx, model, grams, targets, quantized, calibrated)
        received = ctx.transfer.root.is_dir()
        sent = ctx.transfer.sent_bytes
        ctx.transfer.entry(c.path)  # the Grams asked for again (a stage job's next init key): not sent twice
        resent = ctx.transfer.sent_bytes - sent
        ctx.transfer.release()
        modules = dict(model.named_modules())
        state = {
            f"{n}.A": modules[n].lora_A["default"].weight.detach().clone() for n in lora_layer_names(model)
        }
        state |= {
            f"{n}.B": modules[n].lora_B["default"].weight.detach().clone() for n in lora_layer_names(model)
        }
        metadata = {"statuses": " ".join(o.status for o in (q, c, i)), "sent": str(ctx.transfer.sent_bytes),
                    "received": str(received), "left": str(ctx.transfer.root.exists()),
                    "resent": str(resent)}  # fmt: skip
        save_file(state, f"{out}/rank{rank}.safetensors", metadata=metadata)
    finally:
        dist.destroy_process_group()


def test_ranks_on_another_node_get_stage_entries_over_the_process_group(micro_trial, tmp_path):
    """Issue 26 item 2: only rank 0 reads and writes the cache; a rank on another node receives what it
    reads (Grams when computed; quantized base, Grams and adapters when reused) and removes its copy after."""
    from safetensors import safe_open

    from trials.cache import StageCache

    checkpoint, texts = micro_trial
    runs = []
    for attempt in ("first", "again"):
        out = tmp_path / attempt
        out.mkdir()
        _spawn(_two_node_worker, 2, checkpoint, texts, str(tmp_path), str(out))
        ranks = []
        for rank in range(2):
            with safe_open(out / f"rank{rank}.safetensors", "pt") as f:
                ranks.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))  # noqa: SIM118
        runs.append(ranks)
    sizes = {e.stage: e.size_bytes for e in StageCache(tmp_path / "cache").entries()}
    assert sorted(sizes) == ["calibrate", "initialize", "quantize"]
    (first0, m0), (first1, m1) = runs[0]
    assert m0["statuses"] == m1["statuses"] == "computed computed computed"
    assert int(m0["sent"]) == sizes["calibrate"]  # every rank holds its quantized base and solved adapters
    assert m0["resent"] == "0"
    assert (m1["received"], m1["left"]) == ("True", "False") and m0["received"] == "False"
    (again0, n0), (again1, n1) = runs[1]
    assert n0["statuses"] == n1["statuses"] == "reused reused reused"
    assert int(n0["sent"]) == sum(sizes.values())
    assert not (tmp_path / "absent").exists()  # rank 1 never touched its cache path
    for state in (first1, again0, again1):
        assert state.keys() == first0.keys()
        assert all(torch.equal(state[k], first0[k]) for k in first0)
