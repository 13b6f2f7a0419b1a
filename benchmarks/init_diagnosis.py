"""Why an init recovers what it does: validation perplexity at init next to each layer's errors, for variants
of the calibrated objective (damping, calibration size, propagation, an in-distribution Gram).

    python benchmarks/init_diagnosis.py --model reference:llama-mini --rank 32

Built for docs/results/fair_comparison.md, where the plain SVD of the quantization error recovered more of
the 4-to-8-bit gap at rank 32 on llama-mini than the calibrated methods. Every row starts from the same
NF4 model, the same adapter and the same evaluation blocks as a trial of that sweep (configs/
fair_comparison.yaml's base); the 8-bit row is the other end of the gap. Per row: validation perplexity,
the fraction of the gap it takes back, and the mean over layers of the relative weight error
‖E − sBA‖²/‖E‖² and of the relative output error tr((E − sBA)H(E − sBA)ᵀ)/tr(EHEᵀ) with H from the
validation inputs (the data the perplexity is measured on) and from the default calibration set. Then one
row per projection (q_proj, ..., down_proj): svd everywhere but quailora on that projection, to see where
the calibrated objective gains or loses perplexity. ``--variants svd`` runs only svd, quailora and those.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from quailora.architectures import ModelWeights
from quailora.base_layers import base_layer_kind
from quailora.calibration import GramStore, collect_grams
from quailora.linalg import adapter_product, calibrated_error, weight_error
from quailora.peft_init import apply_adapters, checkpoint_name, compute_adapters, lora_layer_names
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.text import perplexity, tokenize_blocks
from trials.adapters import build_adapter
from trials.config import TrialConfig
from trials.quantized_model import load_quantized_model, quantizer_for
from trials.sources import load_texts
from trials.validation import validate_trial
from trials.worker import load_data

# (label, method, options, which Gram): the Gram names are the keys of diagnose()'s sources.
VARIANTS = [
    ("svd", "svd", {}, None),
    ("quailora", "quailora", {}, "calibration"),
    ("closed_form", "closed_form", {}, "calibration"),
    ("quailora damping 0.1", "quailora", {"damping": 0.1}, "calibration"),
    ("quailora damping 1", "quailora", {"damping": 1.0}, "calibration"),
    ("quailora damping 10", "quailora", {"damping": 10.0}, "calibration"),
    ("quailora, 8x calibration (256 seq)", "quailora", {}, "calibration x8"),
    ("quailora, quantized propagation", "quailora", {}, "calibration quantized"),
    ("quailora, Gram of the validation inputs", "quailora", {}, "validation"),
]


def trial_config(model: str, rank: int, quant: dict, seq_len: int = 128) -> TrialConfig:
    """The fair-comparison sweep's base trial (configs/fair_comparison.yaml) at one model, rank and quantizer."""
    return TrialConfig.model_validate({
        "model": {"path": model, "dtype": "float32"},
        "quant": quant,
        "lora": {"rank": rank, "alpha": 16.0, "target_modules": "all-linear"},
        "init": {"method": "quailora"},
        "calibration": {"num_sequences": 32, "seq_len": seq_len},
        "data": {"seq_len": seq_len, "max_eval_sequences": 256},
    })  # fmt: skip


def adapted_model(config: TrialConfig, checkpoint: Path, targets: list[str]) -> torch.nn.Module:
    """The quantized model with the trial's zero-B adapter on every target, as a trial evaluates it."""
    model = build_adapter(
        load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")), config, targets
    )
    exact_cpu_4bit(model)
    return model


Problem = tuple[torch.Tensor, float, dict[str, torch.Tensor]]  # E = W − Q, the LoRA scaling, the Grams


def layer_problems(model, weights: ModelWeights, grams: dict[str, GramStore]) -> dict[str, Problem]:
    """Per LoRA layer, read once for every row: its quantization error, its scaling and the Grams it is scored
    under (none of the variants moves Q)."""
    modules, problems = dict(model.named_modules()), {}
    for name in lora_layer_names(model):
        base, key = modules[name].get_base_layer(), checkpoint_name(name)
        error = weights.get(f"{key}.weight").float() - base_layer_kind(base, name).dequantize(base)
        grams_of = {label: store.get(key) for label, store in grams.items()}
        problems[name] = (error, modules[name].scaling["default"], grams_of)
    return problems


