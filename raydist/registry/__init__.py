"""A named registry: adding an optimizer, model, dataset or strategy is one `register` call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from raydist.errors import ConfigError, closest, unknown

T = TypeVar("T")


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
        return unknown(self.kind, name, self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)


def import_object(path: str, field: str) -> Any:
    """The object a `module.path:name` import path names (a user's model factory, data loader
    or loss); ConfigError naming `field` and what went wrong."""
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's import is theirs to see
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{field}: cannot import {module_name} ({type(e).__name__}: {first}); "
                          "is it on PYTHONPATH?") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{field}: {module_name} has no attribute '{attr}'{closest(attr, names)}")
    return getattr(module, attr)


def check_arguments(fn: Callable[..., Any], args: dict[str, Any], path: str, field: str,
                    given: tuple[str, ...] = ()) -> None:
    """`fn` (the object `path` names) accepts `given` positionally and `args` by name: the
    arguments it does not take, or lacks, named before it is called."""
    import inspect

    if not callable(fn):
        raise ConfigError(f"{field.removesuffix('_args')}: {path} is not callable")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself tell
        return
    kinds = inspect.Parameter
    names = [n for n, p in params.items() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    takes = names[len(given):]
    if not any(p.kind == kinds.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in args if k not in takes]
        if unknown:
            raise ConfigError(f"{field}: {path} takes no argument {', '.join(map(repr, unknown))} "
                              f"(it takes: {', '.join(takes) or 'none'})")
    needed = [n for n in takes if params[n].default is kinds.empty and n not in args]
    if needed:
        raise ConfigError(f"{field}: {path} needs {', '.join(needed)}; give "
                          + ", ".join(f"{field}.{n}" for n in needed))
