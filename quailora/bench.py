"""Initialization benchmark: error reduction, seconds and peak memory per (method, shape, rank, bits).

    python -m quailora.bench --json          # default shapes, < 5 min on 2 CPU cores
    python -m quailora.bench --json --full   # adds LLaMA-7B and LLaMA-30B layer shapes

peft's own SVD step (``peft.utils.loftq_utils._low_rank_decomposition``, a full SVD) runs as a peer row
on the same matrices, first in each group, so every row's ``peft_svd_seconds_ratio`` (its seconds over
peft's) comes from one run. Errors are relative to the error of Q alone:
uncalibrated ‖E − sBA‖²/‖E‖², calibrated tr((E − sBA)H(E − sBA)ᵀ)/tr(EHEᵀ).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft.utils.loftq_utils import _low_rank_decomposition

from quailora.api import initialize, validate_options
from quailora.errors import QuailoraInputError
from quailora.initializers import INITIALIZERS, adapter_kind, method_options, needs_gram
from quailora.linalg import adapter_product, calibrated_error, weight_error
from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory
from quailora.qalora.pooling import expand
from quailora.quantizers import get_quantizer, quantizer_spec
from quailora.quantizers.base import Quantizer

DEFAULT_SHAPES = [(512, 512), (1024, 2816), (2816, 1024)]
# (out, in) of LLaMA-7B (4096 hidden, 11008 MLP) and LLaMA-30B (6656 hidden, 17920 MLP) projections.
FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (6656, 6656), (17920, 6656), (6656, 17920)]
# Every registered plain-LoRA method; the pooled (QA-LoRA) ones via --methods.
DEFAULT_METHODS = [m for m in INITIALIZERS if adapter_kind(m) == "plain"]
# The bench's quantizer for a bit width: the first of these whose registered bits allow it.
BENCH_QUANTIZERS = ("nf4", "int8", "int")
QUANTIZER_FOR_BITS = {bits: name for name in reversed(BENCH_QUANTIZERS) for bits in quantizer_spec(name).bits}
# Rounding of the published columns: microseconds, so a ratio of the rounded seconds of millisecond solves
# stays within 0.1 % of the ratio of the raw timings it is computed from.
SECONDS_DECIMALS = 6
RATIO_DECIMALS = 3


def quantizer_for_bits(bits: int) -> Quantizer:
    return get_quantizer(QUANTIZER_FOR_BITS[bits], bits=bits)


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of one decoder layer of any causal LM (``transformers`` config), named
    within the layer: what a worker solves per layer, read through quailora.architectures."""
    from quailora.architectures import Layout

    layout = Layout.from_config(config)
    prefix = layout.layer_name(0) + "."
    return {name.removeprefix(prefix): (n_out, n_in) for name, (n_in, n_out) in layout.linears(0).items()}


def decoder_shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """The projections of one LLaMA decoder layer of that width (heads of 128, no GQA, as LLaMA 1)."""
    from transformers import LlamaConfig

    heads = hidden // 128 if hidden % 128 == 0 else 1
    return layer_shapes(LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1,
                                    num_attention_heads=heads, vocab_size=8))  # fmt: skip


@contextmanager
def peak_growth() -> Iterator[dict]:
    """Peak memory growth during the block, as a trial's phases measure it (quailora/peak_memory.py: on CPU
    the sampled anonymous resident memory; torch allocations are invisible to tracemalloc)."""
    reset_peak_memory()  # first: it hands freed heap back to the OS, which lowers what is held
    start = held_memory_mb()
    box: dict = {}
    yield box
    box["peak_mb"] = peak_memory_mb()["peak_memory_mb"] - start


