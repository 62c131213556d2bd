"""The 50,000-company detection recipe of docs/distributed.md, as a runnable module.

Workers (as many processes, on as many machines, as you like)::

    taskiq worker tests.taskiq_helpers.recipe:broker --max-async-tasks 50

The producer::

    python -m tests.taskiq_helpers.recipe 50000

``tests/test_taskiq.py`` runs both (with 300 companies) so this recipe cannot rot.
The docs page shows the sections between the ``--8<--`` markers.
"""

from __future__ import annotations

import asyncio
import os
import sys

from redis.asyncio import Redis

import parallelkit as pk
from parallelkit.taskiq import map as distributed_map
from parallelkit.taskiq import redis_broker

# --8<-- [start:broker]
REDIS_URL = os.environ.get("CRM_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("CRM_QUEUE", "crm-detect")

broker = redis_broker(
    REDIS_URL,
    queue=QUEUE,
    idle_timeout=60,  # longer than the slowest company takes: no live worker is doubled
    retry=pk.Retry(attempts=3, backoff=0.2, on=(ConnectionError, TimeoutError)),
)
# --8<-- [end:broker]


# --8<-- [start:task]
@broker.task(task_name="crm.detect_and_enroll")
async def detect_and_enroll(company_id: int) -> int:
    """Enroll the company's inactive contacts in the win-back sequence.

    Idempotent, because delivery is at least once: if a worker dies after
    enrolling half the contacts, the message is redelivered and this runs again.
    ``enroll_once`` is keyed on (sequence, contact), like a UNIQUE constraint, so
    nobody is enrolled twice; the return value depends only on the company.
    """
    inactive = await find_inactive_contacts(company_id)
    for contact_id in inactive:
        await enroll_once("win-back", contact_id)
    return len(inactive)


# --8<-- [end:task]


# --8<-- [start:io]
_redis: dict[str, Redis] = {}


def redis() -> Redis:
    if "client" not in _redis:  # one client per worker process, made in its event loop
        _redis["client"] = Redis.from_url(REDIS_URL)
    return _redis["client"]


async def find_inactive_contacts(company_id: int) -> list[int]:
    """The CRM query, simulated: 10 ms, a flaky replica, one deleted company."""
    await asyncio.sleep(0.01)
    if company_id == 42:
        msg = f"company {company_id} was deleted"
        raise LookupError(msg)
    if company_id % 97 == 13 and await redis().incr(f"{QUEUE}:attempts:{company_id}") == 1:
        msg = f"replica lost while reading company {company_id}"
        raise ConnectionError(msg)  # the first attempt fails; the retry succeeds
    return [company_id * 10 + i for i in range(company_id % 4)]


async def enroll_once(sequence: str, contact_id: int) -> bool:
    """Enroll unless already enrolled (SET NX: the UNIQUE constraint of this demo)."""
    key = f"{QUEUE}:enrolled:{sequence}:{contact_id}"
    return bool(await redis().set(key, 1, nx=True, ex=86_400))


# --8<-- [end:io]


# --8<-- [start:producer]
def report(done: int, total: int | None) -> None:
    if total and done % max(1, total // 10) == 0:
        print(f"{done}/{total} companies", flush=True)


async def main(companies: int) -> None:
    await broker.startup()  # creates the consumer group: nothing kicked is lost
    try:
        outcomes = await distributed_map(
            detect_and_enroll,
            range(companies),
            limit=200,  # ~ workers x --max-async-tasks: enough to keep them busy
            timeout=120,
            settle=True,  # one deleted company must not lose the other 49,999
            progress=report,
        )
    finally:
        await broker.shutdown()
    failed = {company: o.error for company, o in enumerate(outcomes) if not o.ok}
    enrolled = sum(o.unwrap() for o in outcomes if o.ok)
    print(f"{companies - len(failed)} companies done, {enrolled} contacts enrolled")
    for company, error in failed.items():
        print(f"company {company} failed: {error!r}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
# --8<-- [end:producer]
