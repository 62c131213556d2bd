"""Cache and batching: hot-hit cost, loads per cold stampede, refreshes per stale
stampede, and BatchLoader vs aiodataloader, all measured side by side in one run.

Everything runs on asyncio (the peers are asyncio-only; aiodataloader needs an
asyncio loop). Hit costs are per call, in microseconds, the minimum of several
repeats of a tight loop awaiting the cached function with a hot key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools

import parallelkit as pk

from ._util import print_targets, table, target

TITLE = (
    "SWRCache hit cost and stampedes vs cachetools, async-lru, cashews, aiocache; "
    "BatchLoader vs aiodataloader"
)

LOAD_DELAY = 0.01  # a simulated database round trip


# ------------------------------------------------------------------------- hot hits
async def _per_call(fn: Callable[[int], Awaitable[Any]], n: int, repeat: int) -> float:
    await fn(1)  # warm: the key is loaded
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            await fn(1)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


async def _hot_hits(n: int, repeat: int) -> dict[str, float]:
    from aiocache import cached as aiocache_cached
    from async_lru import alru_cache
    from cashews import Cache

    async def plain(x: int) -> int:
        return x

    ttl = cachetools.TTLCache(maxsize=10_000, ttl=300)

    async def ttlcache_lookup(x: int) -> int:
        try:
            value: int = ttl[x]
            return value
        except KeyError:
            pass
        ttl[x] = x
        return x

    swr = pk.SWRCache(fresh=300, stale=300)

    @swr.cached
    async def swr_decorated(x: int) -> int:
        return x

    async def loader(key: int) -> int:
        return key

    async def swr_get(x: int) -> int:
        return await swr.get(x, loader)

    @alru_cache(maxsize=10_000, ttl=300)
    async def async_lru(x: int) -> int:
        return x

    cashews = Cache()
    cashews.setup("mem://")

    @cashews(ttl="5m")
    async def cashews_hit(x: int) -> int:
        return x

    @aiocache_cached(ttl=300)
    async def aiocache_hit(x: int) -> int:
        return x

    contenders: dict[str, Callable[[int], Awaitable[Any]]] = {
        "plain async function (no cache)": plain,
        "cachetools TTLCache in an async function": ttlcache_lookup,
        "pk.SWRCache @cached": swr_decorated,
        "pk.SWRCache.get": swr_get,
        "async-lru alru_cache(ttl)": async_lru,
        "cashews mem:// @cache": cashews_hit,
        "aiocache @cached (memory)": aiocache_hit,
    }
    out: dict[str, float] = {}
    slow = {"cashews mem:// @cache", "aiocache @cached (memory)"}
    async with swr:
        for name, fn in contenders.items():
            calls = max(n // 20, 100) if name in slow else n
            out[name] = await _per_call(fn, calls, repeat)
    await cashews.close()
    return out


# -------------------------------------------------------------------- stampedes
async def _stampede(callers: int) -> dict[str, dict[str, Any]]:
    """Loads per ``callers`` concurrent cold callers, refreshes per stale callers."""
    from aiocache import cached as aiocache_cached
    from async_lru import alru_cache
    from cashews import Cache

    out: dict[str, dict[str, Any]] = {}

    async def gather_calls(fn: Callable[[int], Awaitable[Any]]) -> None:
        await asyncio.gather(*(fn(1) for _ in range(callers)))

    # -- the seed's cache: serve from memory, fire a refresh on EVERY hit
    seed_loads = 0
    memory: dict[int, int] = {}
    background: set[asyncio.Task[None]] = set()

    async def seed_load(x: int) -> int:
        nonlocal seed_loads
        seed_loads += 1
        await asyncio.sleep(LOAD_DELAY)
        return x

    async def seed_refresh(x: int) -> None:
        memory[x] = await seed_load(x)

    async def seed_get(x: int) -> int:
        if x in memory:
            task = asyncio.create_task(seed_refresh(x))  # the flaw: fire-and-forget per hit
            background.add(task)
            task.add_done_callback(background.discard)
            return memory[x]
        memory[x] = await seed_load(x)
        return memory[x]

    await gather_calls(seed_get)
    cold = seed_loads
    seed_loads = 0
    await gather_calls(seed_get)
    await asyncio.gather(*background)
    out["seed pattern (refresh on every hit)"] = {"cold_loads": cold, "stale_refreshes": seed_loads}

    # -- SWRCache: single flight + one refresh per key
    swr_loads = 0

    async def swr_load(x: int) -> int:
        nonlocal swr_loads
        swr_loads += 1
        await asyncio.sleep(LOAD_DELAY)
        return x

    swr = pk.SWRCache(fresh=0.05, stale=60)
    swr_fn = swr.cached(swr_load)
    async with swr:
        await gather_calls(swr_fn)
        cold = swr_loads
        await asyncio.sleep(0.1)  # now stale
        await gather_calls(swr_fn)
        await asyncio.sleep(LOAD_DELAY * 3)
    out["pk.SWRCache"] = {"cold_loads": cold, "stale_refreshes": swr_loads - cold}

    # -- async-lru: shares the in-flight call; no stale mode
    lru_loads = 0

    @alru_cache(maxsize=100, ttl=60)
    async def lru_fn(x: int) -> int:
        nonlocal lru_loads
        lru_loads += 1
        await asyncio.sleep(LOAD_DELAY)
        return x

    await gather_calls(lru_fn)
    out["async-lru"] = {"cold_loads": lru_loads, "stale_refreshes": "no stale mode"}

    # -- cashews: plain, lock=True, and early (background refresh) modes
    cashews = Cache()
    cashews.setup("mem://")
    counts = {"plain": 0, "lock": 0, "early": 0}

    def counted(kind: str) -> Callable[[int], Awaitable[int]]:
        async def load(x: int) -> int:
            counts[kind] += 1
            await asyncio.sleep(LOAD_DELAY)
            return x

        load.__name__ = f"cashews_{kind}"
        return load

    plain = cashews(ttl="1m", key="plain:{x}")(counted("plain"))
    locked = cashews(ttl="1m", key="lock:{x}", lock=True)(counted("lock"))
    early = cashews.early(ttl="1m", early_ttl=0.05, key="early:{x}")(counted("early"))
    await gather_calls(plain)
    await gather_calls(locked)
    await gather_calls(early)
    early_cold = counts["early"]
    await asyncio.sleep(0.1)
    await gather_calls(early)
    await asyncio.sleep(LOAD_DELAY * 5)
    await cashews.close()
    out["cashews @cache"] = {"cold_loads": counts["plain"], "stale_refreshes": "no stale mode"}
    out["cashews @cache(lock=True)"] = {"cold_loads": counts["lock"], "stale_refreshes": "-"}
    out["cashews @early"] = {
        "cold_loads": early_cold,
        "stale_refreshes": counts["early"] - early_cold,
    }

    # -- aiocache: no single flight
    aio_loads = 0

    @aiocache_cached(ttl=60)
    async def aio_fn(x: int) -> int:
        nonlocal aio_loads
        aio_loads += 1
        await asyncio.sleep(LOAD_DELAY)
        return x

    await gather_calls(aio_fn)
    out["aiocache @cached"] = {"cold_loads": aio_loads, "stale_refreshes": "no stale mode"}
    return out


# -------------------------------------------------------------------- batching
async def _batching(keys: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per-key cost of ``keys`` concurrent loads, three ways, for both loaders.

    * ``gather``: ``asyncio.gather(*(loader.load(k) ...))``. Both ``load``s
      return an asyncio Future here (ours does on asyncio with the loader
      entered), so gather makes no task per key.
    * ``tasks``: ``keys`` concurrent tasks each awaiting ``load`` (the real N+1
      shape: one handler per key); both pay one task per key. Our future is also
      a coroutine (``tg.start_soon(loader.load, k)`` works), and asyncio's Task
      waits on a Future subclass a little slower than on an exact Future.
    * ``load_many``: one ``load_many(keys)`` call.
    """
    from aiodataloader import DataLoader

    async def load_many(ks: list[int]) -> list[int]:
        return ks

    def pk_loader() -> pk.BatchLoader[int, int]:
        return pk.BatchLoader(load_many, max_batch=keys)

    def dl_loader() -> Any:
        return DataLoader(load_many, max_batch_size=keys, cache=False)

    async def gather_form(loader: Any) -> None:
        await asyncio.gather(*(loader.load(k) for k in range(keys)))

    async def tasks_form(loader: Any) -> None:
        async def one(k: int) -> None:
            await loader.load(k)

        async with asyncio.TaskGroup() as tg:
            for k in range(keys):
                tg.create_task(one(k))

    async def load_many_form(loader: Any) -> None:
        await loader.load_many(list(range(keys)))

    async def pk_round(form: Callable[[Any], Awaitable[None]]) -> None:
        async with pk_loader() as loader:
            await form(loader)

    async def dl_round(form: Callable[[Any], Awaitable[None]]) -> None:
        await form(dl_loader())

    out: dict[str, dict[str, float]] = {}
    forms = {"gather": gather_form, "tasks": tasks_form, "load_many": load_many_form}
    for form_name, form in forms.items():
        row: dict[str, float] = {}
        for name, round_ in (("pk.BatchLoader", pk_round), ("aiodataloader", dl_round)):
            await round_(form)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                await round_(form)
                best = min(best, time.perf_counter() - start)
            row[name] = best / keys * 1e6
        out[form_name] = row
    return out


