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

Each row is also scored against the full-precision model: per evaluation block (one seq_len sequence), the
token-mean KL(p_fp ‖ p_row) in fp32 on the sweep's validation split and on the pretraining-domain validation
split (reference:pretrain-validation), and the fraction of NF4's KL it takes back, 1 − KL/KL_NF4. Every
"recovers" figure comes with a 95 % paired bootstrap interval over the blocks (paired_bootstrap: the same
resampled block indices for the row, NF4 and 8-bit; 2000 resamples, seed 0). ``--no-projections`` leaves
out the per-projection rows (``--variants svd --no-projections``: svd and quailora only, the cheapest run).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from quailora.architectures import ModelWeights
from quailora.base_layers import base_layer_kind
from quailora.calibration import GramStore, collect_grams
from quailora.linalg import adapter_product, calibrated_error, weight_error
from quailora.peft_init import apply_adapters, checkpoint_name, compute_adapters, lora_layer_names
from quailora.quantizers.bnb.layers import exact_cpu_4bit
from quailora.text import IGNORE_INDEX, tokenize_blocks
from trials.adapters import build_adapter
from trials.config import TrialConfig
from trials.quantized_model import load_quantized_model, quantizer_for
from trials.sources import load_texts, token_blocks
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


def trial_config(
    model: str, rank: int, quant: dict, seq_len: int = 128, eval_blocks: int = 256
) -> TrialConfig:
    """The fair-comparison sweep's base trial (configs/fair_comparison.yaml) at one model, rank and quantizer;
    ``eval_blocks`` caps each evaluation set (the sweep's 256; fewer only to keep the test fast)."""
    return TrialConfig.model_validate({
        "model": {"path": model, "dtype": "float32"},
        "quant": quant,
        "lora": {"rank": rank, "alpha": 16.0, "target_modules": "all-linear"},
        "init": {"method": "quailora"},
        "calibration": {"num_sequences": 32, "seq_len": seq_len},
        "data": {"seq_len": seq_len, "max_eval_sequences": eval_blocks},
    })  # fmt: skip


def adapted_model(config: TrialConfig, checkpoint: Path, targets: list[str]) -> torch.nn.Module:
    """The quantized model with the trial's zero-B adapter on every target, as a trial evaluates it."""
    model = build_adapter(
        load_quantized_model(checkpoint, config, torch.float32, torch.device("cpu")), config, targets
    )
    exact_cpu_4bit(model)
    return model


PRETRAINING_VALIDATION = "reference:pretrain-validation"
RESAMPLES = 2000


@torch.no_grad()
def log_probs(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(blocks, seq_len − 1, V) fp32 next-token log-probabilities of ``model`` (the full-precision reference,
    computed once and kept: 0.5 GB for 256 blocks of 128 tokens at V = 4096)."""
    model.eval()
    return torch.cat([F.log_softmax(model(input_ids=ids[i : i + batch_size]).logits[:, :-1].float(), dim=-1)
                      for i in range(0, len(ids), batch_size)])  # fmt: skip


@torch.no_grad()
def block_scores(
    model: torch.nn.Module, log_p: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """(blocks, 3) float64, per evaluation block (row of ``ids``): the summed next-token NLL of ``model``, the
    summed KL(p ‖ q) of the reference's log-probabilities ``log_p`` (log_probs) to the model's over the same
    positions (fp32 log-softmax, Σ p (log p − log q)) and the number of scored positions (labels not
    IGNORE_INDEX), so that sums over any set of blocks give its perplexity and token-mean KL."""
    model.eval()
    scores = torch.zeros(len(ids), 3, dtype=torch.float64)
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        targets = labels[rows, 1:]
        scored = targets != IGNORE_INDEX
        log_q = F.log_softmax(model(input_ids=ids[rows]).logits[:, :-1].float(), dim=-1)
        nll = -log_q.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        kl = (log_p[rows].exp() * (log_p[rows] - log_q)).sum(-1)
        scores[rows, 0] = (nll * scored).sum(1).double()
        scores[rows, 1] = (kl * scored).sum(1).double()
        scores[rows, 2] = scored.sum(1).double()
    return scores


def paired_bootstrap(
    blocks: torch.Tensor,
    statistic: Callable[[torch.Tensor], torch.Tensor],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``statistic`` of the column sums of ``blocks`` (evaluation blocks x per-block sums, every arm's columns
    side by side) and its percentile ``level`` interval: the blocks resampled with replacement ``resamples``
    times, one draw of indices for all columns, so the arms stay paired. ``statistic`` maps (..., columns)
    sums to (...). NaN bounds where some resample leaves the statistic infinite or undefined (a zero gap)."""
    blocks = blocks.double()
    n = len(blocks)
    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(draws.shape).double()
    )
    values = statistic(counts @ blocks)
    if not torch.isfinite(values).all():
        return float(statistic(blocks.sum(0))), math.nan, math.nan
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(statistic(blocks.sum(0))), low, high


