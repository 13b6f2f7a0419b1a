"""Reading a bf16 checkpoint module by module: the former path (a float32 CPU copy of each tensor, one
tensor at a time, then moved) against quailora.checkpoint's (stored dtype straight onto the device,
converted there, on a thread pool, large tensors in row chunks) (issue 27 item 2).

    python benchmarks/checkpoint_reads.py                 # ~2 min on 2 cores: a 0.54 GB bf16 checkpoint
    python benchmarks/checkpoint_reads.py --device cuda   # the same cases read onto the GPU

A bf16 checkpoint (two shards: an embedding of vocab x hidden and ``--layers`` LLaMA-shaped decoder layers)
is written once, then read as calibration reads it: one module at a time (the embedding, then each layer's
state_dict), each dropped before the next. Cases, interleaved over ``--reps`` rounds, the median reported
(all in one process, so that starting torch is not timed):

- ``old fp32, 1 thread``: the former ``SafetensorsWeights.get``, ``f.get_tensor(key).to(float32, copy=True)``,
  per tensor, then ``.to(device, compute dtype)`` as the callers did;
- ``new fp32, 1 thread`` / ``new fp32, N threads``: ``state_dict(prefix, device=, dtype=float32)``: the
  same values (asserted equal, tensor by tensor, before the timed rounds), converted in one pass out of
  the mapping;
- ``new bf16, N threads``: ``dtype=None``, the stored dtype, what a bf16 compute dtype reads.

CPU s: the process's user + system time over the warm reads (all threads): the work, which the load of
other processes on the machine changes less than the wall time. ``cold``: the shards' pages are first dropped from the page cache (``posix_fadvise(DONTNEED)``), so the
read includes the disk; ``warm``: read again right after. bytes = what the reads leave on the device (for
the old path on a GPU also the float32 host copies). peak = the process's peak RSS (VmHWM, on CUDA also max
allocated) over the read minus what it held before; glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_)
so freed blocks leave the heap. torch's own intra-op threads are 1 in every case (a Ray worker with
cpus_per_worker=1 gets OMP_NUM_THREADS=1), so the pool is the only parallelism.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("old fp32, 1 thread", "new fp32, 1 thread", "new fp32, N threads", "new bf16, N threads")


def make_checkpoint(path: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": weight(vocab, hidden)}, {}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = shards[0 if i < layers // 2 else 1]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"{p}self_attn.{name}.weight"] = weight(hidden, hidden)
        shard[f"{p}mlp.gate_proj.weight"] = weight(intermediate, hidden)
        shard[f"{p}mlp.up_proj.weight"] = weight(intermediate, hidden)
        shard[f"{p}mlp.down_proj.weight"] = weight(hidden, intermediate)
        shard[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    weight_map = {}
    for i, state in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(state, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def drop_page_cache(checkpoint: Path) -> None:
    for shard in checkpoint.glob("*.safetensors"):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def old_state_dict(weights, prefix: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The former SafetensorsWeights.state_dict (one float32 CPU copy per tensor, one by one), then the
    callers' move to the device in the compute dtype."""
    from safetensors import safe_open

    state = {}
    for name in weights:
        if name.startswith(prefix):
            key, path = weights.stored_key(name)
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor(key).to(torch.float32, copy=True)
            state[name[len(prefix) :]] = t.to(device, dtype if t.is_floating_point() else t.dtype)
    return state


