"""Run parallelkit's benchmarks and write a report.

With no option this is the main job: every benchmark at quick sizes, on embedded
SQLite, in under a minute; it never touches a PostgreSQL or Redis server
unless you name one (--database, --redis). The report goes to .benchmarks/ in the
checkout (ignored by git): report.md, results.json, one JSON file and one chart
per benchmark. A benchmark that fails, or whose results are wrong, is reported
and makes the exit status 1; the others still run. A URL that is not one (or a
database other than PostgreSQL or SQLite) is a usage error (exit status 2), and a
Redis server named with --redis that does not answer is an error before anything
runs (exit status 1). Ctrl-C (SIGINT) or SIGTERM stops the run: the running
benchmark's clean-up runs (its processes, servers and temporary files), no report
is written, and the exit status is 130 (SIGINT) or 143 (SIGTERM).

The playbook benchmark runs again the table of timings claimed by the playbook
parallelkit started from (a CRM backend's TypeScript "parallel execution"
playbook): its sequential code, its parallel code as written, parallelkit, and a
lower bound computed without parallelkit, every result checked.

The maintainers' reference run (full sizes, every server) rewrites the results
section of docs/benchmarks.md and its charts:

    python -m benchmarks --full --database postgresql+asyncpg://... --redis redis://... --publish
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from . import _registry
from ._registry import (
    ALIASES,
    NEEDS,
    QUICK_BUDGET_S,
    ROOT,
    available,
    default,
    load,
    set_progress_hook,
)
from ._results import (
    _chart,
    _demoted,
    _good,
    _report,  # noqa: F401 (the tests read the report through the runner)
    _result,
    _sections,
    _status,
    _targets,
    write_results,
)
from ._util import unreachable

DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
DOCS_ASSETS = ROOT / "docs" / "assets"
BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"


class _Tee(io.TextIOBase):
    """Keep a copy of a module's output for the report; echo it only when asked."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self.out is not None:
            self.out.write(text)
        return len(text)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _describe_database(url: str | None) -> str:
    if not url:
        return "SQLite (embedded, a temporary file via aiosqlite)"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a description only
        return "(unparseable URL)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": args.machine or platform.node(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "quick": not args.full,
        "database": _describe_database(args.database),
        "redis": "yes" if args.redis else "not asked (no --redis)",
    }


#: Where modules written before ``run(redis=...)`` read their Redis URL (set only for them,
#: only while they run, only when ``--redis`` was given).
LEGACY_REDIS_VARS = ("PARALLELKIT_BENCH_REDIS_URL", "PARALLELKIT_TEST_REDIS_URL")


@contextlib.contextmanager
def _legacy_redis(url: str | None) -> Iterator[None]:
    saved = {var: os.environ.get(var) for var in LEGACY_REDIS_VARS}
    if url:
        os.environ.update(dict.fromkeys(LEGACY_REDIS_VARS, url))
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _call(name: str, args: argparse.Namespace) -> tuple[str, Any]:
    """Import and run one module; the Redis URL goes to ``run(redis=...)`` or, for a
    module that does not take it yet, to the variables it reads."""
    takes_redis = False
    with _legacy_redis(args.redis if NEEDS.get(name) else None):
        module = load(name)
        takes_redis = "redis" in inspect.signature(module.run).parameters
        kwargs: dict[str, Any] = {"quick": not args.full, "database": args.database}
        if takes_redis:
            kwargs["redis"] = args.redis
        return module.TITLE, module.run(**kwargs)