def synthetic_layer(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ N(0, 1/in); H = GGᵀ/k + diag with a few outlier channels, like LLM input Grams (PSD, O(n²k) to build)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    k = 256
    g = torch.randn(in_features, k, generator=gen)
    scale = torch.ones(in_features)
    scale[torch.randperm(in_features, generator=gen)[: max(1, in_features // 256)]] = 20.0
    g *= scale[:, None]
    gram = g @ g.T / k
    gram.diagonal().add_(0.1)
    return weight, gram


def _timed(solve: Callable[[], object]) -> tuple[object, float, float]:
    """Seconds and peak memory of the solve alone; scoring its result (two out x in products) is not counted."""
    with peak_growth() as mem:
        start = time.perf_counter()
        result = solve()
        seconds = time.perf_counter() - start
    return result, seconds, mem["peak_mb"]


def method_options_for(method: str, *, iterations: int, solver: str, group_size: int) -> dict:
    """The bench's knobs that this method accepts (from its options class, so a new method needs no edit here)."""
    knobs = {"iterations": iterations, "solver": solver, "group_size": group_size}
    accepted = method_options(method, where="--methods")
    return {k: v for k, v in knobs.items() if k in accepted}


def bench_rows(
    shapes: list[tuple[int, int]],
    ranks: list[int],
    bits_list: list[int],
    methods: list[str],
    *,
    iterations: int = 20,
    solver: str = "auto",
    group_size: int = 64,
) -> Iterator[dict]:
    options = {
        m: method_options_for(m, iterations=iterations, solver=solver, group_size=group_size) for m in methods
    }
    for m, opts in options.items():  # every method and option checked before the first matrix is built
        validate_options(m, opts, where="--methods")
    for bits in bits_list:
        if bits not in QUANTIZER_FOR_BITS:
            raise QuailoraInputError(f"--bits {bits}: choose from {sorted(QUANTIZER_FOR_BITS)}")
    for out_features, in_features in shapes:
        weight, gram = synthetic_layer(out_features, in_features)
        for bits in bits_list:
            quantizer = quantizer_for_bits(bits)
            quantized = quantizer.fake_quantize(weight)
            error = weight - quantized
            base_unc = weight_error(error, torch.zeros(()))
            base_cal = calibrated_error(error, torch.zeros(()), gram)
            for rank in ranks:
                # The peer runs first so every method row can carry its speed ratio from the same run.
                rows = [("peft_svd", *_peft_runner(error, rank))]
                rows += [
                    (m, *_method_runner(m, weight, quantized, gram, rank, quantizer, options[m]))
                    for m in methods
                ]
                peer_seconds = None
                for method, solve, score in rows:
                    result, seconds, peak_mb = _timed(solve)
                    product, moved_error = score(result)
                    del result
                    peer_seconds = peer_seconds or seconds
                    yield {
                        "method": method,
                        "shape": [out_features, in_features],
                        "rank": rank,
                        "bits": bits,
                        "quantizer": quantizer.name,
                        "rel_error": weight_error(moved_error, product) / base_unc,
                        "rel_calibrated_error": calibrated_error(moved_error, product, gram) / base_cal,
                        "seconds": round(seconds, SECONDS_DECIMALS),
                        "peft_svd_seconds_ratio": round(seconds / peer_seconds, RATIO_DECIMALS),
                        "peak_mb": round(peak_mb, 1),
                        "threads": torch.get_num_threads(),
                    }


def _method_runner(method, weight, quantized, gram, rank, quantizer, options):
    """(solve, score): the initialization itself, and its product and error matrix for the error columns."""

    def solve():
        return initialize(
            weight,
            quantized,
            rank,
            method,
            gram=gram if needs_gram(method) else None,
            quantizer=quantizer,
            **options,
        )

    def score(result):
        product = adapter_product(result.lora_A, result.lora_B, 1.0)
        if adapter_kind(method) == "pooled":  # the pooled update acts as B·A·P on the full input
            product = expand(product, options["group_size"])
        return product, weight - result.quantized

    return solve, score


def _peft_runner(error: torch.Tensor, rank: int):
    def score(out):
        return out["L"] @ out["R"], error

    return (lambda: _low_rank_decomposition(error, reduced_rank=rank)), score


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quailora.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    parser.add_argument("--full", action="store_true", help="add LLaMA-7B and LLaMA-30B layer shapes")
    parser.add_argument("--shapes", nargs="*", help="OUTxIN shapes instead of the defaults, e.g. 6656x17920")
    parser.add_argument(
        "--model", help="the distinct layer shapes of this model's decoder layer (a checkpoint dir or hub id)"
    )
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--bits", type=int, nargs="*", default=[4], choices=sorted(QUANTIZER_FOR_BITS))
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--iterations", type=int, default=20, help="iterations of quailora's ALS and loftq")
    parser.add_argument("--group-size", type=int, default=64, help="QA-LoRA pooling group (qalora_* methods)")
    parser.add_argument("--solver", default="auto", choices=["auto", "exact", "randomized"])
    args = parser.parse_args(argv)
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    )
    if args.model:
        from transformers import AutoConfig

        shapes = sorted(set(layer_shapes(AutoConfig.from_pretrained(args.model)).values()))
    elif args.full and not args.shapes:
        shapes = shapes + FULL_SHAPES
    if not args.json:
        print(
            f"{'method':<12} {'shape':>12} {'rank':>4} {'bits':>4} {'rel_err':>8} {'rel_cal':>8} {'sec':>8} "
            f"{'/peft':>6} {'MB':>8}"
        )
    for row in bench_rows(
        shapes,
        args.ranks,
        args.bits,
        args.methods,
        iterations=args.iterations,
        solver=args.solver,
        group_size=args.group_size,
    ):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            shape = "x".join(map(str, row["shape"]))
            print(
                f"{row['method']:<12} {shape:>12} {row['rank']:>4} {row['bits']:>4} {row['rel_error']:8.4f} "
                f"{row['rel_calibrated_error']:8.4f} {row['seconds']:8.3f} {row['peft_svd_seconds_ratio']:6.2f} "
                f"{row['peak_mb']:8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
