"""What every initializer takes and returns, and the helpers they share."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from quailora.errors import QuailoraInputError
from quailora.initializers.options import MethodOptions
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


Initializer = Callable[..., Initialization]  # (problem, **options): the options checked, then solved
INITIALIZERS: Registry[Initializer] = Registry("initialization method")
AdapterKind = Literal["plain", "pooled"]
Opts = TypeVar("Opts", bound=MethodOptions)


@dataclass(frozen=True)
class InitializerTraits:
    """What a method is, declared when it registers, so callers ask this and never guess from its name.

    adapter: "plain" LoRA (lora_A is r x in) or "pooled" QA-LoRA (lora_A is r x in/group_size, reads
    group-averaged inputs; the method takes a ``group_size`` option). needs_gram: the objective is weighted
    by the layer's input Gram H, so the trial calibrates. changes_base: the method moves Q (it returns
    ``Initialization.base_residual``), so the trial's quantized base is not the checkpoint's. zero_product:
    the adapter starts with B·A = 0 (QLoRA's lora_B = 0), so the model starts at Q. options: the
    method's options dataclass (quailora.initializers.options): their names, defaults and domains, and
    whether a solve with them draws random numbers.
    """

    adapter: AdapterKind = "plain"
    needs_gram: bool = False
    changes_base: bool = False
    options: type[MethodOptions] = MethodOptions
    zero_product: bool = False


TRAITS: Registry[InitializerTraits] = Registry("initialization method")


def register(
    name: str,
    *,
    options: type[Opts] = MethodOptions,
    adapter: AdapterKind = "plain",
    needs_gram: bool = False,
    changes_base: bool = False,
    zero_product: bool = False,
) -> Callable[[Callable[[InitProblem, Opts], Initialization]], Initializer]:
    """Register ``solve(problem, options)`` under ``name`` with its options dataclass and declared traits.

    What is registered (and what the decorator returns) takes the options as keywords, ``(problem, **options)``,
    and checks them (``options.parse``) before solving."""

    def deco(solve: Callable[[InitProblem, Opts], Initialization]) -> Initializer:
        TRAITS.register(name)(InitializerTraits(adapter, needs_gram, changes_base, options, zero_product))

        @functools.wraps(solve)
        def initializer(problem: InitProblem, **kwargs: Any) -> Initialization:
            return solve(problem, options.parse(kwargs, method=name, where=f"layer {problem.name}"))

        return INITIALIZERS.register(name)(initializer)

    return deco


def traits(method: str, *, where: str = "init.method") -> InitializerTraits:
    return TRAITS.get(method, where=where)


def needs_gram(method: str) -> bool:
    return traits(method).needs_gram


def changes_base(method: str) -> bool:
    return traits(method).changes_base


def zero_product(method: str) -> bool:
    return traits(method).zero_product


def adapter_kind(method: str) -> AdapterKind:
    return traits(method).adapter


def method_options(method: str, *, where: str = "init.method") -> set[str]:
    """The names of the options a method accepts."""
    return traits(method, where=where).options.names()


def draws_random_numbers(method: str, options: Mapping[str, object]) -> bool:
    """Whether the seed changes the init: the method's options class declares it (a randomized SVD draws,
    solver='exact' draws nothing; gaussian and qalora_zero always draw; a method without a seed never)."""
    return traits(method).options.draws_random_numbers(options)


def effective_init_options(method: str, options: Mapping[str, object], seed: int) -> dict[str, object]:
    """The options a method runs with, and that a cache key reads: ``seed`` (a trial's, or one layer's seed
    derived from it) where the method draws random numbers and the options set none; no seed where it draws
    none. The trial's stages, its initialize key and peft_init's per-layer options all come from here."""
    effective = dict(options)
    if draws_random_numbers(method, effective):
        effective.setdefault("seed", seed)
    else:
        effective.pop("seed", None)
    return effective


def kaiming_uniform(rank: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """peft's default lora_A (nn.init.kaiming_uniform_, a=sqrt(5): bound 1/sqrt(width)) from a seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 1.0 / math.sqrt(width)
    return torch.empty(rank, width, device=device).uniform_(-bound, bound, generator=gen)


def pooled_width(problem: InitProblem, group_size: int) -> int:
    """n / L after checking that the pooled (QA-LoRA) problem is well posed."""
    out_features, in_features = problem.weight.shape  # group_size >= 1: the method's options checked it
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
