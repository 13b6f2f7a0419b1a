"""A tiny name -> object registry, so adding a method or quantizer means adding one file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from quailora.errors import QuailoraInputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, *, where: str = "") -> T:
        try:
            return self._items[name]
        except KeyError:
            loc = f" ({where})" if where else ""
            raise QuailoraInputError(
                f"unknown {self.kind} {name!r}{loc}; registered: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
