"""The trial's shared stages on real gloo process groups (no Ray): data-parallel Gram collection equals one
process, and LoftQ solved on 2 workers (thin factors gathered, bases rebuilt locally) equals 1 worker."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from quailora.calibration import GramStore, ProcessGroupSum, collect_grams, sequence_share
from quailora.quantizers import get_quantizer
from tests.micro_models import make_micro_checkpoint
from tests.test_trial_fixtures import make_texts, make_trial_checkpoint, micro_trial_config


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _spawn(fn, world_size, *args):
    """``world_size`` processes in one gloo group on loopback, as a trial's Ray Train workers are."""
    mp.spawn(fn, args=(world_size, _free_port(), *args), nprocs=world_size)


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
    from quailora.base_layers import base_layer_kind, exact_cpu_4bit
    from quailora.peft_init import lora_layer_names
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


def test_loftq_on_two_workers_equals_one_worker(tmp_path):
    checkpoint, texts = make_trial_checkpoint(tmp_path / "ckpt"), make_texts(tmp_path)
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
