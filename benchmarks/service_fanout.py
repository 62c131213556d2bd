"""The enrollment fan-out alone: ``pk.map`` over per-item sessions vs ``asyncio.gather``.

``python -m benchmarks.service_fanout [--database URL] [--requests 64] [--rounds 3]``

Issue 18.4: in the service, the parallelkit variant's enrollment cost more CPU
than the gather variants. This isolates the fan-out from HTTP and FastAPI: the
same 64 concurrent "requests", each enrolling one company's inactive contacts
(one session + one ``SELECT`` + a 1 ms e-mail per contact, exactly the service's
per-item work), fanned out five ways, interleaved over rounds, CPU of this process
per request (the database server's CPU is not in it):

* ``gather``: unbounded ``asyncio.gather`` (the ordinary variant);
* ``gather + semaphore``: a process-wide ``asyncio.Semaphore(pool)`` around the
  database work only (the expert variant);
* ``pk.map limit=pool``: ``pk.map(limit=pool_size, settle=True)`` per request (the
  parallelkit variant, as the docs recommend);
* ``pk.map shared Limiter``: one process-wide ``pk.Limiter(concurrency=pool_size)`` as ``limit``
  (bounds the whole item, the e-mail included);
* ``pk.map limit=pool, no guard``: as the third, with ``guard_sessions(False)``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from examples.service.shared import (
    Clients,
    Settings,
    find_inactive,
    open_conversations,
    open_database,
)

import parallelkit as pk
from parallelkit.sqlalchemy import guard_sessions

from ._util import table


async def main(database: str | None, requests: int, rounds: int) -> None:
    settings = Settings(name="fanout", database=database)
    clients = Clients.of(settings)
    async with open_database(settings) as db:
        slots = asyncio.Semaphore(db.pool_size)
        shared = pk.Limiter(concurrency=db.pool_size)
        companies = {}
        async with db.sessions() as session:
            for company_id in range(1, 21):
                companies[company_id] = (await find_inactive(session, company_id, 21))[1]

        async def item(contact: Any, slot: Any = None) -> int:
            if slot is None:
                async with db.sessions() as session:
                    count = await open_conversations(session, contact.id)
            else:
                async with slot, db.sessions() as session:
                    count = await open_conversations(session, contact.id)
            await clients.mail(contact.email, f"re-engage:{count}")
            return int(contact.id)

        async def gather(contacts: list[Any]) -> list[int]:
            return list(await asyncio.gather(*(item(c) for c in contacts)))

        async def gather_sem(contacts: list[Any]) -> list[int]:
            results = await asyncio.gather(
                *(item(c, slots) for c in contacts), return_exceptions=True
            )
            return [r for r in results if isinstance(r, int)]

        async def pk_map(contacts: list[Any]) -> list[int]:
            outcomes = await pk.map(item, contacts, limit=db.pool_size, settle=True)
            return [o.value for o in outcomes if o.ok]

        async def pk_shared(contacts: list[Any]) -> list[int]:
            outcomes = await pk.map(item, contacts, limit=shared, settle=True)
            return [o.value for o in outcomes if o.ok]

        ways: dict[str, Callable[[list[Any]], Awaitable[list[int]]]] = {
            "gather": gather,
            "gather + semaphore": gather_sem,
            "pk.map limit=pool": pk_map,
            "pk.map shared Limiter": pk_shared,
            "pk.map limit=pool, no guard": pk_map,
        }
        cpu: dict[str, list[float]] = {name: [] for name in ways}
        wall: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for rnd in range(rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                guard_sessions(not name.endswith("no guard"))
                fan = ways[name]
                jobs = [companies[(i % 20) + 1] for i in range(requests)]
                t0, w0 = time.process_time(), time.perf_counter()
                done = await asyncio.gather(*(fan(list(j)) for j in jobs))
                cpu[name].append((time.process_time() - t0) / requests * 1000)
                wall[name].append(time.perf_counter() - w0)
                assert [sorted(d) for d in done] == [sorted(c.id for c in j) for j in jobs]
        guard_sessions(True)
    base = statistics.median(cpu["gather + semaphore"])
    rows = [
        [
            name,
            f"{statistics.median(cpu[name]):.2f} [{min(cpu[name]):.2f}-{max(cpu[name]):.2f}]",
            f"{statistics.median(cpu[name]) / base:.2f}",
            f"{statistics.median(wall[name]):.2f}",
        ]
        for name in ways
    ]
    print(
        f"{requests} concurrent requests x ~18 contacts, {rounds} rounds, "
        f"{database or 'SQLite'}; CPU of this process"
    )
    print(table(["fan-out", "CPU ms/request med [range]", "vs gather+semaphore", "wall s"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_fanout")
    parser.add_argument("--database", default=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    asyncio.run(main(a.database, a.requests, a.rounds))
