"""What `quailora plan` says of a mixture-of-experts model: its total and active parameters, the Grams its
experts add, and how many experts a calibration set would leave with too few tokens.

A calibrated method solves an expert's projection with the Gram of the tokens routed to that expert; one
built from fewer tokens than its input width is singular, and the init falls back to the uncalibrated solve
for it (quailora.peft_init.too_few_tokens; the trial tags the layers). At 128 experts and 8 per token an
expert sees 1/16 of the calibration tokens, so the calibration size decides how many experts are calibrated
at all: this is the figure to read before a sweep, not after.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from orchestrator.expand import TrialMatrix
from orchestrator.model_shapes import ModelShape, expert_index, input_key
from quailora.initializers import needs_gram


def expected_fallbacks(tokens: int, experts: int, per_token: int, width: int) -> float:
    """Experts of a layer expected to get fewer than ``width`` of the ``tokens`` calibration tokens when routing
    is uniform (each token to ``per_token`` of ``experts``): experts · P(Binomial(tokens, per_token/experts) <
    width). A real router is uneven, which moves the count either way; the figure is the uniform case."""
    p = per_token / experts
    if p >= 1.0:
        return 0.0 if tokens >= width else float(experts)
    log_p, log_q = math.log(p), math.log1p(-p)
    below = sum(
        math.exp(
            math.lgamma(tokens + 1)
            - math.lgamma(i + 1)
            - math.lgamma(tokens - i + 1)
            + i * log_p
            + (tokens - i) * log_q
        )
        for i in range(min(width, tokens + 1))
    )
    return experts * min(1.0, below)


def expert_gram_widths(shape: ModelShape) -> list[int]:
    """The input widths of one routed expert's distinct Grams (gate and up read one tensor: one Gram), widest
    first."""
    widths: dict[str, int] = {}
    for name, n_in, _ in next(
        layer for layer in shape.linear_layers if any(expert_index(n) == 0 for n, _, _ in layer)
    ):
        if expert_index(name) == 0:
            widths.setdefault(input_key(name), n_in)
    return sorted(widths.values(), reverse=True)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe_experts(matrix: TrialMatrix, shape_of: Callable[[str], ModelShape]) -> list[str]:
    """One line per MoE model of the sweep (its parameters and Grams), and one per calibration size a calibrated
    trial of it uses (the experts expected to fall back); nothing for a dense sweep."""
    lines: list[str] = []
    calibrations: dict[str, set[int]] = {}
    for trial in (t for point in matrix.points for t in matrix.corner_trials(point)):
        if needs_gram(trial.init.method):
            tokens = trial.calibration.num_sequences * trial.calibration.seq_len
            calibrations.setdefault(trial.model.path, set()).add(tokens)
        else:
            calibrations.setdefault(trial.model.path, set())
    for path, sizes in calibrations.items():
        shape = shape_of(path)
        experts, per_token = shape.experts(), shape.experts_per_token
        if not experts:
            continue
        moe_layers = sum(
            1 for layer in shape.linear_layers if any(expert_index(n) is not None for n, _, _ in layer)
        )
        widths = expert_gram_widths(shape)
        lines.append(
            f"  {path}: {_billions(shape.num_parameters())} parameters, {_billions(shape.active_parameters())} "
            f"active per token ({per_token} of {experts} routed experts in {moe_layers} of {shape.layers} layers); "
            f"calibration keeps {len(widths)} Gram(s) per expert (inputs {', '.join(map(str, widths))} wide), "
            f"{len(widths) * experts} per MoE layer"
        )
        for tokens in sorted(sizes):
            share = tokens * per_token / experts
            falls = ", ".join(
                f"{expected_fallbacks(tokens, experts, per_token, w):.0f} of {experts} below {w} tokens"
                for w in widths
            )
            lines.append(
                f"    calibration of {tokens} tokens: ~{share:.0f} per expert under uniform routing; experts whose "
                f"Grams fall back to the uncalibrated solve, per MoE layer: {falls}"
            )
    return ["MoE:", *lines] if lines else []
