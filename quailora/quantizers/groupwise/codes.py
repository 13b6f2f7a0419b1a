"""Group-wise asymmetric INT-k round-to-nearest (the quantizer of QA-LoRA), with densely packed codes.

Each (output row i, group g of L consecutive inputs) has a scale α = (max − min)/(2^k − 1) and an
integer zero point z = round(−min/α); a weight w is stored as the code c = clamp(round(w/α) + z, 0, 2^k − 1)
and read back as α·(c − z), so |w − α(c − z)| ≤ α/2.

Storage: codes are packed ⌊32/k⌋ to an int32 word (k = 2, 4, 8 fill the word; k = 3 packs 10 codes in
30 bits, 6.25 % padding). Scales are float16 (rounded up, so the α/2 bound still holds) and zeros
float32 (integers here, but a QA-LoRA merge makes them fractional and must stay exact): 48 bits per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quailora.errors import QuailoraInputError
from quailora.quantizers.groupwise import SUPPORTED_BITS

SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.float32
# Smallest normal float16: a constant group (max == min) would give α = 0, and α must stay invertible.
MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny
# Weights dequantized per block of rows: bounds the float32 temporaries to ~64 MiB at any layer size.
DEQUANT_BLOCK = 2**22


@dataclass(frozen=True)
class GroupwiseQuantized:
    """Packed INT-k weight: dequantized W[i, j] = scales[i, g] * (code[i, j] − zeros[i, g]), g = j // group_size."""

    codes: torch.Tensor  # int32 words, ⌊32/bits⌋ codes each, row-major over the (out x in) codes
    scales: torch.Tensor  # float16, (out, in / group_size)
    zeros: torch.Tensor  # float32, (out, in / group_size)
    shape: tuple[int, int]
    bits: int
    group_size: int


def codes_per_word(bits: int) -> int:
    return 32 // bits


def packed_words(count: int, bits: int) -> int:
    return -(-count // codes_per_word(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into int32 words (little-endian within a word), zero-padded."""
    per_word = codes_per_word(bits)
    flat = codes.reshape(-1).to(torch.int64)
    flat = F.pad(flat, (0, (-flat.numel()) % per_word)).view(-1, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (flat << shifts).sum(dim=1)  # < 2^32: fits int64, then wrap into int32's two's complement
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_codes: the first ``count`` codes as int32."""
    shifts = torch.arange(codes_per_word(bits), device=words.device, dtype=torch.int32) * bits
    # Arithmetic right shift sign-extends, but the mask keeps only the k bits that belong to the code.
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]


def unpack_rows(words: torch.Tensor, bits: int, in_features: int, start: int, stop: int) -> torch.Tensor:
    """The codes of rows ``start:stop`` (int32, (stop - start) x in_features), unpacking only the words
    that hold them (a row need not start on a word boundary)."""
    per_word = codes_per_word(bits)
    first, last = start * in_features, stop * in_features
    w0, w1 = first // per_word, -(-last // per_word)
    codes = unpack_codes(words[w0:w1], bits, (w1 - w0) * per_word)
    return codes[first - w0 * per_word :][: last - first].view(stop - start, in_features)


def dequantize_packed(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W in ``dtype`` from packed codes, each value computed in float32 and rounded once to ``dtype``;
    shared by the quantizer and GroupwiseLinear. Built DEQUANT_BLOCK elements at a time, so besides the
    result no out x in temporary exists (unpacking and float32 math took ~14 bytes per weight at once)."""
    out_features, in_features = shape
    w = torch.empty(shape, dtype=dtype, device=codes.device)
    step = max(1, DEQUANT_BLOCK // in_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        c = unpack_rows(codes, bits, in_features, start, stop).view(stop - start, -1, group_size)
        block = scales[start:stop].float().unsqueeze(-1) * (
            c.float() - zeros[start:stop].float().unsqueeze(-1)
        )
        w[start:stop] = block.view(stop - start, in_features)
    return w


def _round_up_to_scale_dtype(alpha: torch.Tensor) -> torch.Tensor:
    """α in float16, never below the float32 value, so the grid still spans [min, max]."""
    half = alpha.clamp_min(MIN_SCALE).to(SCALE_DTYPE)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < alpha, up, half)


class GroupwiseIntQuantizer:
    """Asymmetric RTN per (row, group of ``group_size`` inputs), k = 2, 3, 4 or 8 bits."""

    name = "int"

    def __init__(self, bits: int, group_size: int = 64) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise QuailoraInputError(
                f"quantizer 'int': bits={bits!r} is not supported; choose one of {tuple(sorted(SUPPORTED_BITS))}"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise QuailoraInputError(f"quantizer 'int': group_size={group_size!r} must be a positive integer")
        self.bits = bits
        self.group_size = group_size

    def check_shape(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise before any compute when a layer cannot be grouped."""
        if len(shape) != 2:
            raise QuailoraInputError(
                f"quantizer 'int': {name} must be 2-D (out x in), got shape {tuple(shape)}"
            )
        if shape[1] % self.group_size:
            raise QuailoraInputError(
                f"quantizer 'int': {name} of shape (out={shape[0]}, in={shape[1]}) has in_features={shape[1]} "
                f"not divisible by group_size={self.group_size}"
            )

    def quantize(self, weight: torch.Tensor, name: str = "weight") -> GroupwiseQuantized:
        self.check_shape(tuple(weight.shape), name)
        if not torch.isfinite(weight).all():
            raise QuailoraInputError(f"quantizer 'int': {name} has non-finite values (NaN or inf)")
        out_features, in_features = weight.shape
        qmax = 2**self.bits - 1
        groups = weight.detach().to(torch.float32).view(out_features, -1, self.group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = _round_up_to_scale_dtype((high - low) / qmax)
        alpha = scales.float()
        zeros = torch.round(-low / alpha)
        codes = (torch.round(groups / alpha.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp_(0, qmax)
        return GroupwiseQuantized(
            codes=pack_codes(codes, self.bits),
            scales=scales,
            zeros=zeros.to(ZERO_DTYPE),
            shape=(out_features, in_features),
            bits=self.bits,
            group_size=self.group_size,
        )

    @staticmethod
    def dequantize(q: GroupwiseQuantized) -> torch.Tensor:
        return dequantize_packed(q.codes, q.scales, q.zeros, q.shape, q.bits, q.group_size)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(weight))
