"""Whole-model initialization time from per-projection benchmark rows: one decoder layer, L layers, k workers.

    python -m quailora.bench --json --shapes 6656x6656 17920x6656 6656x17920 --ranks 64 > bench30b.jsonl
    python benchmarks/scale_extrapolate.py bench30b.jsonl --hidden 6656 --mlp 17920 --layers 60

A LLaMA decoder layer has four hidden x hidden projections (q, k, v, o), two mlp x hidden (gate, up) and
one hidden x mlp (down); a worker solves them one after another, so a layer's seconds are the sum of the
seven rows and its working memory the largest row's. Workers take contiguous balanced shares of whole
layers (``quailora.calibration.partition_layers``), so k workers finish after ceil(L / k) layers; the
all-gather of the adapters and the serial Gram collection on rank 0 are not in these figures
(benchmarks/init_workers.py measures the gather on real processes).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from quailora.bench import decoder_shapes
from quailora.calibration import partition_layers


def layer_counts(hidden: int, mlp: int) -> dict[tuple[int, int], int]:
    """(out, in) -> how many of a LLaMA decoder layer's projections have that shape."""
    return dict(Counter(decoder_shapes(hidden, mlp).values()))


def per_layer(rows: list[dict], hidden: int, mlp: int) -> dict[tuple[str, int, int], dict]:
    """(method, rank, bits) -> seconds and peak MB of one decoder layer, for those with every shape measured."""
    counts = layer_counts(hidden, mlp)
    by_key: dict[tuple[str, int, int], dict[tuple[int, int], dict]] = defaultdict(dict)
    for row in rows:
        by_key[(row["method"], row["rank"], row["bits"])][tuple(row["shape"])] = row
    out = {}
    for key, shapes in by_key.items():
        if not set(counts) <= set(shapes):
            continue
        out[key] = {
            "seconds": sum(n * shapes[s]["seconds"] for s, n in counts.items()),
            "peak_mb": max(shapes[s]["peak_mb"] for s in counts),
            "threads": shapes[next(iter(counts))]["threads"],
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="JSON lines from python -m quailora.bench --json")
    parser.add_argument("--hidden", type=int, default=6656)
    parser.add_argument("--mlp", type=int, default=17920)
    parser.add_argument("--layers", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 60])
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    table = per_layer(rows, args.hidden, args.mlp)
    if not table:
        parser.error(
            f"{args.rows}: no method has rows for every shape of a {args.hidden}/{args.mlp} decoder layer"
        )
    # Makespan in layers: the largest share partition_layers gives, i.e. ceil(L / k).
    spans = {
        k: max(len(share) for share in partition_layers(list(range(args.layers)), k)) for k in args.workers
    }
    assert all(spans[k] == math.ceil(args.layers / k) for k in spans)
    head = " | ".join(f"{args.layers} layers, k={k} (min)" for k in args.workers)
    print(f"| method | rank | bits | s / layer | peak MB | {head} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.workers))
    for (method, rank, bits), fig in sorted(table.items(), key=lambda kv: kv[1]["seconds"]):
        minutes = " | ".join(f"{spans[k] * fig['seconds'] / 60:.1f}" for k in args.workers)
        print(f"| {method} | {rank} | {bits} | {fig['seconds']:.1f} | {fig['peak_mb']:.0f} | {minutes} |")
    print(f"\nthreads per worker in the rows: {sorted({fig['threads'] for fig in table.values()})}; "
          f"speed-up at k workers = {args.layers} / ceil({args.layers} / k): "
          + ", ".join(f"k={k}: {args.layers / spans[k]:.2f}x" for k in args.workers))  # fmt: skip


if __name__ == "__main__":
    main()
