"""QA-LoRA: GroupwiseLinear, the pooled peft adapter, the merge into zero points, and the two initializers."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from quailora.api import validate_options
from quailora.errors import QuailoraInputError
from quailora.initializers import INITIALIZERS, InitProblem
from quailora.linalg import calibrated_error
from quailora.qalora.adapter import (
    GroupwiseLoraLinear,
    apply_qalora,
    groupwise_lora_config,
    load_groupwise_adapter,
)
from quailora.qalora.merge import merge_qalora
from quailora.qalora.pooling import expand, pool, pooling_factor
from quailora.quantizers.groupwise.codes import GroupwiseIntQuantizer, unpack_codes
from quailora.quantizers.groupwise.layer import GroupwiseLinear, quantize_model_groupwise
from quailora.quantizers.groupwise.packed import load_packed, save_packed
from testkit.micro import make_micro_config
from tests.layer_problems import layer_problem

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def micro_llama(seed=0, tie=False, bits=4, group_size=16):
    config = make_micro_config("llama", hidden=64, intermediate=128)
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return quantize_model_groupwise(model, bits, group_size, None)


def randomize_lora_b(model, std=0.05, seed=1):
    """Trained-like adapters: B = 0 would make every adapter test pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def objective(error, y, group_size, gram):
    """tr((E − Y P) H (E − Y P)ᵀ) with P applied as in peft's forward."""
    return calibrated_error(error, expand(y, group_size), gram)


# ---- GroupwiseLinear ---------------------------------------------------------------------------------


def test_groupwise_linear_computes_with_the_fake_quantized_weight():
    lin = nn.Linear(96, 40)
    layer = GroupwiseLinear.from_linear(lin, bits=3, group_size=32)
    q = GroupwiseIntQuantizer(3, 32).fake_quantize(lin.weight.detach())
    x = torch.randn(5, 7, 96)
    assert torch.allclose(layer(x), F.linear(x, q, lin.bias), atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())


