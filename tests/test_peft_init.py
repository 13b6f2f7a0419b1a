"""initialize_peft_model on real peft + bitsandbytes models (Linear4bit, Linear8bitLt) on CPU."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import quailora
from quailora.base_layers import base_layer_kind
from quailora.checkpoint import SafetensorsWeights
from quailora.errors import QuailoraInputError
from quailora.initializers import rebuilt_base
from quailora.linalg import calibrated_error
from quailora.peft_init import (
    LayerUpdate,
    checkpoint_name,
    compute_adapters,
    initialize_peft_model,
    load_base_residuals,
    lora_layer_names,
    save_base_residuals,
    validate_lora_targets,
)
from quailora.quantizers import get_quantizer
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from testkit.micro import make_micro_checkpoint

QUANT = {
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_micro_checkpoint("llama", tmp_path_factory.mktemp("llama"), num_layers=2, hidden=64)


class FullModelGrams:
    """H = XᵀX/N per linear input, from hooks on the whole full-precision model (fine at micro size)."""

    def __init__(self, checkpoint, tokens):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        self.grams = {}

        def hook(name):
            def fn(module, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                self.grams[name] = (x.T @ x / x.shape[0]).float()

            return fn

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.register_forward_pre_hook(hook(name))
        with torch.no_grad():
            model(tokens)

    def get(self, name):
        return self.grams[name]

    def names(self):
        return list(self.grams)

    def tokens(self, name):
        return None  # not recorded: the Gram is used whatever it was built from


def _peft_model(checkpoint, quant, **lora):
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=QUANT[quant], device_map="cpu", dtype=torch.float32
    )
    exact_cpu_4bit(model)
    config = LoraConfig(r=lora.pop("r", 8), lora_alpha=16, target_modules="all-linear", **lora)
    return get_peft_model(model, config)


@pytest.mark.parametrize(
    ("quant", "method", "lora"),
    [
        ("nf4", "quailora", {}),
        ("nf4", "loftq", {"use_rslora": True}),
        ("int8", "closed_form", {}),
        ("int8", "svd", {}),
    ],
)
def test_layer_outputs_equal_q_plus_adapter(checkpoint, quant, method, lora):
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _peft_model(checkpoint, quant, **lora)
    names = lora_layer_names(model)
    assert len(names) == 2 * 7
    options = {"iterations": 2} if method in ("quailora", "loftq") else {}
    grams = FullModelGrams(checkpoint, tokens)
    updates = initialize_peft_model(model, method, SafetensorsWeights(checkpoint), grams, **options)
    assert set(updates) == set(names)
    weights = SafetensorsWeights(checkpoint)
    modules = dict(model.named_modules())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for name in names:
        module = modules[name]
        base = module.get_base_layer()
        q = base_layer_kind(base).dequantize(base)
        scaling = module.scaling["default"]
        assert scaling == pytest.approx(16 / (8**0.5) if lora.get("use_rslora") else 16 / 8)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert b.abs().max() > 0
        xin = x[:, : module.in_features] if module.in_features <= 64 else torch.randn(5, module.in_features)
        with torch.no_grad():
            out = module(xin)
        expected = xin @ (q + scaling * b @ a).T
        tol = 1e-5 if quant == "nf4" else 2e-2 * float(expected.abs().max())  # LLM.int8 rounds inputs to int8
        assert torch.allclose(out, expected, atol=tol), name
        # The adapter moves Q towards W.
        w = weights.get(f"{checkpoint_name(name)}.weight")
        assert (w - q - scaling * b @ a).norm() < (w - q).norm()
        if method != "loftq":  # loftq also moves Q, so the one-layer call sees a different start
            gram = grams.get(checkpoint_name(name)) if method in ("quailora", "closed_form") else None
            ref_a, ref_b = quailora.initialize(w, q, 8, method, gram=gram, scaling=scaling, **options)
            assert torch.allclose(scaling * b @ a, scaling * ref_b @ ref_a, atol=1e-5), name


def test_random_inits_differ_per_layer_and_follow_the_seed(checkpoint):
    model = _peft_model(checkpoint, "nf4")
    names = lora_layer_names(model)
    same_shape = [n for n in names if n.endswith(("q_proj", "o_proj"))]
    weights = SafetensorsWeights(checkpoint)
    first = compute_adapters(model, "gaussian", weights, names=same_shape, seed=1)
    again = compute_adapters(model, "gaussian", weights, names=same_shape[::-1], seed=1)
    other = compute_adapters(model, "gaussian", weights, names=same_shape, seed=2)
    a = [first[n].lora_A for n in same_shape]
    assert all(not torch.equal(a[0], x) for x in a[1:])  # no two same-width layers share lora_A
    assert all(torch.equal(first[n].lora_A, again[n].lora_A) for n in same_shape)  # order/split independent
    assert all(not torch.equal(first[n].lora_A, other[n].lora_A) for n in same_shape)


def test_bare_base_model_checkpoint_keys_resolve(checkpoint, tmp_path):
    """Checkpoints saved from the bare base model (bigscience BLOOM) lack the wrapper's prefix."""
    from safetensors.torch import save_file

    full = SafetensorsWeights(checkpoint)
    save_file({k.removeprefix("model."): full.get(k) for k in full}, tmp_path / "model.safetensors")
    bare = SafetensorsWeights(tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    assert key in bare and "model.layers.9.mlp.down_proj.weight" not in bare
    assert torch.equal(bare.get(key), SafetensorsWeights(checkpoint).get(key))
    assert set(bare.state_dict("model.layers.0")) == set(
        SafetensorsWeights(checkpoint).state_dict("model.layers.0")
    )


def test_loftq_requantizes_base_layer(checkpoint, tmp_path):
    model = _peft_model(checkpoint, "nf4")
    name = lora_layer_names(model)[0]
    base = dict(model.named_modules())[name].get_base_layer()
    before = base_layer_kind(base).dequantize(base).clone()
    updates = initialize_peft_model(model, "loftq", SafetensorsWeights(checkpoint), iterations=3)
    after = base_layer_kind(base).dequantize(base)
    assert not torch.equal(before, after)
    quantizer = get_quantizer("nf4", blocksize=64, double_quant=True)
    weight = SafetensorsWeights(checkpoint).get(f"{checkpoint_name(name)}.weight")
    assert torch.equal(after, quantizer.fake_quantize(rebuilt_base(weight, updates[name].base_residual)))
    # What a trial logs for export: only the thin factors, and they rebuild the same Q bit for bit.
    assert save_base_residuals(updates, tmp_path)
    residuals = load_base_residuals(tmp_path)
    assert set(residuals) == set(updates)
    assert torch.equal(after, quantizer.fake_quantize(rebuilt_base(weight, residuals[name])))
    assert not save_base_residuals(
        {n: LayerUpdate(u.lora_A, u.lora_B) for n, u in updates.items()}, tmp_path / "x"
    )


def test_bnb_quantizer_matches_the_loaded_layer(checkpoint):
    weights = SafetensorsWeights(checkpoint)
    for quant, quantizer in (("nf4", get_quantizer("nf4")), ("int8", get_quantizer("int8"))):
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=QUANT[quant], device_map="cpu"
        )
        base = model.model.layers[1].mlp.down_proj
        ours = quantizer.fake_quantize(weights.get("model.layers.1.mlp.down_proj.weight"))
        assert torch.equal(ours, base_layer_kind(base).dequantize(base)), quant


