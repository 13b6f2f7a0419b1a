"""Group-wise INT-k memory, before and after: loading a checkpoint, and a forward + backward through the layers.

    python benchmarks/groupwise_memory.py --device cpu            # ~3 min on 2 cores
    python benchmarks/groupwise_memory.py --device cpu --hidden 4096 --layers 4 --cases step-dequantized-linear step-groupwise
    python benchmarks/groupwise_memory.py --device cuda --hidden 4096 --layers 4

load: ``from_pretrained`` of the whole model in full precision, then ``quantize_model_groupwise`` (the
trial's former path), against ``quailora.quantizers.groupwise.loading.load_groupwise_model`` (one weight at
a time on the device). step: forward and backward (input gradient, as LoRA training needs) through a stack of
``GroupwiseLinear`` layers, with the former forward ``F.linear(x, layer.dequantize().to(x.dtype), b)``
against the layer's own. Each case runs in a fresh process; peak = the process's peak RSS (VmHWM) on CPU,
CUDA's max allocated on CUDA, both minus what was held before the case started. On CPU the cases run
with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_): its default rises as large blocks are freed,
after which freed temporaries stay in the heap and the peak RSS would count memory no longer in use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CASES = ("load-whole", "load-streamed", "step-dequantized-linear", "step-groupwise")


def make_checkpoint(path: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 128), vocab_size=320)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path, max_shard_size="1GB")
    return path


def run_case(case: str, device: torch.device, checkpoint: Path, hidden: int, layers: int) -> dict:
    from transformers import AutoModelForCausalLM

    from quailora.architectures import prepare
    from quailora.peak_memory import held_memory_mb, peak_memory_mb, reset_peak_memory
    from quailora.quantizers.groupwise.layer import GroupwiseLinear, quantize_model_groupwise
    from quailora.quantizers.groupwise.loading import load_groupwise_model

    if case.startswith("step"):  # the layers exist before the measured phase
        gen = torch.Generator().manual_seed(0)
        stack = [
            GroupwiseLinear.from_linear(torch.nn.Linear(hidden, hidden, device=device), 4, 64)
            for _ in range(layers)
        ]
        x = torch.randn(4, 128, hidden, generator=gen).to(device).requires_grad_()
    reset_peak_memory(device)
    # on CPU the whole resident set (VmHWM, right after its reset: the RSS now), on CUDA allocated memory
    peak = "peak_memory_mb" if device.type == "cuda" else "peak_rss_mb"
    before = held_memory_mb(device) if device.type == "cuda" else peak_memory_mb(device)[peak]
    began = time.perf_counter()
    if case == "load-whole":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        prepare(model)
        quantize_model_groupwise(model, 4, 64).to(device)
    elif case == "load-streamed":
        load_groupwise_model(checkpoint, 4, 64, dtype=torch.float32, device=device)
    else:
        h = x
        for layer in stack:
            if case == "step-groupwise":
                h = layer(h)
            else:
                h = F.linear(h, layer.dequantize().to(h.dtype), layer.bias.to(h.dtype))
        h.float().pow(2).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return {"case": case, "device": device.type, "hidden": hidden, "layers": layers,
            "peak_mb": round(peak_memory_mb(device)[peak] - before, 1), "seconds": round(seconds, 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024, help="load: llama hidden size; step: layer width")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cases", nargs="*", choices=CASES, default=list(CASES))
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.case:
        row = run_case(args.case, device, Path(args.checkpoint), args.hidden, args.layers)
        print(json.dumps(row), flush=True)
        return [row]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        if any(case.startswith("load") for case in args.cases):
            make_checkpoint(checkpoint, args.hidden, args.layers)
        for case in args.cases:
            out = subprocess.run(
                [sys.executable, __file__, "--case", case, "--checkpoint", str(checkpoint),
                 "--device", args.device, "--hidden", str(args.hidden), "--layers", str(args.layers)],
                check=True, capture_output=True, text=True, cwd=ROOT,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
            )  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
