"""Layer-split initialization on k workers: measured wall time and speed-up over one worker.

    python benchmarks/init_workers.py --hidden 1024 --mlp 2816 --layers 8 --workers 1 2

Each worker is a process in a gloo group, like a trial's Ray Train workers: it takes its share of
decoder layers from ``quailora.calibration.partition_layers``, solves their seven projections (q, k, v,
o, gate, up, down) with ``quailora.initialize``, and the adapters are all-gathered to every worker, as
``trials/stages.py`` does. Every worker gets ``--threads`` threads, so k workers use k times the
cores of one: the speed-up is what adding workers buys. Synthetic weights and Grams
(``quailora.bench.synthetic_layer``) are built before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quailora.api import initialize, validate_options
from quailora.bench import (
    QUANTIZER_FOR_BITS,
    decoder_shapes,
    method_options_for,
    quantizer_for_bits,
    synthetic_layer,
)
from quailora.calibration import partition_layers
from quailora.initializers import needs_gram


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    quantizer = quantizer_for_bits(args.bits)
    mine = partition_layers(list(range(args.layers)), world_size)[rank]
    problems = []
    for layer in mine:
        for j, (proj, (out_f, in_f)) in enumerate(decoder_shapes(args.hidden, args.mlp).items()):
            weight, gram = synthetic_layer(out_f, in_f, seed=layer * 7 + j)
            problems.append((f"layers.{layer}.{proj}", weight, quantizer.fake_quantize(weight), gram))
    dist.barrier()
    start = time.perf_counter()
    adapters = {}
    for name, weight, quantized, gram in problems:
        result = initialize(weight, quantized, args.rank, args.method, gram=gram if needs_gram(args.method) else None,
                            name=name, quantizer=quantizer, **args.options)  # fmt: skip
        adapters[name] = (result.lora_A, result.lora_B)
    solved = time.perf_counter() - start
    shares: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(shares, adapters)
    wall = time.perf_counter() - start
    gathered = sum(len(share) for share in shares)
    walls: list[tuple[float, float] | None] = [None] * world_size
    dist.all_gather_object(walls, (wall, solved))
    if rank == 0:
        out["result"] = {"walls": walls, "gathered": gathered}
    dist.destroy_process_group()


def run(args: argparse.Namespace, world_size: int) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world_size, _free_port(), args, out), nprocs=world_size, join=True)
        result = dict(out["result"])
    expected = args.layers * 7
    if result["gathered"] != expected:
        raise RuntimeError(f"gathered {result['gathered']} adapters, expected {expected}")
    return {
        "workers": world_size,
        "threads_per_worker": args.threads,
        "layers": args.layers,
        "layers_per_worker_max": math.ceil(args.layers / world_size),
        "wall_seconds": round(max(w for w, _ in result["walls"]), 3),
        "solve_seconds_max": round(max(s for _, s in result["walls"]), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4, choices=sorted(QUANTIZER_FOR_BITS))
    parser.add_argument("--method", default="quailora")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of quailora's ALS and loftq")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    args.options = method_options_for(args.method, iterations=args.iterations, solver="auto", group_size=64)
    validate_options(args.method, args.options, where="--method")
    if 1 not in args.workers or min(args.workers) < 1 or args.layers < 1:
        parser.error("--workers must include 1 (the peer) and be positive; --layers positive")
    if os.cpu_count() and max(args.workers) * args.threads > os.cpu_count():
        parser.error(
            f"{max(args.workers)} workers x {args.threads} threads exceed the {os.cpu_count()} cores"
        )
    one = None
    for k in sorted(set(args.workers)):
        row = run(args, k)
        one = one or row["wall_seconds"]
        row["speedup_vs_1"] = round(one / row["wall_seconds"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