def _run_one(name: str, args: argparse.Namespace, status: Any) -> dict[str, Any]:
    started = time.perf_counter()
    tee = _Tee(sys.stdout if args.verbose else None)
    entry: dict[str, Any] = {"name": name, "quick": not args.full}
    missing = [s for s in NEEDS.get(name, ()) if not getattr(args, s)]
    entry["title"] = load_title(name)
    try:
        if missing:
            why = " and ".join(f"--{s} URL" for s in missing)
            entry["result"] = {"skipped": f"not run: needs {why}"}
        else:
            status(f"{name}: {entry['title']}")
            print(f"\n=== {name}: {entry['title']} ===", file=tee, flush=True)
            with contextlib.redirect_stdout(tee):
                entry["title"], entry["result"] = _call(name, args)
        entry["ok"] = True
    except Exception as exc:  # reported, and the others still run
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()
        print(entry["traceback"], file=sys.stderr, flush=True)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    entry["output"] = tee.copy.getvalue()
    entry["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return entry


def _run_all(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # the `bench` extra is not installed: plain output
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name}", flush=True)
            entries.append(_run_one(name, args, lambda _text: None))
        return entries

    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[bench]}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(names), bench="benchmarks")

        def status(text: str) -> None:
            progress.update(task, description=text[:70])

        set_progress_hook(status)
        try:
            for name in names:
                progress.update(task, bench=name)
                entries.append(_run_one(name, args, status))
                progress.advance(task)
        finally:
            set_progress_hook(None)
    return entries


# -- this run's summary, and publishing (the report itself: ._results) ------------------
def _publish(merged: dict[str, Any], out: Path) -> Path:
    """Rewrite the results section of docs/benchmarks.md and copy the charts to docs/assets."""
    import shutil

    def image(name: str) -> str | None:
        chart = out / f"{name}.png"
        if not chart.exists():
            return None
        DOCS_ASSETS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, DOCS_ASSETS / f"bench-{name}.png")
        return f"assets/bench-{name}.png"

    body = "\n".join(_demoted(_sections(merged, image)))
    page = DOCS_PAGE.read_text()
    head, sep, rest = page.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        msg = f"{DOCS_PAGE} has no {BEGIN} ... {END} section to rewrite"
        raise SystemExit(msg)
    DOCS_PAGE.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}")
    return DOCS_PAGE


def _summary(entries: list[dict[str, Any]], total: float, quick: bool) -> list[str]:
    lines = [f"{len(entries)} benchmark(s) in {total:.0f} s:"]
    for entry in entries:
        targets = _targets(_result(entry))
        met = f"targets {sum(bool(t.get('met')) for t in targets)}/{len(targets)} met"
        budget = QUICK_BUDGET_S.get(entry["name"])
        over = (
            f" (over its {budget:.0f} s quick budget)"
            if quick and budget and entry["seconds"] > budget and entry.get("ok")
            else ""
        )
        status = _status(entry)
        shown = f"{met}{over}" if status == "ok" and targets else status
        lines.append(f"  {entry['name']:<12} {entry['seconds']:>6.1f} s  {shown}")
        for extra in _result(entry).get("summary") or ():
            lines.append(f"      {extra}")
    return lines


def _database_url(value: str) -> str:
    """``--database``: a SQLAlchemy URL of PostgreSQL or SQLite (what the modules can use)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
        backend = url.get_backend_name()
    except (ArgumentError, ValueError):
        msg = f"not a database URL: {value!r} (e.g. postgresql+asyncpg://postgres@127.0.0.1/test)"
        raise argparse.ArgumentTypeError(msg) from None
    if backend not in ("postgresql", "sqlite"):
        shown = url.render_as_string(hide_password=True)
        msg = f"the benchmarks run on PostgreSQL or SQLite, not {backend!r}: {shown!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _redis_url(value: str) -> str:
    """``--redis``: a redis://, rediss:// or unix:// URL."""
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        msg = f"not a Redis URL: {value!r} (e.g. redis://127.0.0.1:6379/0)"
        raise argparse.ArgumentTypeError(msg)
    return value


def _parser(names: list[str]) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {n:<12} {load_title(n)}" for n in names)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=f"benchmarks:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument(
        "--full", action="store_true", help="full sizes and repetitions (minutes; maintainers)"
    )
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default
    parser.add_argument(
        "--database",
        metavar="URL",
        type=_database_url,
        default=None,
        help="a database server for the database rows, e.g. "
        "postgresql+asyncpg://postgres@127.0.0.1/test (default: embedded SQLite only)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        type=_redis_url,
        default=None,
        help="run the benchmarks that need Redis, e.g. redis://127.0.0.1:6379/0 "
        "(default: they are not run)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"where to write the report (default: {_rel(_registry.RESULTS)})",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="with --full: rewrite the results in docs/benchmarks.md and its charts",
    )
    parser.add_argument("--machine", default=None, help="the machine's name in the report")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each table as it runs")
    return parser


