"""Group-wise INT-k quantizer: error bounds, the asymmetric grid, bit packing, constant groups, bad input."""

import pytest
import torch

from quailora.errors import QuailoraInputError
from quailora.quantizers import get_quantizer
from quailora.quantizers.groupwise.codes import (
    GroupwiseIntQuantizer,
    codes_per_word,
    pack_codes,
    packed_words,
    unpack_codes,
)

BITS = (2, 3, 4, 8)


def _weight(out_features=24, in_features=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    w[3, 7] = 0.9  # an outlier widens one group's range
    return w


def _per_weight(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_is_at_most_half_a_step(bits):
    w = _weight()
    quantizer = GroupwiseIntQuantizer(bits, group_size=32)
    q = quantizer.quantize(w)
    alpha = _per_weight(q.scales, 32)
    err = (w - quantizer.dequantize(q)).abs()
    assert torch.all(err <= alpha / 2 * (1 + 1e-5) + 1e-7)
    # α is the group's range over 2^k − 1 (up to float16 rounding up), so the bound is not vacuous.
    groups = w.view(24, -1, 32)
    exact = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    assert torch.all(q.scales.float() >= exact)
    assert torch.allclose(q.scales.float(), exact, rtol=2e-3)


@pytest.mark.parametrize("bits", BITS)
def test_dequantized_values_lie_on_the_asymmetric_grid(bits):
    w = _weight(seed=1)
    quantizer = GroupwiseIntQuantizer(bits, group_size=16)
    q = quantizer.quantize(w)
    assert torch.equal(q.zeros, q.zeros.round()), "zero points are integers before any merge"
    codes = quantizer.dequantize(q) / _per_weight(q.scales, 16) + _per_weight(q.zeros, 16)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
    unpacked = unpack_codes(q.codes, bits, w.numel()).view_as(w).float()
    assert torch.allclose(unpacked, codes, atol=1e-3)


def test_relative_error_decreases_with_bits():
    w = _weight(out_features=64, in_features=256)
    errors = []
    for bits in BITS:
        q = get_quantizer("int", bits=bits, group_size=64).fake_quantize(w)
        errors.append(float(torch.linalg.norm(w - q) / torch.linalg.norm(w)))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.01 < errors[0]


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    count = 1001  # not a multiple of any codes-per-word: exercises the padding
    codes = torch.randint(0, 2**bits, (count,), generator=gen)
    codes[:2] = 2**bits - 1  # top bit set: the word's sign bit for k = 2, 4, 8
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.numel() == packed_words(count, bits) == -(-count // (32 // bits))
    assert torch.equal(unpack_codes(words, bits, count).long(), codes)


def test_three_bit_codes_pack_ten_to_a_word():
    assert (
        codes_per_word(3) == 10
        and codes_per_word(2) == 16
        and codes_per_word(4) == 8
        and codes_per_word(8) == 4
    )


def test_constant_groups_quantize_without_nan():
    w = _weight(out_features=4, in_features=64)
    w[0, :32] = 0.0
    w[1, 32:] = 0.37
    w[2, :32] = -1.25
    quantizer = GroupwiseIntQuantizer(4, group_size=32)
    q = quantizer.quantize(w)
    deq = quantizer.dequantize(q)
    assert torch.isfinite(deq).all() and torch.isfinite(q.scales).all() and torch.isfinite(q.zeros).all()
    for row, cols in ((0, slice(0, 32)), (1, slice(32, 64)), (2, slice(0, 32))):
        assert torch.allclose(deq[row, cols], w[row, cols], atol=1e-4)


@pytest.mark.parametrize("bits", [1, 5, 16, 4.0, True])
def test_unsupported_bits_are_named(bits):
    with pytest.raises(QuailoraInputError, match=rf"bits={bits!r}"):
        get_quantizer("int", bits=bits, group_size=64)


def test_group_size_must_divide_in_features_and_the_error_names_the_shape():
    quantizer = GroupwiseIntQuantizer(4, group_size=64)
    with pytest.raises(QuailoraInputError, match=r"layer.q_proj.*out=8, in=100.*group_size=64"):
        quantizer.quantize(torch.randn(8, 100), name="layer.q_proj")
    with pytest.raises(QuailoraInputError, match="group_size=0"):
        GroupwiseIntQuantizer(4, group_size=0)


def test_non_finite_weights_are_rejected():
    w = _weight()
    w[0, 0] = float("nan")
    with pytest.raises(QuailoraInputError, match="non-finite"):
        GroupwiseIntQuantizer(4, 32).quantize(w)
