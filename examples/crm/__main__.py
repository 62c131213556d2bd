"""Run the CRM scenarios and show what each one does.

Each scenario is one pattern of the playbook parallelkit started from (a CRM
backend's TypeScript "parallel execution" playbook), done right: files, devflow,
webhook, payment, bulk, cache, startup (default: all of them, in a few
seconds). The database scenarios use a temporary SQLite file unless you name a
server with --database (e.g. postgresql://postgres@127.0.0.1/test; the tables go
in a schema of their own, dropped at the end). Durations are the playbook's,
scaled by --scale.

Ctrl-C (SIGINT) or SIGTERM stops it at once: each scenario's own clean-up runs
(processes stopped, temporary files and the database schema removed); exit code
130 (SIGINT) or 143 (SIGTERM). A database that cannot be used is reported in one
line before any scenario runs (exit code 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from . import bulk, cache, devflow, files, payment, startup, webhook
from .clients import StripeClient, WebhookClient
from .db import database_url, open_database
from .loops import close_leftovers
from .seed import SeedSizes

SCENARIOS = ("files", "devflow", "webhook", "payment", "bulk", "cache", "startup")
#: The scenarios that need the database.
DATABASE_SCENARIOS = frozenset({"webhook", "payment", "bulk", "cache"})
#: What stops the demo (cleanly: the scenarios' own clean-up runs).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Files the first scenario writes and reads: more than the common ``ulimit -n 1024``, so
#: an unbounded gather would run out of descriptors (10,000 works the same, only slower:
#: three worker-thread hops per file; the demo is part of the one-minute main job).
FILES = 2_000


def _title(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def _scratch() -> str | None:
    """Where to write the demo's files: memory (tmpfs) when the system has one."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


