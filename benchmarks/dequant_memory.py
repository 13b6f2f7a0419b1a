"""Bytes per weight that a forward and backward through one quantized linear hold at once while dequantizing
it, per quantizer, on CPU: the figures behind each QuantizerSpec's dequant_bytes (orchestrator/memory.py
adds them to the train and evaluate phases for the largest quantized linear).

    HF_HUB_OFFLINE=1 python benchmarks/dequant_memory.py [--out 4096 --in 8192]

Each row: a 4096 x 8192 layer quantized as the trial's backend does it, bf16 activations of 128 tokens
that need a gradient, two warm-up passes, then the peak anonymous memory of one pass over what was held
before it (quailora/peak_memory.py), per weight, beside the spec's figure at bf16 (c = 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory  # noqa: E402
from quailora.quantizers import quantizer_spec  # noqa: E402
from trials.config import QuantSpec  # noqa: E402

CASES = {"nf4": QuantSpec(method="nf4", bits=4), "int8": QuantSpec(method="int8", bits=8),
         "int": QuantSpec(method="int", bits=4, group_size=64)}  # fmt: skip


def quantized_layer(method: str, settings: QuantSpec, linear: torch.nn.Linear) -> torch.nn.Module:
    """The layer as a trial's base holds it: quantized by the method's backend, on the CPU path trials use."""
    model = torch.nn.Sequential(
        quantizer_spec(method).backend().quantize_linear(linear.to(torch.bfloat16), settings)
    )
    if method == "nf4":
        from quailora.quantizers.bnb.layers import exact_cpu_4bit

        exact_cpu_4bit(model)
    return model


def bytes_per_weight(layer: torch.nn.Module, n_in: int, weights: int) -> float:
    x = torch.randn(1, 128, n_in, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        layer(x).float().pow(2).mean().backward()
    reset_peak_memory()
    before = held_memory_mb()
    layer(x).float().pow(2).mean().backward()
    return (peak_memory_mb()["peak_memory_mb"] - before) * 2**20 / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="n_in", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| quantizer | measured bytes/weight | dequant_bytes(2) |\n|---|---:|---:|")
    for method, settings in CASES.items():
        layer = quantized_layer(method, settings, torch.nn.Linear(args.n_in, args.out, bias=False))
        measured = bytes_per_weight(layer, args.n_in, args.out * args.n_in)
        print(f"| {method} | {measured:.2f} | {quantizer_spec(method).dequant_bytes(2)} |")


if __name__ == "__main__":
    main()
