"""Prove a CUDA install of quailora in one command, offline, in under 8 minutes on one H100/H200.

    bash scripts/gpu_check.sh [--out DIR] [--work DIR] [--cpu-dry-run]

Steps, each time-boxed; DIR/gpu_check.json (the summary) is rewritten as each step starts and ends, so a
timeout still leaves what finished; DIR/gpu_check.log holds every step's output, DIR/gpu_tests.xml and
DIR/init_timing.json the details (four files: the rest, checkpoint and sweep, goes to --work):
1. environment: Python, torch, CUDA, the GPU and whether it computes bf16; the trial stack's versions.
2. checkpoint: a random-init llama (hidden 4096, 2 layers, a 320-token BPE) and text files, built here.
3. gpu_tests: ``pytest -m gpu`` (tests/test_gpu.py), with the figures the tests record.
4. init_timing: ``quailora.initialize`` at each LLaMA-30B decoder-layer shape, per method, on the GPU.
5. sweep: ``quailora run`` of a one-trial sweep (NF4, QuAILoRA, ZeRO-2, bf16, gradient checkpointing) on
   the checkpoint (it prints plan's table first); its MLflow run, artifacts and memory against the estimate.

``--cpu-dry-run`` runs the same logic on the CPU at small sizes (a 128-hidden checkpoint, shapes scaled
down, the sweep on a CPU worker); the GPU tests are collected and skip themselves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Seconds for the whole check and for each step (each gets the least of its own and what is left). On a
# GPU the check must end inside 8 minutes; a 2-core CPU runs the dry run's Ray sweep far slower.
BUDGETS = {
    "cuda": {"check": 470, "environment": 60, "checkpoint": 120, "gpu_tests": 270, "init_timing": 90, "sweep": 200},
    "cpu-dry-run": {"check": 900, "environment": 120, "checkpoint": 120, "gpu_tests": 270, "init_timing": 120,
                    "sweep": 480},
}  # fmt: skip
STACK = ["transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "ray", "mlflow", "pydantic",
         "datasets", "safetensors", "tokenizers", "lm_eval"]  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    hidden: int
    intermediate: int
    heads: int
    shapes: tuple[int, int]  # (hidden, mlp) of the decoder layer whose projections init is timed at
    ranks: tuple[int, ...]
    iterations: int
    model_layers: int  # decoder layers of the model whose shapes are timed: per-model seconds


GPU_SIZES = Sizes(4096, 11008, 32, (6656, 17920), (64,), 20, 60)  # LLaMA-30B: 60 layers of 6656 / 17920
DRY_SIZES = Sizes(128, 256, 4, (256, 688), (8,), 3, 60)


class Check:
    """The summary, rewritten on every change, and the log every step's output goes to."""

    def __init__(self, out: Path, work: Path, dry_run: bool) -> None:
        self.out = out
        self.work = work
        self.dry_run = dry_run
        self.began = time.monotonic()
        self.summary: dict = {"mode": "cpu-dry-run" if dry_run else "cuda", "steps": {}}
        self.budgets = BUDGETS[self.summary["mode"]]
        self.log_path = out / "gpu_check.log"
        self.log = self.log_path.open("a", buffering=1)

    def left(self) -> float:
        return self.budgets["check"] - (time.monotonic() - self.began)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.monotonic() - self.began, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")

    def step(self, name: str, fn: Callable[[float], dict]) -> dict | None:
        """Run ``fn(timeout)``; record ok/failed/timeout with its seconds and result."""
        timeout = min(self.budgets[name], self.left())
        record = {"status": "running", "budget_s": round(timeout)}
        self.summary["steps"][name] = record
        self.save()
        if timeout < 10:
            record["status"] = "not run: the check's time is spent"
            self.save()
            return None
        self.say(f"== {name} (up to {timeout:.0f} s)")
        began = time.monotonic()
        try:
            result = fn(timeout)
            record.update(status="ok", result=result)
        except subprocess.TimeoutExpired:
            record["status"] = "timeout"
        except Exception as err:  # every step's failure is recorded and the check goes on
            record.update(status="failed", error=f"{type(err).__name__}: {err}"[:4000])
            self.log.write(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - began, 1)
        self.say(f"   {name}: {record['status']} in {record['seconds']} s")
        self.save()
        return record.get("result")

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> int:
        """A child in its own session, output to the log; on timeout its whole group is ended."""
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})  # fmt: skip
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def environment(dry_run: bool) -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        from trials.deepspeed_config import native_bf16

        device = torch.device("cuda", 0)
        free, total = torch.cuda.mem_get_info(device)
        found.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                     native_bf16=native_bf16(device), memory_gib=round(total / 2**30, 1),
                     free_gib=round(free / 2**30, 1))  # fmt: skip
    elif not dry_run:
        raise RuntimeError(
            "no CUDA device (torch.cuda.is_available() is False); --cpu-dry-run checks the rest"
        )
    for name in STACK:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "ok")
        except Exception as err:  # a missing optional one (lm_eval) is reported, not fatal
            found[name] = f"missing ({type(err).__name__}: {err})"[:200]
    return found


