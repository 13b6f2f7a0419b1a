"""Fine-tuning throughput of our trial against a bare transformers ``Trainer`` + peft QLoRA script.

    HF_HUB_OFFLINE=1 python benchmarks/trial_vs_trainer.py --model reference:llama-micro --steps 30

Both sides fine-tune the same bnb 4-bit model with the same LoRA adapter on the same token blocks, batch
size and number of optimizer steps, in this one run; each side's tokens/s counts only the time inside
its optimizer steps (forward, backward, optimizer), so loading, initialization and evaluation are left out
of both. The trial runs as it does in a sweep (Ray Train worker, DeepSpeed engine, MLflow logging).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from quailora.text import tokenize_blocks
from reference.cache import resolve_model
from trials.config import TrialConfig
from trials.sources import load_texts


class StepTimer(TrainerCallback):
    """Seconds spent inside optimizer steps: the same span the trial's tokens_per_second measures."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._began


def trainer_tokens_per_second(config: TrialConfig, checkpoint: Path, out_dir: Path) -> float:
    """The reference: the QLoRA recipe as a plain transformers + peft script would write it."""
    torch.manual_seed(config.seed)
    # Ray starts each trial worker with OMP_NUM_THREADS = its CPUs; the reference gets the same threads.
    torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    blocks = tokenize_blocks(tokenizer, load_texts(config.data.train), config.data.seq_len)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant.method,
        bnb_4bit_use_double_quant=config.quant.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=quantization, device_map={"": "cpu"}
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.lora.rank, lora_alpha=config.lora.alpha, target_modules=config.lora.target_modules
        ),
    )
    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=config.train.max_steps,
        per_device_train_batch_size=config.train.batch_size,
        gradient_accumulation_steps=config.train.grad_accum,
        learning_rate=config.train.learning_rate,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=config.seed,
    )
    dataset = [{"input_ids": ids, "labels": ids} for ids in blocks]
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer]).train()
    tokens = config.train.max_steps * config.train.grad_accum * config.train.batch_size * config.data.seq_len
    return tokens / timer.seconds


def trial_tokens_per_second(config: TrialConfig, work_dir: Path, num_cpus: int) -> float:
    import ray

    from trials.run import ensure_ray, run_trial
    from trials.tracking import default_tracking_uri

    ensure_ray(num_cpus=num_cpus)
    try:
        metrics = run_trial(
            config,
            tracking_uri=default_tracking_uri(work_dir),
            experiment_name="trial_vs_trainer",
            storage_path=str(work_dir / "ray"),
        )
    finally:
        ray.shutdown()
    return metrics["tokens_per_second"]


def benchmark_config(args: argparse.Namespace) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "name": "trial_vs_trainer",
            "model": {"path": args.model},
            "quant": {"method": "nf4", "bits": 4},
            "lora": {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"},
            "init": {"method": "gaussian"},  # initialization is outside the timed span either way
            "calibration": {"seq_len": args.seq_len},
            "data": {
                "train": args.data,
                "validation": args.validation,
                "seq_len": args.seq_len,
                "max_eval_sequences": 4,
            },  # fmt: skip
            "train": {
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "grad_accum": 1,
                "precision": "fp32",
                "checkpoint_every": 0,
                "eval_every": 0,
            },  # fmt: skip
            "eval": {"perplexity": False},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="reference:llama-micro")
    parser.add_argument("--data", default="reference:finetune-train")
    parser.add_argument("--validation", default="reference:finetune-validation")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()
    config = benchmark_config(args)
    # resolve_model is the trial's own resolver, so both sides load the very same checkpoint.
    checkpoint = resolve_model(config.model.path)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_tokens_per_second(config, checkpoint, Path(tmp) / "trainer")
        trial = trial_tokens_per_second(config, Path(tmp) / "trial", args.num_cpus)
    result = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "trainer_tokens_per_second": round(trainer, 1),
        "trial_tokens_per_second": round(trial, 1),
        "trial_over_trainer": round(trial / trainer, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