def test_targets_and_rank_checked_before_compute(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=QUANT["nf4"], device_map="cpu"
    )
    assert len(validate_lora_targets(model, ["q_proj", "v_proj"], 8)) == 4
    with pytest.raises(QuailoraInputError, match="'qkv' matches no linear module"):
        validate_lora_targets(model, ["qkv"], 8)
    with pytest.raises(
        QuailoraInputError, match=r"lora.rank=65 exceeds layer model.layers.0.self_attn.q_proj"
    ):
        validate_lora_targets(model, "all-linear", 65)


def test_missing_grams_refused_before_compute(checkpoint):
    model = _peft_model(checkpoint, "nf4")
    with pytest.raises(QuailoraInputError, match="needs a Gram"):
        compute_adapters(model, "quailora", SafetensorsWeights(checkpoint), grams=FullModelGramsEmpty())


class FullModelGramsEmpty:
    def get(self, name):
        raise AssertionError("must not be reached")

    def names(self):
        return []

    def tokens(self, name):
        return None


def test_layer_index_comes_from_the_model(tmp_path):
    """Decoder-layer indices are read from the model's own layer list, not from a name pattern."""
    from quailora.architectures import Layout
    from testkit.micro import make_micro_config

    llama = Layout.from_config(make_micro_config("llama", num_layers=13))
    assert llama.layer_index("base_model.model.model.layers.12.self_attn.q_proj") == 12
    assert llama.layer_index("lm_head") is None
    bloom = Layout.from_config(make_micro_config("bloom", num_layers=4))
    assert bloom.layer_index("transformer.h.3.mlp.dense_4h_to_h") == 3
    with pytest.raises(QuailoraInputError, match="not a decoder layer"):
        bloom.layer_index("transformer.h.4.mlp.dense_4h_to_h")
    with pytest.raises(QuailoraInputError, match="no module"):  # never silently "outside the layers"
        llama.layer_index("model.decoder.layers.0.fc1")


