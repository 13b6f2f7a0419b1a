"""One battery over every registered quantizer and initializer, as peft's testing_common runs over every
tuner: a new one registers and is validated, costed and tested here without editing any other file.

Quantizers: the spec's backend is its own; fake-quantize is bounded and nearly idempotent; the layer the
backend builds computes with exactly the fake-quantizer's Q (and re-quantizes in place); config takes
the declared bits and refuses the others, naming the field; the memory plan's bytes are the layer's
storage; the declared adapter kinds are the ones trial validation lets through; stock export writes the
declared format, and the cached form loads back to the same Q.
Initializers: the declared adapter kind is the shape of the lora_A produced; the declared need for a
Gram is whether the method reads one; the declared base change is whether it returns a new base; the
declared randomness is whether the seed changes the result; every option is a field of the method's options
dataclass with a domain that refuses a bad value, naming the field; a trial adapter builder exists for the kind.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, fields, is_dataclass

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from orchestrator.memory import quantized_linear_bytes
from quailora.api import validate_options
from quailora.base_layers import base_layer_kind
from quailora.errors import QuailoraInputError
from quailora.initializers import (
    INITIALIZERS,
    InitProblem,
    MethodOptions,
    draws_random_numbers,
    method_options,
    rebuilt_base,
    traits,
    zero_product,
)
from quailora.quantizers import QUANTIZER_SPECS, get_quantizer, quantizer_spec
from testkit.micro import make_micro_config
from tests.layer_problems import layer_problem
from trials.adapters import ADAPTER_BUILDERS, check_adapter_kind
from trials.config import QuantSpec, TrialConfig

GROUP = 16  # a group size every test layer divides
QUANT_CASES = [(name, bits) for name in QUANTIZER_SPECS for bits in quantizer_spec(name).bits]
# Per-layer constants a format stores besides the weight (bitsandbytes' quant maps and quant state).
MAX_LAYER_OVERHEAD = 2048


def _settings(name: str, bits: int) -> QuantSpec:
    return QuantSpec(method=name, bits=bits, group_size=GROUP)


def _quantizer(name: str, bits: int):
    spec = quantizer_spec(name)
    return spec.backend().quantizer(**spec.options(_settings(name, bits)))


def _stored_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _linear(n_in: int, n_out: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=False).requires_grad_(False)


# ---- quantizers ----


@pytest.mark.parametrize("name", list(QUANTIZER_SPECS))
def test_spec_and_backend_agree(name):
    spec = quantizer_spec(name)
    backend = spec.backend()
    assert backend.name == name and spec.bits and spec.export_format and "plain" in spec.adapters
    assert set(spec.settings) <= set(QuantSpec.model_fields) - {"method", "bits"}
    assert get_quantizer(name, bits=spec.default_bits).name == name


@pytest.mark.parametrize(("name", "bits"), QUANT_CASES)
def test_fake_quantize_is_bounded_and_nearly_idempotent(name, bits):
    weight = _linear(256).weight
    quantizer = _quantizer(name, bits)
    assert quantizer.name == name and quantizer.bits == bits
    q = quantizer.fake_quantize(weight)
    assert q.shape == weight.shape and q.dtype == torch.float32 and torch.isfinite(q).all()
    error = (weight - q).norm()
    assert 0 < error < 2.0 ** (2 - bits) * weight.norm()  # coarser grids, larger but bounded error
    # Q lies (nearly) on the grid already: quantizing it again moves it far less than the first time.
    assert (quantizer.fake_quantize(q) - q).norm() <= 0.5 * error


@pytest.mark.parametrize(("name", "bits"), QUANT_CASES)
def test_backend_layer_computes_with_the_fake_quantized_weight(name, bits):
    spec, settings = quantizer_spec(name), _settings(name, bits)
    linear, other = _linear(256), _linear(256, seed=1)
    layer = spec.backend().quantize_linear(linear, settings)
    kind = base_layer_kind(layer)
    assert type(layer) in spec.backend().layers
    assert torch.equal(kind.dequantize(layer), _quantizer(name, bits).fake_quantize(linear.weight))
    assert torch.equal(kind.quantizer(layer).fake_quantize(linear.weight), kind.dequantize(layer))
    kind.requantize(layer, other.weight)
    assert torch.equal(kind.dequantize(layer), _quantizer(name, bits).fake_quantize(other.weight))


@pytest.mark.parametrize(("name", "bits"), QUANT_CASES)
def test_config_takes_the_declared_bits_and_names_the_field_otherwise(name, bits):
    spec = quantizer_spec(name)
    assert QuantSpec(method=name, bits=bits).bits == bits
    assert QuantSpec(method=name).bits == spec.default_bits  # implied bits need not be repeated
    for wrong in sorted(set(range(1, 17)) - set(spec.bits))[:4]:
        with pytest.raises(
            ValidationError, match=rf"quant\.bits={wrong} .*allowed: {re.escape(str(sorted(spec.bits)))}"
        ):
            QuantSpec(method=name, bits=wrong)


def test_config_and_memory_plan_refuse_an_unregistered_method():
    with pytest.raises(ValidationError, match=r"quant\.method='int5'.*allowed: \['fp4'"):
        QuantSpec(method="int5")
    with pytest.raises(QuailoraInputError, match="unknown quantizer 'int5'"):
        quantizer_spec("int5")


@pytest.mark.parametrize(("name", "bits"), QUANT_CASES)
def test_memory_plan_counts_the_bytes_the_layer_stores(name, bits):
    spec, settings = quantizer_spec(name), _settings(name, bits)
    stored, planned = [], []
    for n_in in (256, 512):
        stored.append(_stored_bytes(spec.backend().quantize_linear(_linear(n_in), settings)))
        planned.append(spec.linear_bytes(n_in, 64, settings))
    # The same cost per weight (bitsandbytes' quant state is JSON: its length varies by a byte or two).
    assert abs((stored[1] - stored[0]) - (planned[1] - planned[0])) <= 16
    assert all(0 <= s - p <= MAX_LAYER_OVERHEAD for s, p in zip(stored, planned, strict=True))


class _OneLayerShape:
    def linears(self):
        return [("layer.proj", 512, 64)]


@pytest.mark.parametrize("name", list(QUANTIZER_SPECS))
def test_orchestrator_memory_plan_reads_the_spec(name):
    spec = quantizer_spec(name)
    trial = TrialConfig(model={"path": "m"}, quant={"method": name, "group_size": GROUP})
    assert quantized_linear_bytes(trial, _OneLayerShape()) == spec.linear_bytes(512, 64, trial.quant)


@pytest.mark.parametrize("name", list(QUANTIZER_SPECS))
@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_trial_validation_lets_through_the_declared_adapter_kinds(name, method):
    config = TrialConfig(model={"path": "m"}, quant={"method": name}, init={"method": method})
    if traits(method).adapter in quantizer_spec(name).adapters:
        check_adapter_kind(config)
    else:
        with pytest.raises(QuailoraInputError, match=f"init.method={method!r}.*quant.method"):
            check_adapter_kind(config)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_micro_config("llama", hidden=64, vocab=128)).save_pretrained(path)
    return path


def _first_quantized(model: nn.Module, spec) -> tuple[str, nn.Module]:
    types = tuple(spec.backend().layers)
    return next((n, m) for n, m in model.named_modules() if isinstance(m, types))


@pytest.mark.parametrize("name", list(QUANTIZER_SPECS))
def test_stock_export_and_cache_write_what_the_spec_declares(name, micro_checkpoint, tmp_path):
    spec = quantizer_spec(name)
    settings, cpu = _settings(name, spec.default_bits), torch.device("cpu")
    backend = spec.backend()
    model = backend.load(micro_checkpoint, settings, torch.float32, cpu, False)
    layer_name, layer = _first_quantized(model, spec)
    q = base_layer_kind(layer).dequantize(layer)
    backend.save(model, tmp_path / "cache")
    reloaded = backend.load_saved(tmp_path / "cache", torch.float32, cpu)
    again = reloaded.get_submodule(layer_name)
    assert torch.equal(base_layer_kind(again).dequantize(again), q)
    backend.save_stock(model, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == spec.export_format


# ---- initializers ----

OUT, IN, RANK = 48, 128, 4


@pytest.fixture(scope="module")
def problem_parts():
    weight, gram = layer_problem(OUT, IN, tokens=512)
    quantizer = get_quantizer("int", bits=4, group_size=GROUP)
    return weight, quantizer.fake_quantize(weight), gram, quantizer


def _problem(parts, gram) -> InitProblem:
    weight, quantized, _, quantizer = parts
    return InitProblem(weight, quantized, RANK, scaling=2.0, gram=gram, quantizer=quantizer)


def _options(method: str) -> dict:
    return {"group_size": GROUP} if traits(method).adapter == "pooled" else {}


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_declared_adapter_kind_is_the_adapter_produced(method, problem_parts):
    fn, kind = INITIALIZERS.get(method), traits(method).adapter
    assert kind in ADAPTER_BUILDERS  # a trial can put this kind of adapter on a model
    assert ("group_size" in method_options(method)) == (
        kind == "pooled"
    )  # the pool is a pooled method's option
    gram = problem_parts[2] if traits(method).needs_gram else None
    result = fn(_problem(problem_parts, gram), **_options(method))
    width = IN // GROUP if kind == "pooled" else IN
    assert result.lora_A.shape == (RANK, width) and result.lora_B.shape == (OUT, RANK)
    assert result.quantized.shape == (OUT, IN)
    assert all(torch.isfinite(t).all() for t in (result.lora_A, result.lora_B, result.quantized))


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_declared_gram_need_is_whether_the_method_reads_one(method, problem_parts):
    fn, gram = INITIALIZERS.get(method), problem_parts[2]
    with_gram = fn(_problem(problem_parts, gram), **_options(method))
    if traits(method).needs_gram:
        other = fn(_problem(problem_parts, gram + torch.diag(torch.linspace(0, 5, IN))), **_options(method))
        assert not torch.allclose(adapter(with_gram), adapter(other))
        with pytest.raises(Exception):  # noqa: B017 - whatever the method trips on, it cannot run without H
            fn(_problem(problem_parts, None), **_options(method))
    else:
        without = fn(_problem(problem_parts, None), **_options(method))
        assert torch.equal(adapter(with_gram), adapter(without))


def adapter(result) -> torch.Tensor:
    return result.lora_B @ result.lora_A


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_declared_base_change_is_whether_a_new_base_comes_back(method, problem_parts):
    weight, quantized, gram, quantizer = problem_parts
    result = INITIALIZERS.get(method)(_problem(problem_parts, gram), **_options(method))
    if traits(method).changes_base:
        assert result.base_residual is not None
        assert torch.equal(
            result.quantized, quantizer.fake_quantize(rebuilt_base(weight, result.base_residual))
        )
    else:
        assert result.base_residual is None and torch.equal(result.quantized, quantized)


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_every_option_is_a_validated_field_of_the_methods_options_class(method):
    cls = traits(method).options
    assert is_dataclass(cls) and issubclass(cls, MethodOptions) and cls.__dataclass_params__.frozen
    assert method_options(method) == {f.name for f in fields(cls)}
    required = {f.name: GROUP for f in fields(cls) if f.default is MISSING}
    assert set(required) <= {"group_size"}  # a trial fills in only the pool; every other option has a default
    assert validate_options(method, required) == cls(**required)  # the defaults lie in their domains
    for f in fields(cls):
        assert "domain" in f.metadata, f"{method}: option {f.name} is declared without option(domain=...)"
        # -1 lies outside every domain (integers >= 0 or 1, finite numbers >= 0, a Literal's strings)
        with pytest.raises(QuailoraInputError, match=rf"^where: option {f.name}=-1 must be "):
            validate_options(method, {**required, f.name: -1}, where="where")
        with pytest.raises(QuailoraInputError, match=rf"option {f.name}=-1 must be "):
            cls(**{**required, f.name: -1})
    with pytest.raises(
        QuailoraInputError, match=rf"method {method!r} has no option\(s\) \['bogus'\]; it accepts"
    ):
        validate_options(method, {**required, "bogus": 1})
    for name in required:
        with pytest.raises(QuailoraInputError, match=rf"method {method!r} needs option\(s\) \['{name}'\]"):
            validate_options(method, {})


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_declared_randomness_is_whether_the_seed_changes_the_result(method, problem_parts):
    fn, gram = INITIALIZERS.get(method), problem_parts[2] if traits(method).needs_gram else None
    cases = [{"solver": s} for s in ("exact", "randomized")] if "solver" in method_options(method) else [{}]
    for case in cases:
        options = {**_options(method), **case}
        if "seed" not in method_options(method):
            assert not draws_random_numbers(method, options)
            continue
        one, two = (fn(_problem(problem_parts, gram), **options, seed=seed) for seed in (1, 2))
        same = all(torch.equal(x, y) for x, y in zip(one, two, strict=True))  # (lora_A, lora_B)
        assert draws_random_numbers(method, options) == (not same), case


@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_declared_zero_product_is_whether_the_adapter_starts_at_zero(method, problem_parts):
    """zero_product (QLoRA's B = 0) is declared, not probed: here checked against the method's own output."""
    gram = problem_parts[2] if traits(method).needs_gram else None
    lora_a, lora_b = INITIALIZERS.get(method)(_problem(problem_parts, gram), **_options(method))
    assert zero_product(method) == bool((lora_b @ lora_a).abs().max() == 0)
