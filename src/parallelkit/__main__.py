"""Command line: ``python -m parallelkit run module:orch [--timeline] [--backend trio]``.

Serves an :class:`~parallelkit.Orchestrator` defined in your code, the way
``honcho start`` runs a Procfile, but with dependencies, readiness probes and an
ordered stop: the seed's "dev server + watchers" workflow as one command. Stops
on SIGINT / SIGTERM (a second one forces it).

Exit codes: ``0`` after a signal-initiated stop, ``1`` when a service failed to
start or crashed, ``2`` for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import anyio

from ._core.errors import StartupError
from ._orchestrator.orchestrator import Orchestrator
from ._orchestrator.running import Running

__all__ = ["main"]


def load(target: str) -> Orchestrator:
    """Import ``module:attribute`` (the attribute may be an Orchestrator or a factory)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        msg = f"expected 'module:attribute', got {target!r}"
        raise ValueError(msg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Orchestrator) and callable(obj):
        obj = obj()
    if not isinstance(obj, Orchestrator):
        msg = f"{target!r} is {type(obj).__name__}, not a parallelkit.Orchestrator"
        raise TypeError(msg)
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m parallelkit``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m parallelkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve an Orchestrator until SIGINT/SIGTERM")
    run.add_argument("target", help="module:attribute of an Orchestrator (or a factory)")
    run.add_argument("--timeline", action="store_true", help="print the start-up timeline")
    run.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    run.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        orch = load(args.target)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        parser.error(f"cannot load {args.target!r}: {exc}")

    def ready(running: Running) -> None:
        if args.timeline:
            print(running.timeline.to_text(), file=sys.stderr)
        total = running.timeline.total * 1000
        print(f"parallelkit: {len(running)} services ready in {total:.1f} ms", file=sys.stderr)
        sys.stderr.flush()

    try:
        anyio.run(lambda: orch.serve(on_ready=ready), backend=args.backend)
    except StartupError as exc:
        traceback.print_exception(exc)
        return 1
    except Exception:  # a crashed service: its own error
        traceback.print_exc()
        return 1
    print("parallelkit: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
