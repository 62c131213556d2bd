"""Service definitions checked at the door: names, functions, process options, signals, the graph.

Each check raises what the design's argument rules say (``TypeError`` for a type,
``ValueError`` for a value, :class:`~parallelkit.DefinitionError` for a name or a
dependency) with a message naming the argument and saying what to do instead.
:class:`~parallelkit.Orchestrator` calls them before it registers anything, and
:func:`check_dependencies` before anything starts.
"""

from __future__ import annotations

import difflib
import inspect
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._core.check import callable_
from .._core.errors import DefinitionError
from .._graph.graph import Graph
from .lifetime import ServiceSpec

__all__ = [
    "check_dependencies",
    "process_command",
    "process_cwd",
    "process_env",
    "process_name",
    "process_needs",
    "service_function",
    "service_name_option",
    "signal_number",
    "signal_to_send",
]


def service_name_option(name: object) -> None:
    """``service(name=...)``: ``None`` or an identifier str."""
    if name is not None and not isinstance(name, str):
        msg = f"name must be a str (an identifier) or None, got {name!r}"
        raise TypeError(msg)
    if name is not None and not name.isidentifier():
        msg = f"service name must be an identifier str, got {name!r}"
        raise DefinitionError(msg)


def service_function(func: Callable[..., Any], name: str | None) -> str:
    """The name of the service ``func`` registers (``name``, else its ``__name__``).

    Raises:
        TypeError: ``func`` is not callable, or is a plain sync function.
        DefinitionError: the name is not an identifier.
    """
    callable_("service", func, what="a function (decorate it with @orch.service)")
    service_name = name if name is not None else getattr(func, "__name__", None)
    if service_name is None:  # a callable object, a functools.partial of one
        msg = (
            f"service {func!r} has no __name__ to name it by: give it one with "
            "@orch.service(name=...)"
        )
        raise DefinitionError(msg)
    if not isinstance(service_name, str) or not service_name.isidentifier():
        msg = f"service name must be an identifier str, got {service_name!r}"
        raise DefinitionError(msg)
    # a sync function is accepted only as an async context-manager factory,
    # which @asynccontextmanager (functools.wraps) reveals
    if (
        inspect.isfunction(func)
        and not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func))
        and not hasattr(func, "__wrapped__")
    ):
        msg = (
            f"service {service_name!r}: {func.__qualname__} is a sync function "
            "(what it returns is known only once it is called, too late to refuse "
            "it); write it as an async generator (set up, yield, tear down: "
            f"`async with Client() as c: yield c` for a client to enter), an async "
            "function, or an @asynccontextmanager factory"
        )
        raise TypeError(msg)
    return service_name


def process_name(name: object) -> None:
    """``process(name, ...)``: an identifier str."""
    if not isinstance(name, str):
        msg = f"name must be a str (an identifier), got {name!r}"
        raise TypeError(msg)
    if not name.isidentifier():
        msg = f"process name must be an identifier str, got {name!r}"
        raise DefinitionError(msg)


def process_command(cmd: object) -> str | list[str]:
    """``process(..., cmd)``: a non-empty shell string, or a non-empty list of str/paths."""
    if isinstance(cmd, str):
        if not cmd.strip():
            msg = "cmd must not be empty"
            raise ValueError(msg)
        _no_nul("cmd", cmd)
        return cmd
    if not isinstance(cmd, Sequence) or isinstance(cmd, (bytes, bytearray)):
        msg = f"cmd must be a shell string or a non-empty list of str, got {cmd!r}"
        raise TypeError(msg)
    if not cmd:  # the type is right, the value is not: nothing to run
        msg = f"cmd must not be empty: give the program to run, got {cmd!r}"
        raise ValueError(msg)
    for index, arg in enumerate(cmd):
        if not isinstance(arg, (str, os.PathLike)):
            msg = f"cmd[{index}] must be a str or os.PathLike, got {arg!r}"
            raise TypeError(msg)
    args = [os.fspath(a) for a in cmd]
    if not args[0].strip():
        msg = f"cmd[0] (the program) must not be empty, got {args[0]!r}"
        raise ValueError(msg)
    for index, arg in enumerate(args):
        _no_nul(f"cmd[{index}]", arg)
    return args


