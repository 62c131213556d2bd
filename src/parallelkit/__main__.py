"""Command line: ``python -m parallelkit run module:orch [--timeline] [--backend trio]``.

Serves a :class:`~parallelkit.Orchestrator` defined in your code, the way
``honcho start`` runs a Procfile, but with dependencies, readiness probes and an
ordered stop: the seed's "dev server + watchers" workflow as one command. Stops
on SIGINT / SIGTERM; a second one makes every stop immediate (tear-downs
cancelled, processes killed), still in order.

Exit codes: ``0`` after a signal-initiated stop, ``130`` for a Ctrl-C that came before
the orchestrator took over the signals (while the target was imported or the event
loop started: nothing was serving yet), ``1`` when a service failed to
start or crashed (its error's traceback is printed; for a process that exited,
one report: its exit code and last lines of output) or the target's own module
or factory raised (its traceback is printed), ``2`` for a usage error (a
malformed target, a module or attribute that does not exist, something that is
not an Orchestrator nor a factory of one, a factory that is async or needs
arguments, a bad option).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

import anyio

from ._core.errors import ProcessError, StartupError
from ._orchestrator.orchestrator import Orchestrator
from ._orchestrator.running import Running

__all__ = ["main"]


_MISSING = object()


def _plain(doc: str) -> str:
    """``--help`` shows the docstring as plain text: no ``literal`` nor :role:`target` markup."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


class UsageError(Exception):
    """The target names no Orchestrator (exit code 2, with the usage)."""


def load(target: str) -> Orchestrator:
    """Import ``module:attribute`` (the attribute may be an Orchestrator or a factory).

    Raises:
        UsageError: the target is malformed, its module or attribute does not exist,
            or it is not an Orchestrator (nor a factory of one: a plain function
            called with no arguments; an async one, or one that needs arguments, is
            refused before it is called).
        Exception: whatever the user's module or factory raised (not a usage error:
            its traceback is shown).
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        msg = f"expected 'module:attribute', got {target!r}"
        raise UsageError(msg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # the target's own module (or a package of it) is missing: a usage error; a
        # module that the target imports is missing: the target's own error
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(f"{missing}.")):
            msg = f"no module named {missing!r}"
            raise UsageError(msg) from None
        raise
    for part in attribute.split("."):
        found = getattr(obj, part, _MISSING)
        if found is _MISSING:
            msg = f"{type(obj).__name__} {getattr(obj, '__name__', obj)!r} has no {part!r}"
            raise UsageError(msg)
        obj = found
    if not isinstance(obj, Orchestrator) and callable(obj):
        _check_factory(target, obj)
        obj = obj()  # a factory: what it raises is its own error
        if inspect.iscoroutine(obj):
            obj.close()  # never awaited: no "coroutine ... was never awaited" warning
            msg = f"{target!r} returned a coroutine; {_FACTORY}"
            raise UsageError(msg)
    if not isinstance(obj, Orchestrator):
        msg = f"{target!r} is {type(obj).__name__}, not a parallelkit.Orchestrator"
        raise UsageError(msg)
    return obj


_FACTORY = "name an Orchestrator, or a plain (not async) function of no arguments that returns one"


def _check_factory(target: str, factory: object) -> None:
    """A usage error for a callable that cannot be called as ``factory()``."""
    if inspect.iscoroutinefunction(factory) or inspect.isasyncgenfunction(factory):
        msg = f"{target!r} is an async function; {_FACTORY}"
        raise UsageError(msg)
    try:
        signature = inspect.signature(factory)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature to read (some builtins): just call it
        return
    try:
        signature.bind()
    except TypeError:
        params = ", ".join(
            name
            for name, param in signature.parameters.items()
            if param.default is param.empty
            and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        )
        msg = f"{target!r} takes arguments ({params}); {_FACTORY}"
        raise UsageError(msg) from None


def _log_level(value: str) -> int | str:
    """``--log-level``: a level name (any case) or number."""
    if value.isdigit():
        return int(value)
    name = value.upper()
    if not isinstance(logging.getLevelName(name), int):
        msg = f"unknown level {value!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL or a number)"
        raise argparse.ArgumentTypeError(msg)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m parallelkit``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m parallelkit",
        description=_plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve an Orchestrator until SIGINT/SIGTERM")
    run.add_argument("target", help="module:attribute of an Orchestrator (or a factory)")
    run.add_argument("--timeline", action="store_true", help="print the start-up timeline")
    run.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop (asyncio)"
    )
    run.add_argument(
        "--log-level", type=_log_level, default="INFO", help="logging level (default INFO)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return _serve(args.target, args.timeline, args.backend, parser)
    except KeyboardInterrupt:  # before serve() took over SIGINT: nothing was serving yet
        print("parallelkit: interrupted", file=sys.stderr)
        return 130


def _serve(target: str, timeline: bool, backend: str, parser: argparse.ArgumentParser) -> int:
    try:
        orch = load(target)
    except UsageError as exc:
        parser.error(f"cannot load {target!r}: {exc}")
    except Exception:  # the target's own code failed (an import inside it, its factory)
        traceback.print_exc()
        return 1

    def ready(running: Running) -> None:
        if timeline:
            print(running.timeline.to_text(), file=sys.stderr)
        total = running.timeline.total * 1000
        print(f"parallelkit: {len(running)} services ready in {total:.1f} ms", file=sys.stderr)
        sys.stderr.flush()

    try:
        anyio.run(lambda: orch.serve(on_ready=ready), backend=backend)
    except StartupError as exc:
        traceback.print_exception(exc)
        return 1
    except ProcessError as exc:  # a crashed process: its code and output say it all
        print(f"parallelkit: {exc}", file=sys.stderr)  # (a traceback would show only ours)
        return 1
    except Exception:  # a crashed service: its own error
        traceback.print_exc()
        return 1
    print("parallelkit: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
