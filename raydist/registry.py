"""A named registry: adding an optimizer, model, dataset or strategy is one `register` call."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A mistake the user can fix; the message names the field or file and what was expected."""


def closest(word: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' for the nearest option, or '' when nothing is close."""
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' registered twice")
            self._items[name] = item
            return item

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: str) -> str:
        names = self.names()
        return (
            f"{self.kind}: unknown value '{name}'{closest(name, names)}; "
            f"expected one of {', '.join(names)}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)