def run_case(case: str, checkpoint: Path, device: torch.device, cold: bool) -> dict:
    from quailora.checkpoint import SafetensorsWeights, read_threads
    from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory

    torch.set_num_threads(1)
    weights = SafetensorsWeights(checkpoint)
    modules = sorted({".".join(name.split(".")[:3]) for name in weights if ".layers." in name})
    modules = ["model.embed_tokens", *sorted(modules, key=lambda m: int(m.rsplit(".", 1)[1]))]
    threads = 1 if "1 thread" in case else read_threads()
    dtype = None if "bf16" in case else torch.float32

    def read(module: str) -> dict[str, torch.Tensor]:
        if case.startswith("old"):
            return old_state_dict(weights, module + ".", device, torch.float32)
        return weights.state_dict(module, device=device, dtype=dtype, threads=threads)

    if cold:
        drop_page_cache(checkpoint)
    reset_peak_memory("cpu")
    before_rss = peak_memory_mb("cpu")["peak_rss_mb"]  # VmHWM right after its reset: the RSS now
    if device.type == "cuda":
        before_dev = held_memory_mb(device)
        reset_peak_memory(device)
    seconds = cpu = 0.0
    out_bytes = host_bytes = 0
    for module in modules:
        began, cpu_began = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        state = read(module)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        done = resource.getrusage(resource.RUSAGE_SELF)
        cpu += done.ru_utime + done.ru_stime - cpu_began.ru_utime - cpu_began.ru_stime
        out_bytes += sum(t.numel() * t.element_size() for t in state.values())
        if case.startswith("old"):
            host_bytes += sum(t.numel() * 4 for t in state.values())  # the float32 CPU copies
        elif device.type == "cpu":
            host_bytes += sum(t.numel() * t.element_size() for t in state.values())
        del state
    result = {
        "case": case,
        "cold": cold,
        "threads": threads,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "out_bytes": out_bytes,
        "host_bytes": host_bytes,
        "peak_rss_mb": peak_memory_mb("cpu")["peak_rss_mb"] - before_rss,
    }
    if device.type == "cuda":
        result["peak_device_mb"] = peak_memory_mb(device)["peak_memory_mb"] - before_dev
    return result


def run_all(checkpoint: Path, device: torch.device, reps: int) -> list[dict]:
    """Every case, cold then warm, ``reps`` rounds, interleaved, after checking the values once."""
    from quailora.checkpoint import SafetensorsWeights

    weights = SafetensorsWeights(checkpoint)  # first, not timed: every new case's values are the old path's
    for name in weights:
        old = old_state_dict(weights, name, device, torch.float32)[""]
        for dtype, threads in ((torch.float32, 1), (torch.float32, 2), (None, 2)):
            new = weights.get(name, device=device, dtype=dtype, threads=threads)
            assert torch.equal(new.to(torch.float32), old), (name, dtype, threads)
    results = []
    for _ in range(reps):
        for case in CASES:
            for cold in (True, False):
                gc.collect()
                results.append(run_case(case, checkpoint, device, cold))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint to read instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the runs, in this process
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(run_all(args.checkpoint, device, args.reps)))
        return []

    with tempfile.TemporaryDirectory(prefix="checkpoint_reads_") as tmp:
        checkpoint = args.checkpoint or make_checkpoint(
            Path(tmp) / "ckpt", args.hidden, args.intermediate, args.layers, args.vocab
        )
        size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", "--checkpoint", str(checkpoint), "--device", args.device]
        done = subprocess.run(
            cmd + ["--reps", str(args.reps)], env=env, capture_output=True, text=True, cwd=ROOT
        )
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        results = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"checkpoint: {size / 1e9:.3f} GB bf16 in 2 shards (embedding {args.vocab}x{args.hidden}, {args.layers} "
        f"layers of hidden {args.hidden}, intermediate {args.intermediate}); device {args.device}; "
        f"{len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()[0]:.1f}; median of {args.reps}\n"
    )
    peak = "peak RSS MB" + (" | peak device MB" if device.type == "cuda" else "")
    print(
        f"| case | threads | cold s | warm s | cold speed-up | warm speed-up | CPU s (warm) | GB read out | "
        f"GB of host copies | {peak} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    med = {}
    for case in CASES:
        for cold in (True, False):
            runs = [r for r in results if r["case"] == case and r["cold"] == cold]
            med[case, cold] = {
                k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("case", "cold")
            }
    base_cold, base_warm = med[CASES[0], True]["seconds"], med[CASES[0], False]["seconds"]
    for case in CASES:
        cold, warm = med[case, True], med[case, False]
        row = (
            f"| {case} | {int(cold['threads'])} | {cold['seconds']:.2f} | {warm['seconds']:.2f} | "
            f"{base_cold / cold['seconds']:.2f} | {base_warm / warm['seconds']:.2f} | {warm['cpu_seconds']:.2f} | "
            f"{cold['out_bytes'] / 1e9:.3f} | {cold['host_bytes'] / 1e9:.3f} | "
            f"{max(cold['peak_rss_mb'], warm['peak_rss_mb']):.0f} |"
        )
        if device.type == "cuda":
            row += f" {max(cold['peak_device_mb'], warm['peak_device_mb']):.0f} |"
        print(row)
    print(
        "\nper run (s): "
        + "; ".join(f"{r['case']}{' cold' if r['cold'] else ''} {r['seconds']:.2f}" for r in results)
    )
    return results


if __name__ == "__main__":
    main()
