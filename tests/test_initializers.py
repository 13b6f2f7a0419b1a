import numpy as np
import pytest
import torch

import quailora
from quailora.errors import QuailoraInputError
from quailora.initializers import draws_random_numbers, effective_init_options, rebuilt_base
from quailora.linalg import adapter_product, calibrated_error, damp, weight_error
from tests.layer_problems import layer_problem

SCALING = 2.0
RANK = 8


@pytest.fixture(scope="module")
def problem():
    weight, gram = layer_problem()
    quantized = quailora.get_quantizer("nf4").fake_quantize(weight)
    return weight, quantized, gram


def _init(problem, method, **options):
    weight, quantized, gram = problem
    return quailora.initialize(
        weight,
        quantized,
        RANK,
        method,
        gram=gram if quailora.needs_gram(method) else None,
        scaling=SCALING,
        quantizer=quailora.get_quantizer("nf4"),
        **options,
    )


def test_svd_is_the_eckart_young_optimum(problem):
    weight, quantized, _ = problem
    a, b = _init(problem, "svd", solver="exact")
    error = (weight - quantized).double().numpy()
    u, s, vt = np.linalg.svd(error, full_matrices=False)
    best = (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
    ours = adapter_product(a, b, SCALING).double().numpy()
    assert np.linalg.norm(ours - best) / np.linalg.norm(best) < 1e-4


def test_randomized_svd_is_close_to_exact(problem):
    weight, quantized, _ = problem
    error = weight - quantized
    exact = weight_error(error, adapter_product(*_init(problem, "svd", solver="exact"), SCALING))
    randomized = weight_error(
        error, adapter_product(*_init(problem, "svd", solver="randomized", niter=6), SCALING)
    )
    assert exact <= randomized <= exact * 1.02


def test_full_rank_svd_reproduces_weight():
    weight, _ = layer_problem(out_features=32, in_features=64)
    quantized = quailora.get_quantizer("nf4").fake_quantize(weight)
    a, b = quailora.initialize(weight, quantized, 32, "svd", scaling=0.5)
    rebuilt = quantized + adapter_product(a, b, 0.5)
    assert torch.allclose(rebuilt, weight, atol=1e-5)
    assert (weight - quantized).abs().max() > 1e-3  # the adapter did real work


def test_splits_are_balanced(problem):
    for method in ("svd", "quailora", "closed_form"):
        a, b = _init(problem, method)
        # Balanced: BᵀB = AAᵀ (singular values split evenly between the factors).
        assert torch.allclose(b.T @ b, a @ a.T, atol=1e-4 * float((a @ a.T).abs().max())), method


@pytest.mark.parametrize("method", ["svd", "quailora", "closed_form", "loftq"])
def test_kaiming_a_split_keeps_the_product_and_gives_a_qloras_magnitude(problem, method):
    a, b = _init(problem, method)
    ka, kb = _init(problem, method, split="kaiming_a")
    assert torch.allclose(SCALING * kb @ ka, SCALING * b @ a, atol=1e-5)
    # Rows of norm 1/√3, the expected row norm of peft's Kaiming-uniform A; orthogonal to each other.
    assert torch.allclose(ka @ ka.T, torch.eye(RANK) / 3, atol=1e-5)
    gaussian = _init(problem, "gaussian").lora_A
    assert float(gaussian.norm(dim=1).mean()) == pytest.approx(3**-0.5, rel=0.1)


def test_als_never_increases_and_reaches_closed_form(problem):
    weight, quantized, gram = problem
    result = _init(problem, "quailora", iterations=30)
    history = result.history
    assert len(history) == 31
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(history, history[1:], strict=False))
    assert history[-1] < history[0] * 0.9  # the refinement did something
    damped = damp(gram, 1e-2)
    error = weight - quantized
    als = calibrated_error(error, adapter_product(*result, SCALING), damped)
    exact = calibrated_error(error, adapter_product(*_init(problem, "closed_form"), SCALING), damped)
    assert exact <= als * (1 + 1e-6)
    assert als <= exact * 1.01
    # history is relative to tr(E H Eᵀ); its last value is the objective of the returned factors.
    assert history[-1] == pytest.approx(
        als / calibrated_error(error, torch.zeros_like(error), damped), rel=1e-3
    )


def test_objective_ordering(problem):
    weight, quantized, gram = problem
    error = weight - quantized
    products = {
        m: adapter_product(*_init(problem, m), SCALING)
        for m in ("gaussian", "svd", "quailora", "closed_form")
    }
    # The calibrated methods optimize the damped H (their default damping), so compare on that one.
    cal = {m: calibrated_error(error, p, damp(gram, 1e-2)) for m, p in products.items()}
    assert cal["closed_form"] <= cal["quailora"] * (1 + 1e-6)
    assert cal["quailora"] < cal["svd"] < cal["gaussian"]
    unc = {m: weight_error(error, p) for m, p in products.items()}
    assert unc["svd"] == min(unc.values())
    assert unc["svd"] < unc["gaussian"]