def ppl_recovered(sums: torch.Tensor) -> torch.Tensor:
    """Columns: NLL of the row, of NF4, of 8-bit, scored tokens. (ppl_NF4 − ppl) / (ppl_NF4 − ppl_8bit)."""
    ppl = torch.exp(sums[..., :3] / sums[..., 3:])
    return (ppl[..., 1] - ppl[..., 0]) / (ppl[..., 1] - ppl[..., 2])


def kl_recovered(sums: torch.Tensor) -> torch.Tensor:
    """Columns: KL (to full precision) of the row, of NF4. 1 − KL / KL_NF4."""
    return 1 - sums[..., 0] / sums[..., 1]


def summary(scores: torch.Tensor) -> dict[str, float]:
    """Perplexity and token-mean KL of a set of blocks' scores."""
    nll, kl, tokens = scores.sum(0).tolist()
    return {"ppl": math.exp(nll / tokens), "kl": kl / tokens}


def recoveries(scores: torch.Tensor, nf4: torch.Tensor, eight_bit: torch.Tensor) -> dict[str, list[float]]:
    """[point, low, high] of the perplexity gap (NF4 to 8-bit) and of NF4's KL that a row takes back."""
    ppl = torch.stack([scores[:, 0], nf4[:, 0], eight_bit[:, 0], scores[:, 2]], dim=1)
    kl = torch.stack([scores[:, 1], nf4[:, 1]], dim=1)
    return {"ppl": list(paired_bootstrap(ppl, ppl_recovered)), "kl": list(paired_bootstrap(kl, kl_recovered))}


def minus_svd(scores, svd, nf4, eight_bit) -> dict[str, list[float]]:
    """[point, low, high] of a row's recovered fractions minus svd's, paired over the same resampled blocks."""
    ppl = torch.stack([scores[:, 0], svd[:, 0], nf4[:, 0], eight_bit[:, 0], scores[:, 2]], dim=1)
    kl = torch.stack([scores[:, 1], svd[:, 1], nf4[:, 1]], dim=1)
    return {
        "ppl": list(
            paired_bootstrap(ppl, lambda t: ppl_recovered(t[..., [0, 2, 3, 4]]) - ppl_recovered(t[..., 1:]))
        ),
        "kl": list(paired_bootstrap(kl, lambda t: kl_recovered(t[..., [0, 2]]) - kl_recovered(t[..., 1:]))),
    }


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


