"""One real `quailora trial` at LLaMA-30B layer shapes on CPU: each stage's seconds, memory and bytes, the
checkpoints and artifacts, before and after issue 27, and the plan's estimate beside the measured peaks.

    HF_HUB_OFFLINE=1 python benchmarks/layer_shapes_trial.py --work /tmp/layer_shapes [--out table.md]

Builds a random-init LLaMA with LLaMA-30B's decoder layers (hidden 6656, MLP 17920, 52 heads) but 2 layers
and the reference 4096-token vocabulary, saved as bf16 safetensors (~2.2 GB), then runs `quailora trial`
as a user would (the CLI, in a subprocess: Ray Train, DeepSpeed, MLflow): NF4, quailora init at rank 64
calibrated on 8 x 128 tokens, 3 training steps with a mid-run checkpoint at step 2, and the final
perplexity. It reads back what the trial logged (per stage: seconds and its own peak memory, on CPU the
worker's peak anonymous memory; per phase: init and train peaks; the worker's baseline; artifact bytes), the stage cache (entry sizes) and the
Ray Train storage (the checkpoint left), and prints:

- per stage: seconds, peak memory, bytes read (the model checkpoint for quantize and calibrate; an entry read
  back) and written (its cache entry), and the entry as the code before issue 27 wrote it (Grams: the full
  fp32 n x n matrix; now the upper triangle);
- checkpoints: the one left (the final adapter) and a mid-run one (trainable parameters, optimizer, progress),
  against what the code before wrote (DeepSpeed's save with exclude_frozen_parameters, which keeps the
  NF4 base's quantization state, two kept plus the final with its optimizer);
- artifacts: now (adapter + top-32 probe) and before (adapter + the probe's full fp32 logits);
- `quailora plan`'s estimate per phase (orchestrator.memory, accelerator bytes: a CPU worker's accelerator is
  its host memory) beside the measured peak less the worker's ``baseline_memory_mb`` (what it held before
  its first stage: runtime, libraries, tokenized data), which the estimate leaves out.

The 60-layer extrapolation scales the per-layer terms (every figure here but the embeddings is per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.footprint import checkpoint_bytes, final_checkpoint_bytes, human  # noqa: E402
from orchestrator.memory import estimate  # noqa: E402
from orchestrator.model_shapes import shape_from_config  # noqa: E402
from reference.tokenizer import load_tokenizer  # noqa: E402
from trials.cache import tree_size  # noqa: E402
from trials.config import TrialConfig  # noqa: E402
from trials.contract import BASELINE_MEMORY, STAGES, stage_peak_memory, stage_seconds  # noqa: E402

VOCAB, RANK, SEQ = 4096, 64, 128
MIB = 2**20


def build_checkpoint(out: Path, hidden: int, mlp: int, heads: int, layers: int) -> Path:
    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(VOCAB)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    for name, p in model.named_parameters():  # N(0, 0.02) weights, unit norms: a random-init checkpoint
        with torch.no_grad():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    tokenizer.save_pretrained(out)
    return out


def trial_config(checkpoint: Path) -> dict:
    return {
        "name": "layer_shapes_30b",
        "model": {"path": str(checkpoint), "dtype": "bfloat16"},
        "quant": {"method": "nf4", "bits": 4, "double_quant": True},
        "lora": {"rank": RANK, "alpha": 2 * RANK},
        "init": {"method": "quailora", "options": {"iterations": 2}},
        "calibration": {"num_sequences": 8, "seq_len": SEQ},
        "data": {"seq_len": SEQ, "max_eval_sequences": 2},
        "train": {"max_steps": 3, "batch_size": 1, "checkpoint_every": 2},
        "eval": {"perplexity": True},
    }


def entry_sizes(cache: Path) -> dict[str, int]:
    return {stage: sum(tree_size(e) for e in (cache / stage).glob("*") if not e.name.startswith("."))
            for stage in STAGES if (cache / stage).is_dir()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=6656, help="LLaMA-30B's; smaller for a quick check")
    parser.add_argument("--mlp", type=int, default=17920)
    parser.add_argument("--heads", type=int, default=52)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    checkpoint = build_checkpoint(args.work / "ckpt", args.hidden, args.mlp, args.heads, args.layers)
    print(f"checkpoint: {human(tree_size(checkpoint))} in {time.perf_counter() - began:.0f} s", flush=True)

    config_path = args.work / "trial.yaml"
    config_path.write_text(yaml.safe_dump(trial_config(checkpoint)))
    root = args.work / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "trial", str(config_path), "--root", str(root)],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - began
    if done.returncode:
        sys.exit(done.stdout[-3000:] + done.stderr[-5000:])
    metrics = json.loads(done.stdout[done.stdout.index("{") :])
    trial = TrialConfig.model_validate(trial_config(checkpoint))
    shape = shape_from_config(AutoConfig.from_pretrained(checkpoint))
    entries = entry_sizes(root / "cache")
    n_trainable = sum(RANK * (n_in + n_out) for _, n_in, n_out in shape.linears())
    grams_full = sum(4 * n * n for i in range(len(shape.linear_layers)) for n in shape.gram_inputs(i))
    quant_state = sum(
        n_in * n_out // 64 for _, n_in, n_out in shape.linears()
    )  # a byte per 64 (double quant)
    mid_now, final_now = checkpoint_bytes(trial, shape), final_checkpoint_bytes(trial, shape)
    kept = [
        path for path in root.rglob("checkpoint_*") if path.is_dir()
    ]  # not checkpoint_manager_snapshot.json
    left = tree_size(kept[0]) if kept else 0
    baseline = metrics[BASELINE_MEMORY]  # what the worker held before its first stage
    ckpt_bytes = tree_size(checkpoint)

    rows = [
        "| stage | seconds | peak memory | read | written | entry before issue 27 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    before_entry = {
        "quantize": entries.get("quantize", 0),
        "calibrate": grams_full,
        "initialize": entries.get("initialize", 0),
    }
    read = {"quantize": ckpt_bytes, "calibrate": ckpt_bytes, "initialize": entries.get("calibrate", 0)}
    for stage in STAGES:
        rows.append(f"| {stage} | {metrics[stage_seconds(stage)]:.1f} | {human(metrics[stage_peak_memory(stage)] * MIB)} | "
                    f"{human(read[stage])} | {human(entries.get(stage, 0))} | {human(before_entry[stage])} |")  # fmt: skip
    rows.append(f"| train ({trial.train.max_steps} steps) + final eval | {metrics['train_seconds']:.1f} (steps) | "
                f"{human(metrics['train_peak_memory_mb'] * MIB)} | | | |")  # fmt: skip
    storage = [
        "| what | now | before issue 27 |",
        "|---|---:|---:|",
        f"| checkpoint left by the trial | {human(left)} (formula {human(final_now)}) | "
        f"{human(2 * (mid_now + quant_state))} (two kept, each with the base's quantization state) |",
        f"| one mid-run checkpoint | {human(mid_now)} (formula) | {human(mid_now + quant_state)} |",
        f"| artifacts | {human(metrics['artifact_bytes'])} | "
        f"{human(n_trainable * 4 + 2 * SEQ * VOCAB * 4)} (adapter + full fp32 probe logits) |",
    ]
    phases = estimate(trial, shape).phases()
    measured = {"calibrate": metrics[stage_peak_memory("calibrate")], "initialize": metrics[stage_peak_memory("initialize")],
                "train": metrics["train_peak_memory_mb"], "evaluate": metrics["train_peak_memory_mb"]}  # fmt: skip
    plan = ["| phase | plan estimate | measured peak - baseline | ratio |", "|---|---:|---:|---:|"]
    for phase, est in phases.items():
        got = (measured[phase] - baseline) * MIB
        plan.append(
            f"| {phase} | {human(est)} | {human(got)} | {got / est:.2f} |" if est else f"| {phase} | 0 | | |"
        )
    layers = len(shape.linear_layers)
    scale = [
        "| figure at 60 layers (x 60 / layers, per-layer terms) | value |",
        "|---|---:|",
        f"| calibrate entry | {human(entries.get('calibrate', 0) * 60 / layers)} (before: {human(grams_full * 60 / layers)}) |",
        f"| initialize entry | {human(entries.get('initialize', 0) * 60 / layers)} |",
        f"| mid-run checkpoint | {human(mid_now * 60 / layers)} |",
        f"| final checkpoint | {human(final_now * 60 / layers)} |",
    ]
    text = "\n".join([
        f"trial wall {wall:.0f} s (`quailora trial`, Ray start-up included); worker baseline before the stages {baseline:.0f} MiB; "
        f"trainable parameters {n_trainable:,}",
        "", *rows, "", *storage, "", *plan, "", *scale,
    ])  # fmt: skip
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