@pytest.mark.parametrize(("method", "qalora_group"), [("quailora", None), ("qalora_closed_form", 16)])
def test_groupwise_base_layers(checkpoint, method, qalora_group):
    from quailora.qalora.adapter import groupwise_lora_config
    from quailora.qalora.pooling import expand
    from quailora.quantizers.groupwise.layer import quantize_model_groupwise

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    quantize_model_groupwise(model, bits=3, group_size=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, groupwise_lora_config(4, 8, targets, qalora_group))
    grams = FullModelGrams(checkpoint, tokens)
    initialize_peft_model(model, method, SafetensorsWeights(checkpoint), grams)
    weights = SafetensorsWeights(checkpoint)
    for name in lora_layer_names(model):
        module = dict(model.named_modules())[name]
        q = module.get_base_layer().dequantize()
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        update = s * b @ a if qalora_group is None else expand(s * b @ a, qalora_group)
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.allclose(module(x), x @ (q + update).T, atol=1e-4), name
        # Calibrated methods lower the output error on the calibration inputs.
        error = weights.get(f"{checkpoint_name(name)}.weight") - q
        gram = grams.get(checkpoint_name(name))
        assert calibrated_error(error, update.detach(), gram) < 0.9 * calibrated_error(
            error, 0 * error, gram
        ), name


@pytest.mark.parametrize("method", ["svd", "loftq"])
def test_uncalibrated_plain_inits_on_groupwise_int_k(checkpoint, method):
    """configs/rank_bits_sweep.yaml runs svd and loftq on group-wise INT-k as well: plain LoRA on a
    GroupwiseLinear base, and LoftQ re-quantizes that base with the layer's own group-wise quantizer."""
    from quailora.qalora.adapter import groupwise_lora_config
    from quailora.quantizers.groupwise.layer import quantize_model_groupwise

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    quantize_model_groupwise(model, bits=3, group_size=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, groupwise_lora_config(4, 8, targets))
    modules = dict(model.named_modules())
    names = lora_layer_names(model)
    before = {n: modules[n].get_base_layer().dequantize().clone() for n in names}
    options = {"iterations": 3} if method == "loftq" else {}
    updates = initialize_peft_model(model, method, SafetensorsWeights(checkpoint), **options)
    weights = SafetensorsWeights(checkpoint)
    quantizer = get_quantizer("int", bits=3, group_size=16)
    for name in names:
        module = modules[name]
        q = module.get_base_layer().dequantize()
        a, b, s = module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"]
        w = weights.get(f"{checkpoint_name(name)}.weight")
        # The adapter fits the quantization error it goes with: W - Q' - sBA is smaller than W - Q.
        assert (w - q - s * b @ a).norm() < 0.95 * (w - before[name]).norm(), name
        if method == "loftq":  # Q' = quant(W - L·R) with the INT3 g16 quantizer, bit for bit
            assert not torch.equal(q, before[name]), name
            assert torch.equal(q, quantizer.fake_quantize(rebuilt_base(w, updates[name].base_residual))), name
        else:
            assert torch.equal(q, before[name]) and updates[name].base_residual is None, name