async def demo_files(scale: float) -> None:
    _title(f"1 parallel reads: pk.map over {FILES:,} files, limit=64")
    with tempfile.TemporaryDirectory(dir=_scratch()) as directory:
        paths = files.make_files(directory, FILES)
        start = time.perf_counter()
        report = await files.read_files(paths, limit=64)
        print(
            f"read {report.files:,} files ({report.bytes:,} bytes) in "
            f"{time.perf_counter() - start:.2f} s; at most {report.peak_open} open at once"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def demo_devflow(scale: float) -> None:
    _title("2 dev workflow: dev server + 3 watchers as an Orchestrator of processes")
    port = _free_port()
    orch = devflow.build_devflow(port)
    async with orch.start() as running:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        print(f"dev server answered {response.status_code}; letting the watchers run 0.3 s")
        await asyncio.sleep(0.3)
        print(running.timeline.to_text())
    watchers = [name for name, _, _ in devflow.WATCHERS]
    codes = {name: running[name].returncode for name in ("dev_server", *watchers)}
    stops = {span.name: span for span in running.timeline if span.kind == "stop"}
    last = all(stops["dev_server"].start >= stops[name].end for name in watchers)
    print(f"stopped: exit codes {codes} (-{int(signal.SIGTERM)}: SIGTERM)")
    print(f"the dev server stopped after every watcher had stopped: {last}")


async def demo_webhook(db: Any) -> None:
    _title("3 webhook: conversation -> contact -> company -> rules with eager(...)")
    from parallelkit.sqlalchemy import count_queries

    conversation_id = db.summary.conversation_ids[0]
    for fn in (webhook.load_webhook_context_sequential, webhook.load_webhook_context):
        async with db.sessions() as session, count_queries(db.engine) as counter:
            ctx = await fn(session, conversation_id)
        print(
            f"{fn.__name__}: {counter.count} statements, company {ctx.company.name!r}, "
            f"{len(ctx.rules)} rules"
        )
    async with db.sessions() as session:
        actions = await webhook.process_webhook(
            session, {"conversation_id": conversation_id, "event": "message.received"}
        )
    print(f"actions to run: {actions or 'none for this event'}")


async def demo_payment(db: Any, scale: float) -> None:
    _title("4 payment: charge -> (record || notify) with Flow")
    stripe, hooks = StripeClient(latency=0.5 * scale), WebhookClient(latency=0.2 * scale)
    _, row, _ = await payment.process_payment_seed_gather(
        "pay_seed", 1999, stripe=stripe, webhooks=hooks, sessions=db.sessions
    )
    verdict = "the charge id is lost (a race)" if row.stripe_charge_id is None else "no race"
    print(f"the playbook's single gather recorded {row!r}: {verdict}")
    result = await payment.process_payment(
        "pay_flow", 1999, stripe=stripe, webhooks=hooks, sessions=db.sessions
    )
    print(f"Flow recorded {result.get(payment.record).unwrap()!r}")
    tl = result.timeline
    waited = tl["record"].start >= tl["charge"].end and tl["notify"].start >= tl["charge"].end
    print(f"record and notify started after the charge ended: {waited}")
    print(tl.to_text())


async def demo_bulk(db: Any) -> None:
    _title("5 bulk: enroll 100 contacts; detect-and-enroll inactive contacts per company")
    contacts = db.summary.contact_ids[:100]
    outcomes = await bulk.enroll_contacts(db.sessions, 2, contacts, limit=10)
    print(f"enrolled {sum(o.ok for o in outcomes)}/{len(outcomes)} contacts (limit 10)")
    report = await bulk.detect_all(db.sessions, db.summary.company_ids, limit=10)
    print(
        f"detector: {report.enrolled} contacts enrolled across "
        f"{len(report.enrolled_by_company)} companies; failures: {report.failed or 'none'}"
    )


async def demo_cache(db: Any) -> None:
    _title("6 cache: SWRCache for conversation lookups")
    swr, get_conversation = cache.conversation_lookups(db.sessions, fresh=30, stale=300)
    async with swr:
        for _ in range(1000):
            await get_conversation(db.summary.conversation_ids[0])
    print(f"1,000 lookups: {swr.stats.loads} database load(s); {swr.stats}")


async def demo_startup(scale: float) -> None:
    _title("7 start-up: Orchestrator with a real uvicorn on 127.0.0.1 + simulated services")
    state: dict[str, Any] = {}
    orch = startup.build_orchestrator(scale, state=state)
    async with orch.start() as running:
        state["running"] = running
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{running['http']}/health")
        print(f"GET {running['http']}/health -> {response.status_code} {response.json()['status']}")
        print(running.timeline.to_text())
        ready = max(s.end for s in running.timeline if s.kind in ("start", "ready"))
        took = (ready - min(s.start for s in running.timeline)) * 1000
    ideal = startup.critical_path(scale) * 1000
    print(f"every service ready after {took:.0f} ms; ideal (critical path): {ideal:.0f} ms")


class DatabaseError(Exception):
    """The database named (or the temporary SQLite) could not be opened, created or seeded."""


def _shown(url: str | None) -> str:
    """The URL as the error shows it: without its password."""
    if not url:
        return "a temporary SQLite file"
    try:
        return make_url(database_url(url) or url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return repr(url)


def _reason(exc: BaseException) -> str:
    """One line: the driver's own error when SQLAlchemy wraps one."""
    cause: BaseException = exc
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        cause = exc.orig  # the driver's error (asyncpg's own, under SQLAlchemy's adapter)
        cause = cause.__cause__ or cause
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


async def main(names: list[str], scale: float, database: str | None = None) -> None:
    async with contextlib.AsyncExitStack() as stack:
        db = None
        if DATABASE_SCENARIOS & set(names):  # opened first: a bad URL fails before anything runs
            sizes = SeedSizes(companies=20, contacts_per_company=10, conversations_per_contact=2)
            # on a server: a schema of its own, dropped at the end
            schema = f"pk_crm_demo_{os.getpid()}" if database else None
            try:
                db = await stack.enter_async_context(
                    open_database(database, seed_sizes=sizes, schema=schema)
                )
            except (OSError, ImportError, SQLAlchemyError) as exc:
                msg = f"cannot open the database ({_shown(database)}): {_reason(exc)}"
                raise DatabaseError(msg) from exc
        if "files" in names:
            await demo_files(scale)
        if "devflow" in names:
            await demo_devflow(scale)
        if db is not None:
            print(f"\ndatabase: {db.url} (seed data: {sizes})")
            if "webhook" in names:
                await demo_webhook(db)
            if "payment" in names:
                await demo_payment(db, scale)
            if "bulk" in names:
                await demo_bulk(db)
            if "cache" in names:
                await demo_cache(db)
    if "startup" in names:
        await demo_startup(scale)


async def _until_signal(work: Coroutine[Any, Any, None]) -> int | None:
    """Await ``work``; SIGINT or SIGTERM cancels it. Returns the signal that stopped it.

    asyncio's own Ctrl-C handling cancels the program once, then raises
    ``KeyboardInterrupt`` wherever the next Ctrl-C finds it, in the middle of a
    clean-up (a process half stopped, a schema not dropped: a hang or a leak), and
    prints a traceback either way. Here every signal is delivered by the event loop:
    the first cancels the demo, the scenarios' clean-up runs, later ones are noted.
    The handlers stay until the loop is closed (:func:`_run`).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # a coroutine run by _run
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:
            task.cancel()  # (a no-op once the demo is over)
        received.append(signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        await work
    except asyncio.CancelledError:
        if not received:
            raise
    return received[0] if received else None


#: Seconds the tasks still pending once the demo is over get to finish (see :func:`_run`).
LEFTOVER_GRACE = 2.0


def _run(work: Coroutine[Any, Any, None]) -> int | None:
    """``asyncio.run(_until_signal(work))``, except that a stuck leftover cannot hold the exit.

    A SQLAlchemy query on aiosqlite cancelled at the wrong moment (a Ctrl-C during
    the cache scenario) leaves behind SQLAlchemy's own "close the connection
    gracefully" task, waiting for aiosqlite's worker thread, which has already
    stopped: it never ends, and ``asyncio.run`` waits for it forever. Here the tasks
    left over when the demo is done get ``LEFTOVER_GRACE`` seconds, then the loop
    closes anyway (the demo's own clean-up has run by then).
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_until_signal(work))
    finally:
        try:
            stuck = close_leftovers(loop, LEFTOVER_GRACE)
            if stuck:  # abandoned on purpose (close_leftovers): said once, here
                names = sorted({getattr(t.get_coro(), "__qualname__", "?") for t in stuck})
                print(
                    f"left behind after {LEFTOVER_GRACE:g} s: {len(stuck)} task(s) that did "
                    f"not finish ({', '.join(names)})",
                    file=sys.stderr,
                )
        finally:
            asyncio.set_event_loop(None)
            # from now on a signal is ignored (the demo is over; cli() restores the
            # defaults), not a KeyboardInterrupt half-way through the close, the last
            # lines or Python's exit, nor a write to the loop's closed pipe
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)
                signal.signal(signum, _ignore)
            loop.close()


def _ignore(signum: int, frame: object) -> None:
    """A signal that comes as the loop closes: the demo is over already."""


def _scale(value: str) -> float:
    """``--scale``: a finite number >= 0."""
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        msg = f"expected a finite number >= 0, got {value!r}"
        raise argparse.ArgumentTypeError(msg)
    return scale


def _scenario(value: str) -> str:
    if value not in SCENARIOS:
        msg = f"unknown scenario {value!r} (one of {', '.join(SCENARIOS)})"
        raise argparse.ArgumentTypeError(msg)
    return value


def cli(argv: list[str] | None = None) -> int:
    """Run the demo as ``python -m examples.crm ARGV`` would; returns the exit code."""
    try:
        return _cli(argv)
    finally:  # called from Python (tests): SIGINT and SIGTERM as they were
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _cli(argv: list[str] | None) -> int:
    """The command itself: once the loop has run, SIGINT and SIGTERM stay ignored (the
    demo is over: a late Ctrl-C would only interrupt its last lines or Python's exit)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.crm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        type=_scenario,
        metavar="SCENARIO",
        help=f"one of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--scale", type=_scale, default=0.2, help="multiplies the playbook's durations (0.2)"
    )
    parser.add_argument(
        "--database", metavar="URL", default=None, help="a database server (default: SQLite)"
    )
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    started = time.perf_counter()
    try:
        stopped_by = _run(main(names, args.scale, args.database))
    except DatabaseError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a Ctrl-C before the loop took over the signals
        stopped_by = signal.SIGINT
    except BrokenPipeError:  # `python -m examples.crm | head`: the reader is gone
        # (the scenarios' clean-up has run); Python's own flush at exit would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    took = time.perf_counter() - started
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        print(f"\nCRM demo stopped by {name} after {took:.1f} s", file=sys.stderr)
        return 128 + stopped_by
    print(f"\nCRM demo done in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(None))