def test_dtype_casts_leave_the_quantized_weight_alone():
    layer = GroupwiseLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=16)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.dequantize(), before)
    assert layer.scale_values().dtype == torch.float16 and layer.zero_values().dtype == torch.float32
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [3, 8])
def test_row_blocks_dequantize_exactly_as_the_whole_matrix(bits, monkeypatch):
    layer = GroupwiseLinear.from_linear(nn.Linear(96, 37), bits=bits, group_size=32)
    codes = unpack_codes(layer.qweight, bits, 37 * 96).view(37, -1, 32).float()
    whole = (layer.scale_values().float().unsqueeze(-1) * (codes - layer.zero_values().unsqueeze(-1))).view(
        37, 96
    )
    # 3 rows per block: with 10 three-bit codes per word, most blocks start inside a word.
    monkeypatch.setattr("quailora.quantizers.groupwise.codes.DEQUANT_BLOCK", 3 * 96)
    assert torch.equal(layer.dequantize(), whole)
    assert torch.equal(layer.dequantize(torch.bfloat16), whole.to(torch.bfloat16))  # one rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_a_linear_on_the_dequantized_weight(dtype):
    layer = GroupwiseLinear.from_linear(nn.Linear(64, 48), bits=4, group_size=16).to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    reference = F.linear(x_ref, layer.dequantize().to(dtype), layer.bias.to(dtype))
    y = layer(x)
    assert y.dtype == dtype and torch.equal(y, reference)
    grad = torch.randn_like(y)
    y.backward(grad)
    reference.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_autograd_keeps_no_full_size_weight_between_forward_and_backward():
    """F.linear on a dequantized W would save W (out x in) for the backward, in every layer at once."""
    layer = GroupwiseLinear.from_linear(nn.Linear(256, 128), bits=4, group_size=64)

    def saved_sizes(forward) -> list[int]:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            forward(torch.randn(2, 256, requires_grad=True)).sum().backward()
        return sizes

    assert 128 * 256 in saved_sizes(lambda x: F.linear(x, layer.dequantize()))  # the old forward
    assert max(saved_sizes(layer), default=0) < 128 * 256


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_storage_is_about_k_sixteenths_of_fp16(bits):
    out_features, in_features, group = 256, 512, 64
    layer = GroupwiseLinear.from_linear(nn.Linear(in_features, out_features, bias=False), bits, group)
    fp16 = out_features * in_features * 2
    words = -(-out_features * in_features // (32 // bits))
    assert layer.storage_bytes() == words * 4 + out_features * (in_features // group) * (2 + 4)
    ratio = layer.storage_bytes() / fp16
    # k bits per weight (3.2 for k = 3: 10 codes in 32 bits), plus 48 bits of scale + zero per group of 64
    # (0.75 bit), plus at most one partly filled last word.
    assert bits / 16 < ratio <= (32 / (32 // bits) + 48 / group) / 16 + 4 / fp16


def test_quantize_model_keeps_the_head_and_validates_first():
    model = micro_llama()
    assert type(model.lm_head) is nn.Linear
    swapped = [n for n, m in model.named_modules() if isinstance(m, GroupwiseLinear)]
    assert len(swapped) == 2 * len(TARGETS)
    fresh = AutoModelForCausalLM.from_config(make_micro_config("llama", hidden=64, intermediate=128))
    with pytest.raises(
        QuailoraInputError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*in=64.*group_size=48"
    ):
        quantize_model_groupwise(fresh, 4, 48, ["q_proj"])
    assert not any(isinstance(m, GroupwiseLinear) for m in fresh.modules()), (
        "nothing quantized before the error"
    )
    with pytest.raises(QuailoraInputError, match="matched no"):
        quantize_model_groupwise(fresh, 4, 16, ["nonexistent"])


# ---- the pooled adapter --------------------------------------------------------------------------------


def test_peft_drives_qalora_and_its_update_is_group_constant():
    model = apply_qalora(
        micro_llama(), rank=4, alpha=8, group_size=32, target_modules=["q_proj", "down_proj"]
    )
    randomize_lora_b(model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, GroupwiseLoraLinear)
    assert layer.lora_A["default"].weight.shape == (4, 128 // 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    with torch.no_grad():
        probe = torch.eye(layer.in_features)
        update = (layer(probe) - layer.get_base_layer()(probe)).T  # (out x in): the effective ΔW
    blocks = update.view(update.shape[0], -1, 32)
    assert update.abs().max() > 1e-3
    assert torch.allclose(blocks, blocks[..., :1].expand_as(blocks), atol=1e-6), "ΔW varies inside a group"
    # ... and equals s·B·A·P with quailora's P, so initializers and the layer agree on the pooling scale.
    y = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(update, expand(y.detach(), 32), atol=1e-6)


def test_pool_and_expand_are_adjoint():
    x, y = torch.randn(3, 64), torch.randn(5, 8)
    assert torch.allclose((x @ expand(y, 8).T), pool(x, 8) @ y.T, atol=1e-5)
    assert pooling_factor(64, 8) == 1.0 and pooling_factor(128, 8) == 2.0


def test_plain_lora_on_a_two_bit_base_trains_only_the_adapter():
    model = get_peft_model(micro_llama(bits=2), groupwise_lora_config(4, 8, ["q_proj", "v_proj"]))
    ids = torch.randint(0, 128, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_qalora_pool_must_cover_whole_quantization_groups():
    with pytest.raises(QuailoraInputError, match=r"qalora_group_size=8.*group_size=16"):
        apply_qalora(micro_llama(group_size=16), rank=2, alpha=4, group_size=8, target_modules=["q_proj"])


def test_adapter_save_and_reload_through_peft(tmp_path):
    model = apply_qalora(micro_llama(), rank=4, alpha=8, group_size=16, target_modules=TARGETS)
    randomize_lora_b(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = load_groupwise_adapter(micro_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)


# ---- merge -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_merge_into_zero_points_is_exact_and_stays_int_k(tmp_path, tie):
    model = apply_qalora(micro_llama(tie=tie), rank=4, alpha=16, group_size=32, target_modules=TARGETS)
    randomize_lora_b(model)
    base = model.base_model.model.model.layers[1].self_attn.o_proj.get_base_layer()
    codes, scales, zeros = base.qweight.clone(), base.scale_values().clone(), base.zero_values().clone()
    ids = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            assert (model(ids).logits - adapted).abs().max() > 1e-3, "the adapter must change the logits"
    merged = merge_qalora(model)
    assert not any(isinstance(m, GroupwiseLoraLinear) for m in merged.modules())
    assert torch.equal(base.qweight, codes) and torch.equal(base.scale_values(), scales)
    assert not torch.equal(base.zero_values(), zeros), "the adapter must have moved the zero points"
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)

    save_packed(merged, tmp_path / "merged")
    loaded = load_packed(tmp_path / "merged")
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, GroupwiseLinear)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_merge_refuses_plain_lora():
    model = get_peft_model(micro_llama(), groupwise_lora_config(4, 8, ["q_proj"]))
    with pytest.raises(QuailoraInputError, match=r"q_proj.*plain LoRA"):
        merge_qalora(model)


# ---- initializers --------------------------------------------------------------------------------------


def init_problem(rank=4, group=16, bits=3, out_features=96, in_features=128, gram=True, seed=0):
    weight, h = layer_problem(out_features, in_features, seed=seed)
    quantizer = GroupwiseIntQuantizer(bits, group)
    return InitProblem(
        weight=weight,
        quantized=quantizer.fake_quantize(weight),
        rank=rank,
        scaling=2.0,
        gram=h if gram else None,
        name="model.layers.0.mlp.up_proj",
        quantizer=quantizer,
    )


def test_qalora_zero_matches_peft_init():
    init = INITIALIZERS.get("qalora_zero")(init_problem(), group_size=32)
    assert init.lora_A.shape == (4, 128 // 32) and init.lora_B.shape == (96, 4)
    assert torch.count_nonzero(init.lora_B) == 0
    assert init.lora_A.abs().max() <= (128 // 32) ** -0.5 and init.lora_A.std() > 0


@pytest.fixture
def single_thread():
    """Tiny tensors: with OpenMP threads on a shared CPU each LBFGS step costs ~30x more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_closed_form_matches_a_numerical_minimum(single_thread):
    problem = init_problem(rank=2, group=4, out_features=12, in_features=32)
    e, h = problem.error.double(), problem.gram.double()
    init = INITIALIZERS.get("qalora_closed_form")(problem, group_size=4, damping=0.0)
    y = problem.scaling * init.lora_B.double() @ init.lora_A.double()
    closed = objective(e, y, 4, h)

    best = float("inf")
    for start in range(3):
        gen = torch.Generator().manual_seed(100 + start)
        m = torch.randn(12, 2, generator=gen, dtype=torch.float64).requires_grad_()
        a = torch.randn(2, 8, generator=gen, dtype=torch.float64).requires_grad_()
        opt = torch.optim.LBFGS(
            [m, a], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def loss(m=m, a=a, opt=opt):
            opt.zero_grad()
            d = e - expand(m @ a, 4)
            value = ((d @ h) * d).sum()
            value.backward()
            return value

        opt.step(loss)
        best = min(best, objective(e, (m @ a).detach(), 4, h))
    start_value = objective(e, torch.zeros_like(y), 4, h)
    assert closed <= best + 1e-5 * start_value
    assert best <= closed * 1.01, "the numerical search should reach the optimum too (else the check is weak)"


def test_closed_form_beats_qalora_zero_on_the_calibrated_objective():
    problem = init_problem(rank=8, group=16, bits=3)
    h = problem.gram
    values = {}
    for method in ("qalora_zero", "qalora_closed_form"):
        a, b = INITIALIZERS.get(method)(problem, group_size=16)
        values[method] = objective(problem.error, problem.scaling * b @ a, 16, h)
    assert values["qalora_closed_form"] < 0.8 * values["qalora_zero"], values


def test_closed_form_split_is_balanced():
    problem = init_problem(gram=True)
    a, b = INITIALIZERS.get("qalora_closed_form")(problem, group_size=16)
    assert a.shape == (4, 8) and b.shape == (96, 4)
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-4 * float((a @ a.T).abs().max()))


def test_initialized_layer_realises_the_predicted_objective():
    """Init values loaded into the peft QA-LoRA layer give exactly the update the initializer optimized."""
    model = apply_qalora(
        micro_llama(group_size=16), rank=4, alpha=8, group_size=16, target_modules=["up_proj"]
    )
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    base = layer.get_base_layer()
    gen = torch.Generator().manual_seed(3)
    weight = base.dequantize() + 0.01 * torch.randn(base.dequantize().shape, generator=gen)
    x = torch.randn(256, 64, generator=gen)
    problem = InitProblem(weight, base.dequantize(), 4, layer.scaling["default"], x.T @ x / 256, "up_proj")
    a, b = INITIALIZERS.get("qalora_closed_form")(problem, group_size=16)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        realised = (x @ weight.T - layer(x)).square().sum(-1).mean()
    predicted = objective(problem.error, problem.scaling * b @ a, 16, problem.gram)
    assert abs(float(realised) - predicted) <= 1e-4 * predicted
    assert predicted < calibrated_error(problem.error, torch.zeros_like(problem.error), problem.gram)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"group_size": 12}, "group_size=12"),
        ({"group_size": 8}, "multiple of the quantizer"),
        ({"group_size": 32, "damping": -1.0}, "damping=-1.0"),
    ],
)
def test_initializer_input_errors_are_named(options, match):
    with pytest.raises(QuailoraInputError, match=match):
        validate_options("qalora_closed_form", options)  # what quailora.initialize checks first
        INITIALIZERS.get("qalora_closed_form")(init_problem(group=16), **options)
    with pytest.raises(QuailoraInputError, match=r"rank=40 exceeds"):
        INITIALIZERS.get("qalora_zero")(init_problem(rank=40), group_size=16)