def build_checkpoint(out: Path, sizes: Sizes) -> dict:
    import torch

    from testkit.micro import make_texts, make_trial_checkpoint

    checkpoint = make_trial_checkpoint(out / "checkpoint", num_layers=2, hidden=sizes.hidden,
                                       intermediate=sizes.intermediate, heads=sizes.heads, max_positions=512,
                                       max_shard_size="2GB", dtype=torch.bfloat16)  # fmt: skip
    texts = make_texts(out)  # train, validation and calibration .txt
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    return {"path": str(checkpoint), "texts": {k: str(v) for k, v in texts.items()}, "bytes": size}


def gpu_tests(check: Check, timeout: float) -> dict:
    report = check.out / "gpu_tests.xml"
    code = check.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs",
                      "-p", "no:cacheprovider", f"--junitxml={report}"], timeout)  # fmt: skip
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                tests_detail = (node.get("message") or node.text or "")[:1500]
                break
        else:
            tests_detail = None
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0)),
                                   **({"detail": tests_detail} if tests_detail else {}),
                                   **({"figures": properties} if properties else {})}  # fmt: skip
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if code not in (0, 5) or counts["failures"] or counts["errors"]:  # 5: nothing collected
        raise AssertionError(f"pytest exited {code}: {counts}; per test: {json.dumps(tests)[:3000]}")
    return {"exit_code": code, **counts, "tests": tests}


