"""Run the CRM scenarios and show what each one does.

Each scenario is one pattern of the playbook parallelkit started from (a CRM
backend's TypeScript "parallel execution" playbook), done right: files, devflow,
webhook, payment, bulk, cache, startup (default: all of them, in a few
seconds). The database scenarios use a temporary SQLite file unless you name a
server with --database (e.g. postgresql://postgres@127.0.0.1/test; the tables go
in a schema of their own, dropped at the end). Durations are the playbook's,
scaled by --scale.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import httpx

from . import bulk, cache, devflow, files, payment, startup, webhook
from .clients import StripeClient, WebhookClient
from .db import open_database
from .seed import SeedSizes

SCENARIOS = ("files", "devflow", "webhook", "payment", "bulk", "cache", "startup")

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
    print(f"Flow recorded {result['record']!r}")
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


async def main(names: list[str], scale: float, database: str | None = None) -> None:
    if "files" in names:
        await demo_files(scale)
    if "devflow" in names:
        await demo_devflow(scale)
    if {"webhook", "payment", "bulk", "cache"} & set(names):
        sizes = SeedSizes(companies=20, contacts_per_company=10, conversations_per_contact=2)
        # on a server: a schema of its own, dropped at the end
        schema = f"pk_crm_demo_{os.getpid()}" if database else None
        async with open_database(database, seed_sizes=sizes, schema=schema) as db:
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


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.crm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        choices=[[], *SCENARIOS],
        metavar="SCENARIO",
        help=f"one of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--scale", type=float, default=0.2, help="multiplies the playbook's durations (0.2)"
    )
    parser.add_argument(
        "--database", metavar="URL", default=None, help="a database server (default: SQLite)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    asyncio.run(main(args.scenarios or list(SCENARIOS), args.scale, args.database))
    print(f"\nCRM demo done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
