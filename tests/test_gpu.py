"""What only a CUDA device can show. Marked ``gpu``; every test is skipped, with the reason, without CUDA.

    pytest -m gpu tests/test_gpu.py      # scripts/gpu_check.sh runs these, and more, in one go

bitsandbytes on CUDA against each layer's own quantizer, init methods on CUDA against the CPU, Grams on
CUDA, group-wise INT-k loading and training memory on CUDA, fp16 fine-tuning on NCCL, a one-trial sweep
(ZeRO-2, bf16, gradient checkpointing) with its MLflow artifacts and its memory against plan's estimate,
and a ZeRO-3 trial over an NF4 base stored in bf16. Figures go to the test report as properties
(``record_property``), which scripts/gpu_check.py copies into its summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from mlflow.tracking import MlflowClient

from quailora.api import initialize
from quailora.architectures import ModelWeights
from quailora.base_layers import base_layer_kind
from quailora.bench import method_options_for, synthetic_layer
from quailora.initializers import adapter_kind, needs_gram
from quailora.linalg import adapter_product, calibrated_error, weight_error
from quailora.peft_init import LayerUpdate
from quailora.qalora.pooling import expand
from quailora.quantizers import get_quantizer
from quailora.quantizers.groupwise.layer import GroupwiseLinear
from quailora.quantizers.groupwise.loading import load_groupwise_model
from testkit.micro import make_texts, make_trial_checkpoint, micro_trial_config
from testkit.sweeps import check_sweep_outcome, one_trial_sweep, sweep_outcome
from tests.ports import free_port
from tests.test_trial_precision import train_worker
from trials.quantized_model import load_quantized_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]  # fmt: skip
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
METHODS = ["gaussian", "svd", "quailora", "closed_form", "loftq", "qalora_zero", "qalora_closed_form"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    checkpoint = make_trial_checkpoint(root / "ckpt", num_layers=2, hidden=256, intermediate=512, heads=4)
    return checkpoint, make_texts(root)


@pytest.mark.parametrize(
    ("quant", "dtype"),
    [({"method": "nf4", "bits": 4}, torch.bfloat16), ({"method": "fp4", "bits": 4}, torch.float32),
     ({"method": "int8", "bits": 8}, torch.float16)],
)  # fmt: skip
def test_each_layers_quantizer_reproduces_its_cuda_q(setup, quant, dtype):
    """Init reads Q from the layer and re-quantizes with the layer's own quantizer (LoftQ): on CUDA both
    must be bitsandbytes' CUDA kernels' result, bit for bit."""
    model = load_quantized_model(setup[0], micro_trial_config(*setup, quant=quant), dtype, CUDA)
    weights = ModelWeights(setup[0])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit | Linear8bitLt)]
    assert len(layers) == 2 * 7
    for name, layer in layers:
        kind = base_layer_kind(layer, name)
        q = kind.dequantize(layer)
        assert q.device.type == "cuda" and q.dtype == torch.float32
        weight = weights.get(f"{name}.weight").to(CUDA, dtype)
        assert torch.equal(kind.quantizer(layer).fake_quantize(weight), q), name


def _objective(result, weight, gram, options, method) -> float:
    product = adapter_product(result.lora_A.double().cpu(), result.lora_B.double().cpu(), 1.0)
    if adapter_kind(method) == "pooled":  # the pooled update acts on the full input as B·A·P
        product = expand(product, options["group_size"])
    error = weight.double() - result.quantized.double().cpu()
    return calibrated_error(error, product, gram.double()) + weight_error(error, product)


@pytest.mark.parametrize("method", METHODS)
def test_init_methods_on_cuda_agree_with_the_cpu(method, record_property):
    weight, gram = synthetic_layer(384, 256)
    quantizer = (
        get_quantizer("int", bits=4, group_size=64)
        if adapter_kind(method) == "pooled"
        else get_quantizer("nf4")
    )
    quantized = quantizer.fake_quantize(weight)
    options = method_options_for(method, iterations=5, solver="exact", group_size=64)
    results = {}
    for device in (CPU, CUDA):
        results[device.type] = initialize(
            weight.to(device), quantized.to(device), 16, method,
            gram=gram.to(device) if needs_gram(method) else None, quantizer=quantizer, **options,
        )  # fmt: skip
    on_cuda = results["cuda"]
    assert on_cuda.lora_A.device.type == "cuda" and on_cuda.lora_B.device.type == "cuda"
    travels = LayerUpdate(on_cuda.lora_A, on_cuda.lora_B, on_cuda.base_residual).cpu()  # what is gathered
    assert all(
        t.device.type == "cpu" for t in (travels.lora_A, travels.lora_B, *(travels.base_residual or ()))
    )
    cpu_value, cuda_value = (_objective(results[d], weight, gram, options, method) for d in ("cpu", "cuda"))
    record_property(f"objective_cuda_over_cpu_{method}", cuda_value / cpu_value)
    # LoftQ re-quantizes with bitsandbytes' CUDA kernel on CUDA and its CPU path on the CPU: a code may
    # round the other way at a tie, so its tolerance is wider.
    assert cuda_value == pytest.approx(cpu_value, rel=1e-2 if method == "loftq" else 1e-3)


def test_grams_on_cuda_equal_the_cpu(setup, tmp_path):
    from quailora.calibration import collect_grams

    ids = torch.randint(3, 300, (6, 64), generator=torch.Generator().manual_seed(0))
    on_cpu = collect_grams(setup[0], ids, tmp_path / "cpu", batch_size=3)
    on_cuda = collect_grams(setup[0], ids, tmp_path / "cuda", batch_size=3, device=CUDA)
    assert on_cuda.names() == on_cpu.names()
    for name in on_cpu.names():
        a, b = on_cpu.get(name).double(), on_cuda.get(name).double()
        assert (a - b).norm() <= 1e-4 * a.norm(), name


def test_gram_sums_of_bf16_inputs_use_tf32_and_match_an_fp64_reference():
    """Issue 27: bf16 activations are accumulated on TF32 tensor cores (their products are exact there) in
    fp32; the Gram matches fp64 to fp32 accumulation error, and the global matmul setting is restored."""
    from torch import nn

    from quailora.calibration.accumulate import GramAccumulator

    layer = nn.Sequential(nn.Linear(512, 64)).to(CUDA, torch.bfloat16)
    before = torch.backends.cuda.matmul.fp32_precision
    grams = GramAccumulator(layer, "layer")
    batches = [torch.randn(4, 256, 512, generator=torch.Generator().manual_seed(i)).to(CUDA, torch.bfloat16)
               for i in range(3)]  # fmt: skip
    with torch.no_grad():
        for x in batches:
            layer(x)
            grams.end_batch()
    grams.remove()
    (gram,) = grams.grams().values()
    flat = torch.cat([x.reshape(-1, 512) for x in batches]).double().cpu()
    reference = flat.T @ flat / flat.shape[0]
    assert (gram.double() - reference).norm() <= 1e-5 * reference.norm()
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_groupwise_loads_on_cuda_as_on_the_cpu_and_trains_without_full_weights(setup, record_property):
    on_cpu = load_groupwise_model(setup[0], 4, 64, dtype=torch.bfloat16, device=CPU)
    on_cuda = load_groupwise_model(setup[0], 4, 64, dtype=torch.bfloat16, device=CUDA)
    want = on_cpu.state_dict()
    for key, value in on_cuda.state_dict().items():
        assert value.device.type == "cuda" and torch.equal(value.cpu(), want[key]), key  # same codes

    from benchmarks.groupwise_memory import run_case

    rows = {
        case: run_case(case, CUDA, Path(), 4096, 4) for case in ("step-dequantized-linear", "step-groupwise")
    }
    for case, row in rows.items():
        record_property(f"{case}_peak_mb", row["peak_mb"])
        record_property(f"{case}_seconds", row["seconds"])
    # The former forward kept one dequantized W (64 MiB in fp32) per layer for the backward; now none.
    assert rows["step-groupwise"]["peak_mb"] < rows["step-dequantized-linear"]["peak_mb"] - 2 * 64
    assert any(isinstance(m, GroupwiseLinear) for m in on_cuda.modules())


def test_fp16_fine_tuning_with_loss_scaling_on_nccl(setup, tmp_path):
    train = {"zero_stage": 2, "precision": "fp16"}
    mp.spawn(train_worker, args=(1, free_port(), *setup, train, str(tmp_path), "cuda"), nprocs=1)
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["precision"] == "fp16" and record["resolved"]["fp16_enabled"] is True
    assert record["stop_reason"] is None and all(math.isfinite(x) for x in record["losses"])


def test_auto_precision_is_bf16_on_this_gpu_when_it_computes_bf16():
    from trials.deepspeed_config import native_bf16, resolve_precision

    expected = "bf16" if torch.cuda.get_device_capability(CUDA)[0] >= 8 else "fp16"
    assert native_bf16(CUDA) == (expected == "bf16") and resolve_precision("auto", CUDA) == expected


def test_one_trial_sweep_zero2_bf16_checkpointing(setup, tmp_path, monkeypatch, record_property):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    sweep = one_trial_sweep("gpu-sweep", *setup, tmp_path / "runs", gpu=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["run", str(path)]) == 0
    outcome = sweep_outcome(sweep, tmp_path)
    for name in (
        "init_peak_memory_mb",
        "init_peak_reserved_mb",
        "train_peak_memory_mb",
        "train_peak_reserved_mb",
        "init_device_used_mb",
        "model_size_mb",
        "val_ppl_init",
        "val_ppl_final",
        "tokens_per_second",
    ):
        record_property(name, outcome["metrics"].get(name))  # fmt: skip
    record_property("estimate_peak_mb", outcome["estimate_mb"]["peak"])
    check_sweep_outcome(outcome, "cuda")
    measured = max(outcome["metrics"]["init_peak_memory_mb"], outcome["metrics"]["train_peak_memory_mb"])
    # At this size fixed costs (cuBLAS workspace, DeepSpeed's buckets) dwarf the model: the estimate only
    # has to be of the right order. The check's larger model reports the ratio (docs/results/gpu.md).
    assert measured <= 4 * outcome["estimate_mb"]["peak"] + 2048


def test_zero3_trial_over_an_nf4_base_stored_in_bf16(setup, tmp_path):
    import ray

    from trials.deepspeed_config import resolve_precision
    from trials.run import run_trial
    from trials.tracking import default_tracking_uri

    config = micro_trial_config(*setup, name="zero3", model={"path": str(setup[0]), "dtype": "bfloat16"},
                                train={"zero_stage": 3, "precision": "auto", "max_steps": 4, "checkpoint_every": 0},
                                resources={"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1})  # fmt: skip
    uri = default_tracking_uri(tmp_path)
    try:
        metrics = run_trial(config, tracking_uri=uri, experiment_name="zero3", storage_path=str(tmp_path / "ray"),
                            cache_path=str(tmp_path / "cache"))  # fmt: skip
    finally:
        ray.shutdown()
    assert math.isfinite(metrics["val_ppl_final"])
    (entry,) = (tmp_path / "cache" / "quantize").glob("*/config.json")
    storage = json.loads(entry.read_text())["quantization_config"]["bnb_4bit_quant_storage"]
    assert storage == "bfloat16"  # ZeRO-3 partitions the packed NF4 bytes as bf16 like any weight
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("zero3").experiment_id])
    local = client.download_artifacts(run.info.run_id, "deepspeed_config.json", str(tmp_path))
    resolved = json.loads(Path(local).read_text())
    bf16 = resolve_precision("auto", CUDA) == "bf16"  # on GPUs without native bf16, auto is fp16
    assert resolved["zero_optimization_stage"] == 3 and resolved["bf16_enabled"] is bf16
    assert run.data.tags["quailora.eval_path"] == f"cuda-{'bfloat16' if bf16 else 'float16'}"