def _no_nul(name: str, text: str | bytes) -> None:
    """A NUL byte cannot reach a process (an argument, a variable, a path): refused here,
    naming the argument, not at spawn time as a bare "embedded null byte"."""
    if (isinstance(text, str) and "\0" in text) or (isinstance(text, bytes) and b"\0" in text):
        msg = f"{name} must not contain a NUL byte, got {text!r}"
        raise ValueError(msg)


def process_needs(depends_on: object) -> tuple[str, ...]:
    """``depends_on=``: service names, read once (a generator read twice is empty)."""
    needs = (
        tuple(depends_on)
        if isinstance(depends_on, Iterable) and not isinstance(depends_on, (str, bytes))
        else None
    )
    if needs is None or not all(isinstance(d, str) for d in needs):
        msg = f"depends_on must be a sequence of service names, got {depends_on!r}"
        raise TypeError(msg)
    return tuple(dict.fromkeys(needs))  # a name given twice is one dependency (one edge)


def process_env(env: object) -> dict[str, str] | None:
    """``env=``: a mapping of str to str (copied), or ``None``."""
    if env is None:
        return None
    if not (
        isinstance(env, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        msg = f"env must be a mapping of str to str, or None, got {env!r}"
        raise TypeError(msg)
    copy: dict[str, str] = dict(env)
    for key, value in copy.items():  # what the spawn would refuse, said here
        if not key:
            msg = "env: a variable name must not be empty"
            raise ValueError(msg)
        if "=" in key:
            msg = f"env: variable name {key!r} must not contain '='"
            raise ValueError(msg)
        _no_nul(f"env: variable name {key!r}", key)
        _no_nul(f"env: the value of {key!r}", value)
    return copy


def process_cwd(cwd: object) -> None:
    """``cwd=``: a path (str or ``os.PathLike``), or ``None``."""
    if cwd is not None and not isinstance(cwd, (str, os.PathLike)):
        msg = f"cwd must be a path (str or os.PathLike) or None, got {cwd!r}"
        raise TypeError(msg)
    if cwd is not None:
        path = os.fspath(cwd)
        if not path:  # the spawn would fail: FileNotFoundError: ''
            msg = f"cwd must not be empty (None: this process's directory), got {cwd!r}"
            raise ValueError(msg)
        _no_nul("cwd", path)


def check_dependencies(graph: Graph, specs: Mapping[str, ServiceSpec]) -> None:
    """Every parameter without a default names a service; say what to do if not."""
    names = list(specs)
    for node in graph.nodes.values():
        spec: ServiceSpec = node.data
        for param in node.params:
            if param.name in specs or param.optional:
                continue
            close = difflib.get_close_matches(param.name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if spec.kind == "process":
                msg = (
                    f"process {spec.name!r} depends on {param.name!r}, which is not a "
                    f"service of this orchestrator (services: {names}){hint}"
                )
            else:
                msg = (
                    f"service {spec.name!r} needs {param.name!r}, which is not a service "
                    f"of this orchestrator (services: {names}). Register a service named "
                    f"{param.name!r} (@orch.service or orch.process({param.name!r}, ...)), "
                    "rename the parameter to the service it means, or give it a default"
                    f"{hint}"
                )
            raise DefinitionError(msg)


_UNCATCHABLE = frozenset(
    getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)


def signal_number(name: str, value: object, *, caught: bool = True) -> signal.Signals:
    """``value`` as a signal (a bool is not one); ``caught``: one a handler can catch."""
    what = "hold signal numbers" if name == "signals" else "be a signal number"
    msg = f"{name} must {what} (signal.SIGTERM, ...), got {value!r}"
    if isinstance(value, bool):  # an int to Python (True is SIGHUP), never meant as one
        raise TypeError(msg)
    try:
        signum = signal.Signals(value)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise (TypeError if not isinstance(value, int) else ValueError)(msg) from None
    if caught and signum in _UNCATCHABLE:  # else a RuntimeError (asyncio) or OSError (trio)
        msg = f"{name}: {signum.name} cannot be caught, so it cannot stop serve(); got {value!r}"
        raise ValueError(msg)
    return signum


def signal_to_send(name: str, value: object) -> int:
    """``value`` as a signal to send: any the system has, ``SIGRTMIN + 1`` too (which
    ``signal.Signals`` does not list), SIGKILL too; a bool is not one."""
    if not isinstance(value, bool) and isinstance(value, int) and value in signal.valid_signals():
        return int(value)
    return signal_number(name, value, caught=False)
