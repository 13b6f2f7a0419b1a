"""The one-layer entry point: validate everything, then dispatch to the registered method."""

from __future__ import annotations

import torch

from quailora.errors import QuailoraInputError
from quailora.initializers import (
    INITIALIZERS,
    Initialization,
    Initializer,
    InitProblem,
    MethodOptions,
    needs_gram,
    traits,
)
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
    validate_options(method, options, where=f"layer {name}")
    fn = INITIALIZERS.get(method)
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


def validate_options(method: str, options: dict, *, where: str = "init.options") -> MethodOptions:
    """Check a method's options against its options dataclass (names, required ones, each value's domain);
    return them parsed. ``where`` prefixes every message: the layer, or the config field they came from."""
    INITIALIZERS.get(method, where=where)
    return traits(method).options.parse(options, method=method, where=where)