def diagnose(
    model_path: str,
    rank: int,
    variants=VARIANTS,
    seq_len: int = 128,
    projections: bool = True,
    eval_blocks: int = 256,
) -> Iterator[dict]:
    """One row per variant, then (``projections``) one per projection: svd everywhere but quailora on that
    projection."""
    config = trial_config(model_path, rank, {"method": "nf4", "bits": 4}, seq_len, eval_blocks)
    plan = validate_trial(config)
    data = load_data(config, plan.checkpoint)
    pretraining = token_blocks(data.tokenizer, PRETRAINING_VALIDATION, seq_len, field="pretraining validation",
                               max_blocks=config.data.max_eval_sequences)  # fmt: skip
    eval_sets = {"validation": (data.validation, data.validation_labels), "pretraining": pretraining}
    full = AutoModelForCausalLM.from_pretrained(plan.checkpoint, dtype=torch.float32)
    full_log_probs = {name: log_probs(full, ids) for name, (ids, _) in eval_sets.items()}

    def scored(model) -> dict[str, torch.Tensor]:
        return {name: block_scores(model, full_log_probs[name], ids, labels)
                for name, (ids, labels) in eval_sets.items()}  # fmt: skip

    eight_bit = scored(adapted_model(trial_config(model_path, rank, {"method": "int8", "bits": 8}, seq_len, eval_blocks),
                                     plan.checkpoint, plan.target_names))  # fmt: skip
    model = adapted_model(config, plan.checkpoint, plan.target_names)
    four_bit, full_precision = scored(model), scored(full)
    references = {name: {"full precision": summary(full_precision[name]), "8-bit": summary(eight_bit[name]),
                         "NF4": summary(four_bit[name]), "blocks": len(four_bit[name])}
                  for name in eval_sets}  # fmt: skip
    weights = ModelWeights(plan.checkpoint)
    cal = config.calibration
    texts = load_texts(cal.dataset, "calibration.dataset", cal.text_field)
    needed = {"validation", "calibration", *(gram for *_, gram in variants)}
    sources = {
        "validation": lambda: (data.validation, {}),
        "calibration": lambda: (data.calibration, {}),
        "calibration x8": lambda: (tokenize_blocks(data.tokenizer, texts, cal.seq_len, 8 * cal.num_sequences), {}),
        "calibration quantized": lambda: (data.calibration, {"propagate": "quantized", "quantizer": quantizer_for(config.quant)}),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        grams = {}
        for label, source in sources.items():
            if label in needed:
                ids, kw = source()
                grams[label] = collect_grams(plan.checkpoint, ids, Path(tmp) / label.replace(" ", "_"), **kw)
        problems = layer_problems(model, weights, {k: grams[k] for k in ("validation", "calibration")})

        def row(label: str, updates: dict) -> dict:
            started = time.monotonic()
            apply_adapters(model, updates, weights=weights)
            scores = scored(model)
            svd = svd_scores.setdefault("svd", scores)  # the first row is svd's
            sets = {name: {**summary(s), "recovers": recoveries(s, four_bit[name], eight_bit[name]),
                           "minus_svd": minus_svd(s, svd[name], four_bit[name], eight_bit[name])}
                    for name, s in scores.items()}  # fmt: skip
            val = sets["validation"]
            return {"model": model_path, "rank": rank, "init": label, "val_ppl": val["ppl"],
                    "recovers": val["recovers"]["ppl"][0], "val_ppl_8bit": references["validation"]["8-bit"]["ppl"],
                    "val_ppl_nf4": references["validation"]["NF4"]["ppl"], "calibration_sequences": len(data.calibration),
                    "errors": layer_errors(updates, problems), "sets": sets, "references": references,
                    "scoring_seconds": time.monotonic() - started}  # fmt: skip

        solved, svd_scores = {}, {}
        for label, method, options, gram in variants:
            solved[label] = compute_adapters(model, method, weights, grams.get(gram), seed=0, **options)
            yield row(label, solved[label])
        for proj in sorted({projection(n) for n in solved["svd"]} if projections else ()):
            mixed = {n: solved["quailora" if projection(n) == proj else "svd"][n] for n in solved["svd"]}
            yield row(f"svd; quailora on {proj}", mixed)


def interval(recovered: list[float], unit: str = " %") -> str:
    """80 % [75, 85]"""
    point, low, high = (100 * v for v in recovered)
    return f"{point:.0f}{unit} [{low:.0f}, {high:.0f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference:llama-mini")
    parser.add_argument("--rank", type=int, default=32)
    labels = [v[0] for v in VARIANTS]
    parser.add_argument(
        "--variants", nargs="+", choices=labels, default=labels, help="svd and quailora always run"
    )
    parser.add_argument(
        "--no-projections", action="store_true", help="skip the rows of svd with quailora on one projection"
    )
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if v[0] in {"svd", "quailora", *args.variants}]
    torch.manual_seed(0)
    for i, r in enumerate(diagnose(args.model, args.rank, variants, projections=not args.no_projections)):
        if i == 0:
            print("| evaluation set (blocks) | ppl full precision | 8-bit | NF4 | KL 8-bit | KL NF4 |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, ref in r["references"].items():
                fp, eight, nf4 = ref["full precision"], ref["8-bit"], ref["NF4"]
                print(f"| {name} ({ref['blocks']}) | {fp['ppl']:.3f} | {eight['ppl']:.3f} | {nf4['ppl']:.3f} | "
                      f"{eight['kl']:.5f} | {nf4['kl']:.5f} |")  # fmt: skip
            print()
            print("| init | val ppl | recovers | KL, validation | recovers | KL, pretraining | recovers | "
                  "minus svd (points): val ppl, KL pretraining | "
                  "weight error | output error (validation H) | output error (calibration H) |")  # fmt: skip
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        e, val, pre = r["errors"], r["sets"]["validation"], r["sets"]["pretraining"]
        print(f"| {r['init']} | {r['val_ppl']:.3f} | {interval(val['recovers']['ppl'])} | {val['kl']:.5f} | "
              f"{interval(val['recovers']['kl'])} | {pre['kl']:.5f} | {interval(pre['recovers']['kl'])} | "
              f"{interval(val['minus_svd']['ppl'], '')}, {interval(pre['minus_svd']['kl'], '')} | "
              f"{e['weight']:.3f} | {e['validation']:.3f} | {e['calibration']:.3f} |", flush=True)  # fmt: skip
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
