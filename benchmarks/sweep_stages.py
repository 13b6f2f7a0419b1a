"""A 12-trial sweep with and without the shared stage cache: stage executions against trials, makespan.

    python benchmarks/sweep_stages.py [--hidden 1024 --layers 4] [--out docs/results/sweep_stages.md]

Builds a random-init LLaMA checkpoint (hidden 1024, MLP 2816, 4 layers, the reference 4096-token
tokenizer) so that quantizing, calibrating and initializing take seconds, then runs one grid sweep twice
through `quailora run`'s own code (orchestrator.runner.run), one trial at a time so the makespans compare
the work done and not how it packs on 2 cores:
  2 calibrated init methods (quailora, closed_form) x 2 ranks (8, 16) x 3 learning rates = 12 trials,
first with `share_stages: false` (every trial computes its stages privately, as before the cache), then
with a fresh shared cache. It counts, from each trial's MLflow tags, how many trials computed each stage.
Expected with the cache: 1 quantization, 1 calibration (one model, one calibration set), 4 init solves
(method x rank), everything else reused.

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
from orchestrator.tracking import child_runs  # noqa: E402
from reference.tokenizer import load_tokenizer  # noqa: E402
from trials.contract import STAGES, stage_tag  # noqa: E402

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


def sweep(checkpoint: Path, storage: Path, shared: bool) -> SweepConfig:
    return SweepConfig.model_validate({
        "name": "stages-shared" if shared else "stages-private",
        "base": {
            "model": {"path": str(checkpoint)},
            "quant": {"method": "nf4", "bits": 4},
            "lora": {"alpha": 16.0},
            "calibration": {"num_sequences": 32, "seq_len": 128},
            "data": {"seq_len": 128, "max_eval_sequences": 4},
            "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 0},
            "eval": {"perplexity": True},
            "resources": {"num_workers": 1, "cpus_per_worker": 1.9},
        },
        "space": {
            "init.method": {"grid": ["quailora", "closed_form"]},
            "lora.rank": {"grid": [8, 16]},
            "train.learning_rate": {"grid": [1e-4, 3e-4, 1e-3]},
        },
        "search": {"max_concurrent_trials": 1},
        "devices": {"memory_gb": 20},
        "storage_path": str(storage),
        "tracking_uri": f"sqlite:///{storage / 'mlflow.db'}",
        "share_stages": shared,
    })  # fmt: skip


def stage_counts(config: SweepConfig) -> tuple[int, dict[str, Counter], dict[tuple[str, str], list[float]]]:
    """Finished trials of the sweep; per stage how many trials computed / reused / skipped it; and the
    seconds the stage took in each trial, by (stage, status)."""
    from mlflow.tracking import MlflowClient

    state = ExperimentState.load(config.name, config.resolved_storage_path())
    runs = child_runs(MlflowClient(state.tracking_uri), state.parent_run_id)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    seconds: dict[tuple[str, str], list[float]] = {}
    for trial in runs:
        for stage in STAGES:
            status = trial.data.tags.get(stage_tag(stage))
            seconds.setdefault((stage, status), []).append(trial.data.metrics[f"{stage}_seconds"])
    return len(runs), {s: Counter(r.data.tags.get(stage_tag(s)) for r in runs) for s in STAGES}, seconds


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
    base = peak_memory_mb()["peak_memory_mb"]
    collect_grams(ckpt, ids, out + "/grams", batch_size=4)
    print(json.dumps({"peak_mib": peak_memory_mb()["peak_memory_mb"] - base}))
    """
)


def gram_peak_mib(checkpoint: Path, work: Path) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(checkpoint), str(work)], env=env,
                          capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


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
    for shared in (False, True):
        config = sweep(checkpoint, work / ("shared" if shared else "private"), shared)
        began = time.perf_counter()
        if run(config, address=None) != 0:
            raise SystemExit(f"sweep {config.name} had failed trials")
        makespan = time.perf_counter() - began
        trials, counts, seconds = stage_counts(config)
        rows[shared] = {"makespan_s": makespan, "trials": trials, "counts": counts, "seconds": seconds}
        print(json.dumps({"shared": shared, "makespan_s": round(makespan, 1), "trials": trials,
                          "computed": {s: c["computed"] for s, c in counts.items()}}), flush=True)  # fmt: skip

    peaks = {}
    for n in (2, 8):
        ckpt = build_checkpoint(work / f"gram{n}", args.hidden, args.mlp, n)
        peaks[n] = gram_peak_mib(ckpt, work / f"mem{n}")

    private, shared = rows[False], rows[True]
    lines = [
        "| | trials | quantizations | calibrations | init solves | makespan (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in (("private stages (no sharing)", private), ("shared stage cache", shared)):
        c = row["counts"]
        lines.append(f"| {label} | {row['trials']} | {c['quantize']['computed']} | {c['calibrate']['computed']} | "
                     f"{c['initialize']['computed']} | {row['makespan_s']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"Makespan ratio, private / shared: **{private['makespan_s'] / shared['makespan_s']:.2f}x**.",
        "",
        "Seconds a stage took in one trial (mean over the shared sweep's trials), computing it against "
        "loading the cached entry:",
        "",
        "| stage | computed | reused (load) |",
        "|---|---|---|",
    ]
    for stage in STAGES:
        by = shared["seconds"]
        computed, reused = by.get((stage, "computed"), []), by.get((stage, "reused"), [])
        if computed and reused:
            lines.append(f"| {stage} | {sum(computed) / len(computed):.2f} s (n={len(computed)}) | "
                         f"{sum(reused) / len(reused):.2f} s (n={len(reused)}) |")  # fmt: skip
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