def init_timing(sizes: Sizes, deadline_s: float) -> dict:
    """Seconds of quailora.initialize per distinct projection shape of one decoder layer and method, then
    per layer (its seven projections) and per model (model_layers layers, on one device)."""
    import torch

    from quailora.api import initialize
    from quailora.bench import DEFAULT_METHODS, decoder_shapes, method_options_for, synthetic_layer
    from quailora.initializers import needs_gram
    from quailora.peak_memory import peak_memory_mb, reset_peak_memory
    from quailora.quantizers import get_quantizer

    began = time.monotonic()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    quantizer = get_quantizer("nf4")
    options = {m: method_options_for(m, iterations=sizes.iterations, solver="auto", group_size=64)
               for m in DEFAULT_METHODS}  # fmt: skip
    warm_w, warm_h = synthetic_layer(256, 256)  # first calls load solver libraries and kernels: not timed
    for method in DEFAULT_METHODS:
        initialize(warm_w.to(device), quantizer.fake_quantize(warm_w.to(device)), 8, method,
                   gram=warm_h.to(device) if needs_gram(method) else None, quantizer=quantizer, **options[method])  # fmt: skip
    layer = decoder_shapes(*sizes.shapes)
    rows, skipped = [], []
    for shape in sorted(set(layer.values()), key=lambda s: s[0] * s[1]):
        weight, gram = synthetic_layer(*shape)
        weight, gram = weight.to(device), gram.to(device)
        quantized = quantizer.fake_quantize(weight)
        for rank in sizes.ranks:
            for method in DEFAULT_METHODS:
                if time.monotonic() - began > deadline_s:
                    skipped.append(f"{method} {shape} r{rank}")
                    continue
                reset_peak_memory(device)
                sync()
                start = time.perf_counter()
                initialize(weight, quantized, rank, method, gram=gram if needs_gram(method) else None,
                           quantizer=quantizer, **options[method])  # fmt: skip
                sync()
                row = {"shape": list(shape), "rank": rank, "method": method,
                       "seconds": round(time.perf_counter() - start, 4)}  # fmt: skip
                if device.type == "cuda":  # on CPU the process's peak RSS says nothing about one call
                    row["peak_mb"] = round(peak_memory_mb(device)["peak_memory_mb"], 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del weight, gram, quantized
    per_layer = {}
    for rank in sizes.ranks:
        for method in DEFAULT_METHODS:
            times = {
                tuple(r["shape"]): r["seconds"] for r in rows if r["method"] == method and r["rank"] == rank
            }
            if all(shape in times for shape in layer.values()):
                seconds = sum(times[shape] for shape in layer.values())
                per_layer[f"{method} r{rank}"] = {"layer_s": round(seconds, 3),
                                                  "model_s": round(seconds * sizes.model_layers, 1)}  # fmt: skip
    return {"device": str(device), "decoder_layer": {k: list(v) for k, v in layer.items()}, "rows": rows,
            "per_layer": per_layer, "not_timed": skipped}  # fmt: skip


def sweep(check: Check, made: dict, timeout: float) -> dict:
    import yaml

    from testkit.sweeps import check_sweep_outcome, one_trial_sweep, sweep_outcome

    dry = check.dry_run
    train = {"max_steps": 6, "eval_every": 3, "checkpoint_every": 6, "batch_size": 2} if dry else {}
    storage = check.work / "sweep"
    shutil.rmtree(storage, ignore_errors=True)  # `quailora run` refuses an experiment that exists
    spec = one_trial_sweep("gpu-check", Path(made["path"]), made["texts"], storage, gpu=not dry, **train)
    if dry:  # what a CPU worker can do in seconds
        spec["base"]["data"].update(seq_len=64, max_eval_sequences=4)
        spec["base"]["calibration"].update(num_sequences=4, seq_len=64)
    path = check.work / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = check.run([sys.executable, "-m", "orchestrator.cli", "run", str(path)], timeout)
    if code:
        raise RuntimeError(f"quailora run exited {code} (see gpu_check.log)")
    outcome = sweep_outcome(spec, storage)
    metrics = outcome["metrics"]
    measured = max(metrics["init_peak_memory_mb"], metrics["train_peak_memory_mb"])
    outcome["measured_over_estimate"] = round(measured / outcome["estimate_mb"]["peak"], 3)
    try:
        check_sweep_outcome(outcome, "cpu" if dry else "cuda")
    except AssertionError as err:
        check.summary["steps"]["sweep"]["outcome"] = outcome  # the figures, even when a check fails
        raise AssertionError(f"sweep outcome: {err}") from err
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.log and more"
    )
    parser.add_argument("--work", help="folder for the checkpoint and the sweep (default: OUT/work)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="everything but CUDA, on the CPU, small")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gpu_tests", "init_timing", "sweep"])
    parser.add_argument("--part", choices=["init-timing"], help=argparse.SUPPRESS)  # a step's own process
    parser.add_argument("--part-seconds", type=float, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = DRY_SIZES if args.cpu_dry_run else GPU_SIZES
    if args.part == "init-timing":
        result = init_timing(sizes, args.part_seconds)
        Path(args.out, "init_timing.json").write_text(json.dumps(result, indent=1))
        return 0

    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    for folder in (out, work):
        folder.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, args.cpu_dry_run)
    check.say(f"quailora GPU check ({check.summary['mode']}) -> {out}")
    check.step("environment", lambda t: environment(args.cpu_dry_run))
    made = check.step("checkpoint", lambda t: build_checkpoint(work, sizes))
    if "gpu_tests" not in args.skip:
        check.step("gpu_tests", lambda t: gpu_tests(check, t))

    def timing(timeout: float) -> dict:  # its own process: a hung solver cannot stop the check
        dry = ["--cpu-dry-run"] if args.cpu_dry_run else []
        cmd = [sys.executable, __file__, "--part", "init-timing", "--out", str(out), *dry,
               "--part-seconds", str(max(timeout - 40, 5))]  # fmt: skip
        if check.run(cmd, timeout):
            raise RuntimeError("init timing failed (see gpu_check.log)")
        return json.loads((out / "init_timing.json").read_text())

    if "init_timing" not in args.skip:
        check.step("init_timing", timing)
    if made and "sweep" not in args.skip:
        check.step("sweep", lambda t: sweep(check, made, t))
    statuses = {name: step["status"] for name, step in check.summary["steps"].items()}
    check.summary["skipped_steps"] = args.skip
    check.summary["passed"] = all(status == "ok" for status in statuses.values())
    check.save()
    check.say(json.dumps(statuses))
    check.say(f"{'PASSED' if check.summary['passed'] else 'FAILED'}: summary {out / 'gpu_check.json'}")
    return 0 if check.summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