# -------------------------------------------------------------------------- run
def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    n, repeat = (20_000, 3) if quick else (200_000, 7)
    callers = 1000
    keys, rounds = (500, 5) if quick else (500, 40)

    hits = asyncio.run(_hot_hits(n, repeat))
    print(table(["hot hit (asyncio)", "µs / call"], [[k, v] for k, v in hits.items()]))
    stampede = asyncio.run(_stampede(callers))
    print()
    print(
        table(
            [f"{callers} concurrent callers", "loads (cold)", "refreshes (stale)"],
            [[k, v["cold_loads"], v["stale_refreshes"]] for k, v in stampede.items()],
        )
    )
    batching = asyncio.run(_batching(keys, rounds))
    print()
    print(
        table(
            [f"{keys} concurrent loads (asyncio)", "pk.BatchLoader µs/key", "aiodataloader µs/key"],
            [[k, v["pk.BatchLoader"], v["aiodataloader"]] for k, v in batching.items()],
        )
    )

    ttl = hits["cachetools TTLCache in an async function"]
    dec = hits["pk.SWRCache @cached"]
    lru = hits["async-lru alru_cache(ttl)"]
    swr = stampede["pk.SWRCache"]
    targets = [
        target("SWRCache @cached hit / TTLCache-in-async hit", dec / ttl, 2.0),
        target("SWRCache @cached hit / async-lru hit", dec / lru, 1.0),
        target("SWRCache loads per 1,000 cold callers", swr["cold_loads"], 1),
        target("SWRCache refreshes per 1,000 stale callers", swr["stale_refreshes"], 1),
    ]
    for form, note in (
        ("tasks", "one task per caller, the N+1 shape"),
        ("load_many", "one load_many call"),
        ("gather", "asyncio.gather of loads: both return Futures, no task per key"),
    ):
        ratio = batching[form]["pk.BatchLoader"] / batching[form]["aiodataloader"]
        targets.append(target(f"BatchLoader / aiodataloader per-key cost, {note}", ratio, 1.0))
    print()
    print_targets(targets)
    return {
        "hot_hit_us": hits,
        "stampede": stampede,
        "batching_us_per_key": batching,
        "targets": targets,
        "sizes": {"hit_calls": n, "repeat": repeat, "callers": callers, "keys": keys},
    }