def layer_errors(updates, problems: dict[str, Problem]) -> dict[str, float]:
    """Mean over layers of the relative weight error and of the relative output error under each Gram."""
    sums: dict[str, float] = defaultdict(float)
    for name, update in updates.items():
        error, scaling, grams = problems[name]
        product = adapter_product(update.lora_A, update.lora_B, scaling)
        sums["weight"] += weight_error(error, product) / weight_error(error, torch.zeros(()))
        for label, gram in grams.items():
            sums[label] += calibrated_error(error, product, gram) / calibrated_error(
                error, torch.zeros(()), gram
            )
    return {label: total / len(updates) for label, total in sums.items()}


def projection(name: str) -> str:
    """The projection a LoRA layer adapts, as the model names it (q_proj, down_proj, fc1, ...)."""
    return checkpoint_name(name).rsplit(".", 1)[-1]


def diagnose(model_path: str, rank: int, variants=VARIANTS, seq_len: int = 128) -> Iterator[dict]:
    """One row per variant, then one per projection: svd everywhere but quailora on that projection."""
    config = trial_config(model_path, rank, {"method": "nf4", "bits": 4}, seq_len)
    plan = validate_trial(config)
    data = load_data(config, plan.checkpoint)

    def val_ppl(model) -> float:
        return perplexity(model, data.validation, 8, "cpu", data.validation_labels)

    eight_bit = val_ppl(adapted_model(trial_config(model_path, rank, {"method": "int8", "bits": 8}, seq_len),
                                      plan.checkpoint, plan.target_names))  # fmt: skip
    model = adapted_model(config, plan.checkpoint, plan.target_names)
    four_bit = val_ppl(model)
    weights = ModelWeights(plan.checkpoint)
    cal = config.calibration
    texts = load_texts(cal.dataset, "calibration.dataset", cal.text_field)
    sources = {
        "validation": (data.validation, {}),
        "calibration": (data.calibration, {}),
        "calibration x8": (tokenize_blocks(data.tokenizer, texts, cal.seq_len, 8 * cal.num_sequences), {}),
        "calibration quantized": (data.calibration, {"propagate": "quantized", "quantizer": quantizer_for(config.quant)}),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        grams = {
            label: collect_grams(plan.checkpoint, ids, Path(tmp) / label.replace(" ", "_"), **kw)
            for label, (ids, kw) in sources.items()
        }
        problems = layer_problems(model, weights, {k: grams[k] for k in ("validation", "calibration")})

        def row(label: str, updates: dict) -> dict:
            apply_adapters(model, updates, weights=weights)
            ppl = val_ppl(model)
            return {"model": model_path, "rank": rank, "init": label, "val_ppl": ppl,
                    "recovers": (four_bit - ppl) / (four_bit - eight_bit), "val_ppl_8bit": eight_bit,
                    "val_ppl_nf4": four_bit, "calibration_sequences": len(data.calibration),
                    "errors": layer_errors(updates, problems)}  # fmt: skip

        solved = {}
        for label, method, options, gram in variants:
            solved[label] = compute_adapters(model, method, weights, grams.get(gram), seed=0, **options)
            yield row(label, solved[label])
        for proj in sorted({projection(n) for n in solved["svd"]}):
            mixed = {n: solved["quailora" if projection(n) == proj else "svd"][n] for n in solved["svd"]}
            yield row(f"svd; quailora on {proj}", mixed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference:llama-mini")
    parser.add_argument("--rank", type=int, default=32)
    labels = [v[0] for v in VARIANTS]
    parser.add_argument(
        "--variants", nargs="+", choices=labels, default=labels, help="svd and quailora always run"
    )
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if v[0] in {"svd", "quailora", *args.variants}]
    torch.manual_seed(0)
    print(
        "| init | val ppl | recovers | weight error | output error (validation H) | output error (calibration H) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in diagnose(args.model, args.rank, variants):
        e = r["errors"]
        print(f"| {r['init']} | {r['val_ppl']:.3f} | {r['recovers']:.0%} | {e['weight']:.3f} | "
              f"{e['validation']:.3f} | {e['calibration']:.3f} |", flush=True)  # fmt: skip
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
