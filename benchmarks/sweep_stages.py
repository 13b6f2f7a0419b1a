"""A 12-trial sweep three ways: private stages, the on-demand shared cache, and sweep-level stage jobs.

    python benchmarks/sweep_stages.py [--hidden 1024 --layers 4] [--out docs/results/sweep_stages.md]

Builds a random-init LLaMA checkpoint (hidden 1024, MLP 2816, 4 layers, the reference 4096-token
tokenizer) so that quantizing, calibrating and initializing take seconds, then runs one grid sweep three
times through `quailora run`'s own code (orchestrator.runner.run), two trials at a time with one
0.9-CPU worker each (the 2-core machine's whole capacity with the drivers):
  2 calibrated init methods (quailora, closed_form) x 2 ranks (8, 16) x 3 learning rates = 12 trials,
with `share_stages: false` (every trial computes its stages privately), with the shared cache computed on
demand inside the trials (`stage_jobs: false`: the first trial of a key computes it while the others of
that key wait on its lock, holding their workers), and with the stage graph (`stage_jobs: true`: the
shared stages computed ahead by stage jobs, trials waiting for them holding no worker). It prints each
way's makespan, the seconds trials spent waiting for a stage (`stage_wait_seconds`), and how many times
each stage was computed (in trials and in stage jobs), read back from MLflow.

It also measures the Gram-collection peak memory for 8 decoder layers against 2 (each in a fresh process,
peak RSS after a warm-up), which must stay flat: one decoder layer is resident at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.experiment import ExperimentState  # noqa: E402
from orchestrator.runner import run  # noqa: E402
from orchestrator.sweep_config import SweepConfig  # noqa: E402
from orchestrator.tracking import STAGE_JOBS_ARTIFACT, child_runs  # noqa: E402
from reference.tokenizer import load_tokenizer  # noqa: E402
from trials.contract import STAGE_WAIT_SECONDS, STAGES, stage_tag  # noqa: E402

VOCAB = 4096


def build_checkpoint(out: Path, hidden: int, mlp: int, layers: int) -> Path:
    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(VOCAB)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(
        out, safe_serialization=True, max_shard_size="200MB"
    )
    tokenizer.save_pretrained(out)
    return out


WAYS = {  # name -> (share_stages, stage_jobs)
    "private stages (no sharing)": (False, False),
    "shared cache, on demand": (True, False),
    "stage graph (stage jobs ahead)": (True, True),
}


def sweep(checkpoint: Path, storage: Path, shared: bool, ahead: bool) -> SweepConfig:
    return SweepConfig.model_validate({
        "name": "stages-graph" if ahead else "stages-shared" if shared else "stages-private",
        "base": {
            "model": {"path": str(checkpoint)},
            "quant": {"method": "nf4", "bits": 4},
            "lora": {"alpha": 16.0},
            "calibration": {"num_sequences": 32, "seq_len": 128},
            "data": {"seq_len": 128, "max_eval_sequences": 4},
            "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0},
            "eval": {"perplexity": True},
            "resources": {"num_workers": 1, "cpus_per_worker": 0.9},
        },
        "space": {
            "init.method": {"grid": ["quailora", "closed_form"]},
            "lora.rank": {"grid": [8, 16]},
            "train.learning_rate": {"grid": [1e-4, 3e-4, 1e-3]},
        },
        "search": {"max_concurrent_trials": 2},
        "driver_cpus": 0.1,
        "devices": {"memory_gb": 20},
        "storage_path": str(storage),
        "tracking_uri": f"sqlite:///{storage / 'mlflow.db'}",
        "share_stages": shared,
        "stage_jobs": ahead,
    })  # fmt: skip


def stage_counts(config: SweepConfig) -> dict:
    """Finished trials of the sweep; per stage how many trials computed / precomputed / reused it and how
    many times a stage job computed it; the seconds trials waited for stages; and the seconds the stage
    took in each trial, by (stage, status)."""
    from mlflow.tracking import MlflowClient

    state = ExperimentState.load(config.name, config.resolved_storage_path())
    client = MlflowClient(state.tracking_uri)
    runs = [r for r in child_runs(client, state.parent_run_id) if r.info.status == "FINISHED"]
    seconds: dict[tuple[str, str], list[float]] = {}
    for trial in runs:
        for stage in STAGES:
            status = trial.data.tags.get(stage_tag(stage))
            seconds.setdefault((stage, status), []).append(trial.data.metrics[f"{stage}_seconds"])
    in_jobs: Counter = Counter()
    if any(a.path == STAGE_JOBS_ARTIFACT for a in client.list_artifacts(state.parent_run_id)):
        jobs = json.loads(
            Path(client.download_artifacts(state.parent_run_id, STAGE_JOBS_ARTIFACT)).read_text()
        )
        for job in jobs.values():
            for record in job.get("records", []):
                in_jobs.update(stage for stage, s in record.items() if s["status"] == "computed")
    return {
        "trials": len(runs),
        "counts": {s: Counter(r.data.tags.get(stage_tag(s)) for r in runs) for s in STAGES},
        "in_jobs": in_jobs,
        "waited_s": sum(r.data.metrics.get(STAGE_WAIT_SECONDS, 0.0) for r in runs),
        "seconds": seconds,
    }


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from quailora.calibration import collect_grams
    from quailora.peak_memory import peak_memory_mb, reset_peak_memory

    torch.set_num_threads(1)
    ckpt, out = sys.argv[1:3]
    ids = torch.randint(0, 4000, (8, 128), generator=torch.Generator().manual_seed(0))
    collect_grams(ckpt, ids[:1, :16], out + "/warmup")
    reset_peak_memory()
    base = peak_memory_mb()["peak_rss_mb"]
    collect_grams(ckpt, ids, out + "/grams", batch_size=4)
    print(json.dumps({"peak_mib": peak_memory_mb()["peak_rss_mb"] - base}))
    """
)


