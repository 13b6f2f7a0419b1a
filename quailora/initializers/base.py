"""What every initializer takes and returns, and the helpers they share."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from quailora.errors import QuailoraInputError
from quailora.registry import Registry

if TYPE_CHECKING:
    import torch

    from quailora.quantizers.base import Quantizer  # (the quantizers package imports bitsandbytes)
else:  # the method registry is read without running a method (see quailora.deferred)
    from quailora.deferred import torch


@dataclass
class InitProblem:
    """One layer's initialization problem. All tensors float32 on one device.

    weight: full-precision W (out x in); quantized: Q = dequant(quant(W)); gram: H = XᵀX/N (in x in)
    or None; scaling: peft's s (lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA).
    """

    weight: torch.Tensor
    quantized: torch.Tensor
    rank: int
    scaling: float = 1.0
    gram: torch.Tensor | None = None
    name: str = "layer"
    quantizer: Quantizer | None = None  # needed by methods that re-quantize (loftq)

    @property
    def error(self) -> torch.Tensor:
        return self.weight - self.quantized


@dataclass
class Initialization:
    """peft's parameters for one layer. Unpacks as ``lora_A, lora_B``.

    quantized: the base weight the adapter goes with (differs from the input only for methods that
    change Q, e.g. loftq); history: the method's objective per iteration, if it iterates.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    quantized: torch.Tensor
    history: list[float] = field(default_factory=list)
    # Set by methods that move Q: thin factors (L, R) with quantized = quant(W − L·R) bit-exactly, so any
    # process holding W rebuilds the quantized base layer with its own quantizer; nothing W-sized travels.
    base_residual: tuple[torch.Tensor, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.lora_A, self.lora_B))


def rebuilt_base(weight: torch.Tensor, residual: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """W − L·R: the full-precision tensor whose quantization is a base-changing method's Q."""
    left, right = residual
    return weight - left.to(weight.device) @ right.to(weight.device)


Initializer = Callable[..., Initialization]
INITIALIZERS: Registry[Initializer] = Registry("initialization method")
AdapterKind = Literal["plain", "pooled"]


@dataclass(frozen=True)
class InitializerTraits:
    """What a method is, declared when it registers, so callers ask this and never guess from its name.

    adapter: "plain" LoRA (lora_A is r x in) or "pooled" QA-LoRA (lora_A is r x in/group_size, reads
    group-averaged inputs; the method takes a ``group_size`` option). needs_gram: the objective is weighted
    by the layer's input Gram H, so the trial calibrates. changes_base: the method moves Q (it returns
    ``Initialization.base_residual``), so the trial's quantized base is not the checkpoint's.
    """

    adapter: AdapterKind = "plain"
    needs_gram: bool = False
    changes_base: bool = False


TRAITS: Registry[InitializerTraits] = Registry("initialization method")


def register(
    name: str, *, adapter: AdapterKind = "plain", needs_gram: bool = False, changes_base: bool = False
) -> Callable[[Initializer], Initializer]:
    """Register an initializer under ``name`` together with its declared traits."""

    def deco(fn: Initializer) -> Initializer:
        TRAITS.register(name)(InitializerTraits(adapter, needs_gram, changes_base))
        return INITIALIZERS.register(name)(fn)

    return deco


def traits(method: str) -> InitializerTraits:
    return TRAITS.get(method, where="init.method")


def needs_gram(method: str) -> bool:
    return traits(method).needs_gram


def changes_base(method: str) -> bool:
    return traits(method).changes_base


def adapter_kind(method: str) -> AdapterKind:
    return traits(method).adapter


def method_options(fn: Initializer) -> set[str]:
    """The keyword-only options an initializer accepts."""
    return {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def draws_random_numbers(method: str, options: dict) -> bool:
    """Whether the seed changes the init: a method with a solver option draws only in the randomized SVD
    (solver='exact' draws nothing); a seeded method without one (gaussian, qalora_zero) always draws."""
    accepted = method_options(INITIALIZERS.get(method, where="init.method"))
    if "seed" not in accepted:
        return False
    return "solver" not in accepted or options.get("solver", "auto") != "exact"


def kaiming_uniform(rank: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """peft's default lora_A (nn.init.kaiming_uniform_, a=sqrt(5): bound 1/sqrt(width)) from a seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 1.0 / math.sqrt(width)
    return torch.empty(rank, width, device=device).uniform_(-bound, bound, generator=gen)


def pooled_width(problem: InitProblem, group_size: int) -> int:
    """n / L after checking that the pooled (QA-LoRA) problem is well posed."""
    out_features, in_features = problem.weight.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise QuailoraInputError(
            f"layer {problem.name}: group_size={group_size!r} must be a positive integer"
        )
    if in_features % group_size:
        raise QuailoraInputError(
            f"layer {problem.name}: in_features={in_features} is not divisible by group_size={group_size}"
        )
    quant_group = getattr(problem.quantizer, "group_size", None)
    if quant_group is not None and group_size % quant_group:
        raise QuailoraInputError(
            f"layer {problem.name}: group_size={group_size} must be a multiple of the quantizer's "
            f"group_size={quant_group}, or the update cannot merge into the zero points"
        )
    width = in_features // group_size
    if problem.rank > min(out_features, width):
        raise QuailoraInputError(
            f"layer {problem.name}: rank={problem.rank} exceeds min(out={out_features}, in/group_size={width})"
        )
    return width
