"""Public names show their public path: ``parallelkit.X``, ``parallelkit.redis.X``, ...

Every public module ends with ``export(globals())``: each name in its ``__all__``
that is defined in a private module (a path segment starting with ``_``) gets the
public module as its ``__module__``, so reprs, tracebacks, pickles and the API
reference show the path users import it from.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import Any

__all__ = ["export"]


def _is_private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split(".")[1:])


def export(namespace: MutableMapping[str, Any]) -> None:
    """Set ``__module__`` of the names in ``namespace["__all__"]`` to that module."""
    public = namespace["__name__"]
    for name in namespace["__all__"]:
        obj = namespace[name]
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and module.startswith("parallelkit.") and _is_private(module):
            with contextlib.suppress(AttributeError, TypeError):  # builtins, slotted aliases
                obj.__module__ = public