def gram_peak_mib(checkpoint: Path, work: Path) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(checkpoint), str(work)], env=env,
                          capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def config_dir(way: str) -> str:
    return way.split(" ")[0].lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sweep-stages-"))
    checkpoint = build_checkpoint(work / "model", args.hidden, args.mlp, args.layers)

    rows = {}
    for way, (shared, ahead) in WAYS.items():
        config = sweep(checkpoint, work / config_dir(way), shared, ahead)
        began = time.perf_counter()
        if run(config, address=None) != 0:
            raise SystemExit(f"sweep {config.name} had failed trials")
        rows[way] = {"makespan_s": time.perf_counter() - began, **stage_counts(config)}
        print(json.dumps({"way": way, "makespan_s": round(rows[way]["makespan_s"], 1), "trials": rows[way]["trials"],
                          "waited_s": round(rows[way]["waited_s"], 1),
                          "computed": {s: c["computed"] for s, c in rows[way]["counts"].items()},
                          "in_jobs": dict(rows[way]["in_jobs"])}), flush=True)  # fmt: skip

    peaks = {}
    for n in (2, 8):
        ckpt = build_checkpoint(work / f"gram{n}", args.hidden, args.mlp, n)
        peaks[n] = gram_peak_mib(ckpt, work / f"mem{n}")

    lines = [
        "| | trials | quantizations | calibrations | init solves | seconds trials waited for a stage | makespan (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for way, row in rows.items():
        c, jobs = row["counts"], row["in_jobs"]
        done = {
            s: f"{c[s]['computed'] + jobs[s]}" + (f" ({jobs[s]} in stage jobs)" if jobs[s] else "")
            for s in STAGES
        }
        lines.append(f"| {way} | {row['trials']} | {done['quantize']} | {done['calibrate']} | "
                     f"{done['initialize']} | {row['waited_s']:.0f} | {row['makespan_s']:.0f} |")  # fmt: skip
    private, demand, graph = (rows[way]["makespan_s"] for way in WAYS)
    lines += [
        "",
        f"Makespan ratios: private / on-demand **{private / demand:.2f}x**, on-demand / stage graph "
        f"**{demand / graph:.2f}x**.",
    ]
    lines += [
        "",
        f"Gram-collection peak RSS growth (hidden {args.hidden}, 8 x 128 calibration tokens): "
        f"2 layers {peaks[2]:.0f} MiB, 8 layers {peaks[8]:.0f} MiB, ratio **{peaks[8] / peaks[2]:.2f}x**.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