def load_title(name: str) -> str:
    """A module's ``TITLE``, read from its source: ``--help`` imports no benchmark."""
    source = (_registry.HERE / f"bench_{name}.py").read_text(encoding="utf-8")
    found = re.search(r"^TITLE\s*=\s*(\(.*?\)|\"[^\n]*\")\s*$", source, re.MULTILINE | re.DOTALL)
    try:
        return str(ast.literal_eval(found.group(1))) if found else ""
    except (SyntaxError, ValueError):
        return ""


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    return str(path)


def _sigterm_as_sigint(signum: int, frame: Any) -> None:
    """SIGTERM stops a run the way Ctrl-C does: whoever handles SIGINT now (the
    benchmark's event loop, or Python's ``KeyboardInterrupt``) handles it, so every
    clean-up runs (worker processes, servers, temporary databases)."""
    _STOPPED_BY[:] = [signum]
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a shell): stop all the same
        raise KeyboardInterrupt


#: The signal that stopped the run (SIGINT unless SIGTERM said so).
_STOPPED_BY: list[int] = []


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``; returns the exit code.

    Ctrl-C (SIGINT) or SIGTERM stops the run: the running benchmark's clean-up runs
    (its processes, servers and temporary files), no report is written, and the exit
    code is 130 (SIGINT) or 143 (SIGTERM).
    """
    started = time.perf_counter()
    _STOPPED_BY.clear()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        stopped_by = _STOPPED_BY[0] if _STOPPED_BY else signal.SIGINT
        took = time.perf_counter() - started
        name = signal.Signals(stopped_by).name
        print(
            f"\nbenchmarks stopped by {name} after {took:.1f} s; no report written",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stopped_by
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    names = available()
    parser = _parser(names)
    args = parser.parse_args(argv)
    chosen = [ALIASES.get(n, n) for n in args.names]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    if args.publish and (not args.full or chosen):
        parser.error("--publish writes the reference results: it needs --full and every benchmark")
    out: Path = args.out or _registry.RESULTS
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot write the report to {str(out)!r}: {exc.strerror or exc}")
    chosen = chosen or default()
    asks_redis = [n for n in chosen if "redis" in NEEDS.get(n, ())]
    if args.redis and asks_redis:  # named, so used: a server that does not answer is an error
        tcp = urlsplit(args.redis).scheme != "unix"
        why = unreachable(args.redis, 6379) if tcp else None
        if why is not None:
            print(
                f"{parser.prog}: error: --redis for {', '.join(asks_redis)}: {why}", file=sys.stderr
            )
            return 1
    env = _environment(args)
    mode = "full sizes" if args.full else "quick sizes"
    print(f"parallelkit benchmarks ({mode}; database: {env['database']}; redis: {env['redis']})")
    started = time.perf_counter()
    entries = _run_all(chosen, args)
    for entry in entries:  # where it ran: the report may keep it beside later runs' entries
        entry["database"], entry["redis"] = env["database"], env["redis"]
        result = _result(entry)
        if entry.get("ok"):
            (out / f"{entry['name']}.json").write_text(
                json.dumps(entry["result"], indent=2, default=str) + "\n"
            )
            if result.get("chart"):
                _chart(out, entry["name"], result["chart"])
    write_results(out, entries, env)
    report = out / "report.md"
    print("\n".join(_summary(entries, time.perf_counter() - started, not args.full)))
    print(f"report: {_rel(report)}")
    if args.publish:  # this run only, never an older result left in the output directory
        this_run = {"environment": env, "benchmarks": {e["name"]: e for e in entries}}
        print(f"published: {_rel(_publish(this_run, out))}")
    return 0 if all(_good(e) for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
