"""A failed Taskiq result as the exception the producer raises: the worker's own
type where it can be rebuilt, its traceback as ``__cause__``."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import reprlib
import sys
from types import ModuleType
from typing import Any

from taskiq.result import TaskiqResult
from taskiq.serialization import create_exception_cls

from ._middlewares import LABEL_ERROR_GROUP, LABEL_ERROR_TYPE, LABEL_TRACEBACK, RemoteTraceback

__all__ = ["remote_error", "shown"]

#: an item as error messages show it: bounded (an item may be a large dict), and never
#: failing (a repr that raises, as a detached ORM object's may, is shown by its type)
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 160


def shown(item: object) -> str:
    """``item`` as an error message shows it (see :data:`_SHORT`)."""
    return _SHORT.repr(item)


def remote_error(result: TaskiqResult[Any], task_id: str, name: str) -> Exception:
    """The exception to raise for a failed result: the original type where it can be
    rebuilt, the worker's traceback as ``__cause__``, a note naming the task.

    A worker-side ``BaseException`` that is not an ``Exception`` (a ``CancelledError``
    when the worker shut down mid-task, ``SystemExit``) is never re-raised as such in
    the producer, where it would pass for *our* cancellation or exit: it becomes a
    ``RuntimeError`` naming it.
    """
    error = result.error
    assert error is not None
    error = _original_type(error, result)
    group = result.labels.get(LABEL_ERROR_GROUP)
    if isinstance(group, dict):  # Taskiq sent the group's members as text
        error = _group(group) or error
    if not isinstance(error, Exception):
        msg = f"Taskiq task {name} [{task_id}] was interrupted in the worker: {error!r}"
        error = RuntimeError(msg)
    text = result.labels.get(LABEL_TRACEBACK)
    where = f"raised by Taskiq task {name} [{task_id}] in a worker"
    if isinstance(text, str):
        error.__cause__ = RemoteTraceback(text, task_id, name)
        note = f"{where}; its traceback is the __cause__ above"
    else:
        note = f"{where} (add parallelkit.taskiq.TracebackMiddleware to see its traceback)"
    if sys.version_info >= (3, 11):
        error.add_note(note)
    return error


def _original_type(error: BaseException, result: TaskiqResult[Any]) -> BaseException:
    """Taskiq rebuilds an exception whose module the producer has not imported as a
    stand-in class; import the real one (named by TracebackMiddleware) if we can."""
    spec = result.labels.get(LABEL_ERROR_TYPE)
    if not isinstance(spec, str) or ":" not in spec:
        return error
    if f"{type(error).__module__}:{type(error).__qualname__}" == spec:
        return error
    if type(error) is Exception:
        # Taskiq found the type but its constructor refused the arguments: its
        # fallback's one argument is a message naming them, no argument of the type
        return error
    try:
        cls = _exception_type(spec)
        if cls is not None:
            return cls(*error.args)
    except Exception:  # keep Taskiq's stand-in when the type cannot be rebuilt
        pass
    return error


def _exception_type(spec: str) -> type[BaseException] | None:
    """The exception type named ``"module:qualname"``, its module imported if need
    be; ``None`` when that is no exception type (an error if it cannot be found)."""
    module_name, _, qualname = spec.partition(":")
    obj: Any = _module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def _group(described: dict[str, Any]) -> BaseException | None:
    """An exception group rebuilt from ``TracebackMiddleware``'s description, its
    members too (``except* KeyError`` matches as in the worker); ``None`` when the
    group itself cannot be. A member that cannot be rebuilt is Taskiq's stand-in: a
    class of its name in ``taskiq.exceptions`` holding its arguments."""
    try:
        cls = _exception_type(str(described["type"]))
        members = [_member(member) for member in described["group"]]
        return None if cls is None else cls(described["args"][0], members)
    except Exception:  # (a description this version cannot read: Taskiq's stand-in)
        return None


def _member(described: dict[str, Any]) -> BaseException:
    if "group" in described:
        group = _group(described)
        if group is not None:
            return group
    args = described.get("args", [])
    spec = str(described.get("type", ""))
    try:
        cls = _exception_type(spec)
        if cls is not None:
            return cls(*args)
    except Exception:  # (a type that cannot be rebuilt: the stand-in below)
        pass
    name = spec.rpartition(":")[2].rpartition(".")[2] or "Exception"
    return create_exception_cls(name, "taskiq.exceptions")(*args)


def _module(name: str) -> ModuleType:
    """The module ``name``, imported if need be; the producer's ``__main__`` when that
    is the same file (``python detect.py``, while the workers import ``detect``):
    importing it again would run the script's top level twice and make classes
    that ``except`` clauses of ``__main__`` do not match."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    main = sys.modules.get("__main__")
    if main is not None:
        if getattr(getattr(main, "__spec__", None), "name", None) == name:  # python -m name
            return main
        main_file = getattr(main, "__file__", None)
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        with contextlib.suppress(OSError):  # (a file that is not there: not the same)
            if main_file and origin and os.path.samefile(origin, main_file):
                return main
    return importlib.import_module(name)
