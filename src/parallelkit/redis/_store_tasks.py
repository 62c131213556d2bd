"""What an entered RedisStore runs in the background.

``async with store:`` opens the store's own task group and starts in it:

* the renewal of its loads' leases, all of them from one task with one command
  per round (:class:`._renewals.Renewals`), so a load starts no task; the
  store's exit waits for the loads still holding one (``Renewals.drain``), so
  none runs on past its lease unguarded;
* with a near cache, the subscription to the invalidation channel
  (:meth:`._near.NearCache.listen_forever`); ``__aenter__`` returns once it is
  up, or has failed;
* with a near cache, its sweep, and the watch on the subscription's connection
  (:meth:`._near.NearCache.watch_forever`): a task that awaits nothing but its
  clock, so no Redis read holds up the ``near_ttl`` bound;
* with a near cache, the renewal of near entries before ``near_ttl``: one round
  (``RedisStore._renew``, one ``MGET`` per part) every sweep interval;
* the replay of what Redis did not get (an invalidation made while it was down
  or refused writes): tried about every ``retry_after`` (at most a second)
  until Redis takes it, so it reaches every replica even if this process
  makes no further call.

Kept apart from :mod:`._store`, which holds what a call runs, because none of
this is on a call's path: it is background work whose failures are counted and
logged, never raised into the block the user entered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from . import _store_writes as writes
from ._common import jittered
from ._outage import Down

if TYPE_CHECKING:
    from ._store import RedisStore

__all__ = ["start"]

logger = logging.getLogger("parallelkit.redis")


async def start(store: RedisStore) -> None:
    """Open ``store``'s task group and start its tasks (from ``RedisStore.__aenter__``)."""
    tg = await store._owner.enter()
    tg.start_soon(store._renewals.run)  # the load leases': no task per load
    tg.start_soon(_replay_forever, store)
    if store._near.enabled:
        try:
            await tg.start(_listen, store)
        except BaseException:
            await store._owner.exit(None, None, None, cancel=True)
            raise
        tg.start_soon(store._near.watch_forever)
        tg.start_soon(_renew_forever, store)


async def _listen(store: RedisStore, *, task_status: TaskStatus[None]) -> None:
    await store._near.listen_forever(
        store._redis,
        timeout=store._guard.timeout,
        retry_after=store._guard.retry_after,
        slots=store._guard.slots,
        task_status=task_status,
    )


async def _renew_forever(store: RedisStore) -> None:
    """Renew the near entries before ``near_ttl``: one ``MGET`` per sweep
    interval (see :mod:`._near`). Background work: failures are counted and
    logged, never raised; an entry not renewed just expires."""
    while True:
        await anyio.sleep(store._near.slack)
        try:
            await store._renew()
        except Down:
            pass  # counted by the guard; the entries expire as without renewal
        except Exception as exc:
            store._near.renew_errors += 1
            logger.warning(
                "RedisStore %r: near cache renewal failed: %s: %s",
                store._namespace,
                type(exc).__name__,
                exc,
            )


async def _replay_forever(store: RedisStore) -> None:
    """Write what Redis did not get (the invalidations kept during an outage or a
    write refusal) as soon as it takes them, even if no call of this process comes
    to do it: other replicas read, and their near caches renew, the entries those
    invalidations were for until then.

    After an outage, one ``PING`` through the guard is the probe (its recovery
    replays first, see :mod:`._outage`); while Redis refuses writes, the replay is
    tried at the write's turn (``Refusals.waiting``). Background work: failures
    are counted (an outage by the guard) or logged (the first of each streak),
    never raised.
    """
    guard = store._guard
    failing = False
    while True:
        await anyio.sleep(jittered(min(max(guard.retry_after, 0.05), 1.0)))
        if not (store._missed or store._missed_all) or guard.down:
            continue
        try:
            if guard.outage:
                await guard.call("replay", store._redis.ping())
            elif store._refusals.error is None or not store._refusals.waiting():
                await writes.replay(store)
        except Down:
            pass  # counted by the guard: tried again after retry_after
        except Exception as exc:
            if not failing:
                logger.warning(
                    "RedisStore %r: replaying invalidations failed: %s: %s",
                    store._namespace,
                    type(exc).__name__,
                    exc,
                )
            failing = True
        else:
            failing = False
