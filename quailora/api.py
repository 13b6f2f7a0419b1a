"""The one-layer entry point: validate everything, then dispatch to the registered method."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import get_args

import torch

from quailora.errors import QuailoraInputError
from quailora.initializers import (
    INITIALIZERS,
    Initialization,
    Initializer,
    InitProblem,
    method_options,
    needs_gram,
)
from quailora.linalg import FactorSplit, SvdSolver
from quailora.quantizers.base import Quantizer


def initialize(
    weight: torch.Tensor,
    quantized: torch.Tensor,
    rank: int,
    method: str,
    gram: torch.Tensor | None = None,
    scaling: float = 1.0,
    *,
    name: str = "layer",
    quantizer: Quantizer | None = None,
    **options,
) -> Initialization:
    """Choose peft's (lora_A, lora_B) so that ``quantized + scaling * lora_B @ lora_A`` approximates ``weight``.

    Returns an Initialization that unpacks as ``lora_A, lora_B`` (r x in, out x r). All checks run before
    any compute; errors name the layer and the value.
    """
    fn = validate_request(weight, quantized, rank, method, gram, scaling, name=name, options=options)
    problem = InitProblem(
        weight=weight.detach().to(torch.float32),
        quantized=quantized.detach().to(device=weight.device, dtype=torch.float32),
        rank=rank,
        scaling=float(scaling),
        gram=None if gram is None else gram.detach().to(device=weight.device, dtype=torch.float32),
        name=name,
        quantizer=quantizer,
    )
    return fn(problem, **options)


def validate_request(
    weight: torch.Tensor,
    quantized: torch.Tensor,
    rank: int,
    method: str,
    gram: torch.Tensor | None,
    scaling: float,
    *,
    name: str,
    options: dict,
) -> Initializer:
    """Check one layer's request; return the initializer. Cheap: O(size of inputs), no factorization."""
    fn = validate_options(method, options, where=f"layer {name}")
    if weight.ndim != 2:
        raise QuailoraInputError(
            f"layer {name}: weight must be 2-D (out x in), got shape {tuple(weight.shape)}"
        )
    if quantized.shape != weight.shape:
        raise QuailoraInputError(
            f"layer {name}: quantized shape {tuple(quantized.shape)} != weight shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise QuailoraInputError(
            f"layer {name}: rank={rank!r} must be an integer in [1, min(out, in) = {min(out_features, in_features)}]"
        )
    if not (
        isinstance(scaling, int | float) and scaling > 0 and scaling == scaling and scaling != float("inf")
    ):
        raise QuailoraInputError(f"layer {name}: scaling={scaling!r} must be a finite positive number")
    for label, t in (("weight", weight), ("quantized", quantized)):
        if not torch.isfinite(t).all():
            raise QuailoraInputError(f"layer {name}: {label} has non-finite values (NaN or inf)")
    if gram is not None:
        if tuple(gram.shape) != (in_features, in_features):
            raise QuailoraInputError(
                f"layer {name}: gram shape {tuple(gram.shape)} must be (in, in) = ({in_features}, {in_features})"
            )
        if not torch.isfinite(gram).all():
            raise QuailoraInputError(f"layer {name}: gram has non-finite values (NaN or inf)")
    elif needs_gram(method):
        raise QuailoraInputError(f"layer {name}: method {method!r} is calibrated and needs gram= (H = XᵀX/N)")
    return fn


def _int_at_least(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _finite_nonnegative(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


# Every option any initializer takes, with its domain: a typo'd solver or a negative damping must fail
# loudly rather than silently fall back to a default branch.
OPTION_DOMAINS: dict[str, tuple[Callable[[object], bool], str]] = {
    "iterations": (_int_at_least(1), "an integer >= 1"),
    "niter": (_int_at_least(0), "an integer >= 0"),
    "oversample": (_int_at_least(0), "an integer >= 0"),
    "seed": (_int_at_least(0), "an integer >= 0"),
    "group_size": (_int_at_least(1), "an integer >= 1"),
    "damping": (_finite_nonnegative, "a finite number >= 0"),
    "tol": (_finite_nonnegative, "a finite number >= 0"),
    "solver": (lambda v: v in get_args(SvdSolver), f"one of {list(get_args(SvdSolver))}"),
    "split": (lambda v: v in get_args(FactorSplit), f"one of {list(get_args(FactorSplit))}"),
}


def validate_options(method: str, options: dict, *, where: str = "init.options") -> Initializer:
    """Check a method's options against its signature and their domains; return the initializer.

    ``where`` prefixes every message: the layer, or the config field the options came from."""
    fn = INITIALIZERS.get(method, where=where)
    accepted = method_options(fn)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise QuailoraInputError(
            f"{where}: method {method!r} has no option(s) {unknown}; it accepts {sorted(accepted)}"
        )
    missing = sorted(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is inspect.Parameter.empty
        and p.name not in options
    )
    if missing:
        raise QuailoraInputError(f"{where}: method {method!r} needs option(s) {missing}")
    for key, value in options.items():
        check, domain = OPTION_DOMAINS.get(key, (lambda v: True, ""))
        if not check(value):
            raise QuailoraInputError(f"{where}: option {key}={value!r} must be {domain}")
    return fn
