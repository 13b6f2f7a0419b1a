"""A method's options as a frozen dataclass, declared in the method's own file: each field's name, default
(none: the option is required) and domain, and whether a solve with them draws random numbers.

Shared here: the domains, the base classes (no options; a seed; the truncated SVD's block) and the one
check every option goes through, so a typo'd solver or a negative damping fails loudly, naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, get_args

from quailora.errors import QuailoraInputError
from quailora.linalg import FactorSplit, SvdSolver, truncated_svd

if TYPE_CHECKING:
    from typing import Self

    import torch


@dataclass(frozen=True)
class Domain:
    """The values an option may take; ``text`` completes "option x=v must be ..."."""

    text: str
    check: Callable[[object], bool]


def integers_from(low: int) -> Domain:
    return Domain(
        f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low
    )


FINITE_NONNEGATIVE = Domain(
    "a finite number >= 0",
    lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
)


def one_of(choices: Any) -> Domain:
    """The values of a Literal type."""
    values = get_args(choices)
    return Domain(f"one of {list(values)}", lambda v: v in values)


def option(default: Any = MISSING, *, domain: Domain) -> Any:
    """A field of an options dataclass: its default (none: required) and the domain its values are checked in."""
    return field(default=default, metadata={"domain": domain})


def _check(f: Field, value: object, where: str) -> None:
    domain: Domain = f.metadata["domain"]  # a KeyError: a field declared without option()
    if not domain.check(value):
        raise QuailoraInputError(f"{where}: option {f.name}={value!r} must be {domain.text}")


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """A method without options, and the base of every method's options dataclass (frozen, keyword-only;
    each field an ``option()``). Built from a dict with ``parse``; every value is checked in its domain."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f, getattr(self, f.name), type(self).__name__)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}

    @classmethod
    def parse(cls, options: Mapping[str, object], *, method: str, where: str) -> Self:
        """The options of ``method`` from a dict; ``where`` (the layer, or the config field the options came
        from) prefixes every message."""
        accepted = cls.names()
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise QuailoraInputError(
                f"{where}: method {method!r} has no option(s) {unknown}; it accepts {sorted(accepted)}"
            )
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.name not in options)
        if missing:
            raise QuailoraInputError(f"{where}: method {method!r} needs option(s) {missing}")
        by_name = {f.name: f for f in fields(cls)}
        for key, value in options.items():
            _check(by_name[key], value, where)
        return cls(**options)

    @classmethod
    def draws_random_numbers(cls, options: Mapping[str, object]) -> bool:
        """Whether a solve with ``options`` (as given: unchecked, perhaps partial) draws random numbers, so
        that its seed changes the result. The randomness trait: effective_init_options reads it."""
        return False


@dataclass(frozen=True, kw_only=True)
class SeededOptions(MethodOptions):
    """A method that draws random numbers from ``seed`` (a trial fills in its own: effective_init_options)."""

    seed: int = option(0, domain=integers_from(0))

    @classmethod
    def draws_random_numbers(cls, options: Mapping[str, object]) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class SvdOptions(SeededOptions):
    """The truncated SVD's block, shared by the methods that solve one: the solver (only the randomized one
    draws from ``seed``; "auto" may pick it), its power iterations and oversampling, and how the rank-r
    product is split between lora_B and lora_A."""

    solver: SvdSolver = option("auto", domain=one_of(SvdSolver))
    niter: int = option(4, domain=integers_from(0))
    oversample: int = option(8, domain=integers_from(0))
    split: FactorSplit = option("balanced", domain=one_of(FactorSplit))

    @classmethod
    def draws_random_numbers(cls, options: Mapping[str, object]) -> bool:
        return options.get("solver", cls.solver) != "exact"

    def svd(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank-r U, S, Vh of ``x`` with these options (quailora.linalg.truncated_svd)."""
        return truncated_svd(
            x, rank, solver=self.solver, niter=self.niter, oversample=self.oversample, seed=self.seed
        )
