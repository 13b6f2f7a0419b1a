"""Sum XᵀX over the calibration tokens for every distinct input of a decoder layer's nn.Linear modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def tf32_matmul(enabled: bool) -> Iterator[None]:
    """CUDA fp32 matmuls on TF32 tensor cores for the block. Used where it loses nothing: a bf16 value's
    8-bit significand fits TF32's 11 bits, so the products of bf16 inputs are exact and only the fp32 sums'
    order changes (the forward runs in bf16 on GPUs; strict fp32 matmuls would be several times slower)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class GramAccumulator:
    """Forward pre-hooks on a layer's nn.Linear modules.

    Modules that read the very same tensor in one forward (q/k/v, gate/up) share one sum, keyed by
    the first of them to run. Each input is kept referenced until ``end_batch`` so that ``is``
    comparisons cannot be fooled by a freed tensor's memory being reused.
    """

    def __init__(self, layer: nn.Module, prefix: str, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.group_of: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        linears = [(f"{prefix}.{name}", m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
        self.names = [name for name, _ in linears]  # every hooked module, reached or not
        self._handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, module in linears
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            key = next((k for seen, k in self._seen if seen is x), None)
            if key is None:
                key = name
                self._seen.append((x, key))
                self._add(key, x)
            if self.group_of.setdefault(name, key) != key:
                raise RuntimeError(f"{name} shares its input with {key} in one batch, not in another")

        return hook

    def _add(self, key: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        exact_in_tf32 = flat.is_cuda and flat.dtype == torch.bfloat16
        flat = flat.to(self.dtype)
        if key not in self.sums:
            self.sums[key] = torch.zeros(flat.shape[1], flat.shape[1], dtype=self.dtype, device=flat.device)
            self.rows[key] = 0
        with tf32_matmul(exact_in_tf32):
            self.sums[key].addmm_(flat.T, flat)
        self.rows[key] += flat.shape[0]

    def end_batch(self) -> None:
        self._seen.clear()

    def grams(self) -> dict[str, torch.Tensor]:
        """H = XᵀX / N per shared input, float32 on CPU. Hands the sums over (divided in place, no second copy)
        and keeps no reference, so a writer that drops each Gram frees it: call it once, after any reduction
        of ``sums`` and ``rows`` over data-parallel processes."""
        sums, self.sums = self.sums, {}
        return {key: total.div_(self.rows[key]).to("cpu", torch.float32) for key, total in sums.items()}

    def remove(self) -> None:
        """Stop accumulating. Idempotent, so a propagation may stop early and the caller still cleans up."""
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
