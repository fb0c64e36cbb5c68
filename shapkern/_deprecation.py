"""Deprecated spellings, kept for one release: every use warns with a DeprecationWarning that names
the replacement (docs/api.md lists them). Nothing here imports shapkern, so every layer may use it.

- :func:`renamed_function`: an old function name that calls the new function.
- :func:`renamed_arguments`: a decorator mapping old keyword arguments to new ones.
- :func:`moved_names`: a module ``__getattr__`` serving names that moved to another module.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = ["moved_names", "renamed_arguments", "renamed_function", "warn_deprecated"]

P = ParamSpec("P")
R = TypeVar("R")


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """``DeprecationWarning: OLD is deprecated: use NEW``, attributed to the caller's caller."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_function(old: str, new: str, func: Callable[P, R]) -> Callable[P, R]:
    """``func`` under its deprecated name ``old``; ``new`` is where to find it (e.g.
    ``"shapkern.ops.pack_coalitions"``)."""

    @functools.wraps(func)
    def alias(*args: P.args, **kwargs: P.kwargs) -> R:
        warn_deprecated(old, new)
        return func(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old.rsplit(".", 1)[-1]
    alias.__doc__ = f"Deprecated name of :func:`{new}` (removed in the next release)."
    return alias


def renamed_arguments(**renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept the keyword arguments ``old=new`` under their old names, with a warning; passing both
    names is a TypeError."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        name = func.__qualname__.replace(".__init__", "")

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{name}() got {old}= and {new}=: pass only {new}= (deprecated: {old}=)")
                warn_deprecated(f"{name}({old}=...)", f"{new}=")
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper

    return decorate


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` that serves each name of ``moved`` from its new home
    (``{"pack_plan": "shapkern.packed.pack_plan"}``), warning on every access."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, _, attribute = moved[name].rpartition(".")
        warn_deprecated(f"{module}.{name}", moved[name])
        return getattr(importlib.import_module(home), attribute)

    return __getattr__