def test_gaussian_starts_at_q(problem):
    weight, quantized, _ = problem
    result = _init(problem, "gaussian", seed=3)
    assert torch.count_nonzero(result.lora_B) == 0
    assert result.lora_A.abs().max() <= RANK**0 * weight.shape[1] ** -0.5
    assert torch.equal(result.quantized, quantized)
    again = _init(problem, "gaussian", seed=3)
    assert torch.equal(again.lora_A, result.lora_A)


def test_loftq_lowers_its_error_and_rebuilds_q(problem):
    weight, quantized, _ = problem
    result = _init(problem, "loftq", iterations=4)
    assert len(result.history) == 4
    assert result.history[-1] < result.history[0]
    # The returned Q is exactly the quantization of W − L·R, so a quantized layer can be rebuilt from W and
    # the thin factors (out x r, r x in) alone.
    left, right = result.base_residual
    assert left.shape == (weight.shape[0], RANK) and right.shape == (RANK, weight.shape[1])
    rebuilt = rebuilt_base(weight, result.base_residual)
    assert torch.equal(quailora.get_quantizer("nf4").fake_quantize(rebuilt), result.quantized)
    one = _init(problem, "loftq", iterations=1)
    assert one.base_residual is None and torch.equal(one.quantized, quantized)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rank": 97}, "rank=97"),
        ({"rank": 0}, "rank=0"),
        ({"method": "nope"}, "'nope'"),
        ({"gram": torch.eye(5)}, "gram shape (5, 5)"),
        ({"scaling": float("nan")}, "scaling=nan"),
        ({"method": "closed_form", "gram": None}, "needs gram"),
        ({"bogus_option": 1}, "bogus_option"),
        ({"method": "quailora", "iterations": 0}, "iterations=0"),
        ({"solver": "randomised"}, "solver='randomised'"),
        ({"damping": -0.1}, "damping=-0.1"),
        ({"split": "even"}, "split='even'"),
        ({"niter": -1}, "niter=-1"),
        ({"method": "closed_form", "oversample": 2.5}, "oversample=2.5"),
        ({"method": "qalora_zero", "gram": None}, "needs option(s) ['group_size']"),
        ({"method": "closed_form", "gram": torch.zeros(128, 128), "damping": 0.0}, "not positive definite"),
    ],
)
def test_bad_input_names_layer_and_value(problem, kwargs, needle):
    weight, quantized, gram = problem
    args = {"rank": RANK, "method": "quailora", "gram": gram, "scaling": 1.0} | kwargs
    with pytest.raises(QuailoraInputError) as info:
        quailora.initialize(weight, quantized, name="model.layers.3.mlp.down_proj", **args)
    assert needle in str(info.value)
    assert "model.layers.3.mlp.down_proj" in str(info.value)


def test_seeds_change_gaussian_a(problem):
    a = {seed: _init(problem, "gaussian", seed=seed).lora_A for seed in (0, 1)}
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize(
    ("method", "options", "effective"),
    [
        ("quailora", {"iterations": 2}, {"iterations": 2, "seed": 7}),  # solver auto may draw
        ("quailora", {"solver": "exact", "seed": 3}, {"solver": "exact"}),  # draws nothing: no seed
        ("svd", {"solver": "randomized", "seed": 3}, {"solver": "randomized", "seed": 3}),  # set: kept
        ("gaussian", {}, {"seed": 7}),
        ("qalora_zero", {"group_size": 16}, {"group_size": 16, "seed": 7}),
    ],
)
def test_effective_options_carry_the_seed_only_where_the_method_draws(method, options, effective):
    assert effective_init_options(method, options, 7) == effective
    assert draws_random_numbers(method, options) == ("seed" in effective)


def test_non_finite_weight_is_refused(problem):
    weight, quantized, _ = problem
    bad = weight.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(QuailoraInputError, match="layer q_proj: weight has non-finite"):
        quailora.initialize(bad, quantized, RANK, "svd", name="q_proj")


def test_unknown_quantizer_and_bad_bits():
    with pytest.raises(QuailoraInputError, match="unknown quantizer 'int5'"):
        quailora.get_quantizer("int5")
    with pytest.raises(QuailoraInputError, match="bits=3"):
        quailora.get_quantizer("nf4", bits=3)
    with pytest.raises(QuailoraInputError, match="blocksize=48"):
        quailora.get_quantizer("fp4", blocksize=48)


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_quantizers_have_the_expected_error(name):
    weight, _ = layer_problem()
    q = quailora.get_quantizer(name)
    rel = float((weight - q.fake_quantize(weight)).norm() / weight.norm())
    assert {"nf4": 0.05 < rel < 0.15, "fp4": 0.05 < rel < 0.2, "int8": rel < 0.01}[name], rel
