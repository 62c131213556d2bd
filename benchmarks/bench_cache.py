"""Cache and batching: hot-hit cost, loads per cold stampede, refreshes per stale
stampede, and BatchLoader vs aiodataloader, all measured side by side in one run.

Everything runs on asyncio (the peers are asyncio-only; aiodataloader needs an
asyncio loop). Timings are **interleaved and repeated**: each round times every
contender once, in an order rotated per round, so that a burst of load on a
shared machine hits all of them alike. Each sample is the per-call cost of a
tight loop (microseconds); a ratio is taken per round (both sides measured
seconds apart) and reported as the median with its range over the rounds.

Every caller's value is checked (each hot hit, each stampede caller, each batched
load): a wrong value is a wrong result and fails the run. A single flight is exactly
one load: 0 loads is a miss, not "at most 1".
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools

import parallelkit as pk

from ._util import exactly, print_targets, table, target

TITLE = (
    "SWRCache hit cost and stampedes vs cachetools, async-lru, cashews, aiocache; "
    "BatchLoader vs aiodataloader"
)

LOAD_DELAY = 0.01  # a simulated database round trip


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _rotated(names: list[str], round_: int) -> list[str]:
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


# ------------------------------------------------------------------------- hot hits
async def _per_call(fn: Callable[[int], Awaitable[Any]], n: int) -> tuple[float, bool]:
    """Microseconds per call of ``fn(1)``, and whether every call returned 1."""
    wrong = 0
    start = time.perf_counter()
    for _ in range(n):
        if await fn(1) != 1:
            wrong += 1
    return (time.perf_counter() - start) / n * 1e6, wrong == 0


async def _hot_hits(n: int, rounds: int) -> dict[str, Any]:
    """Per-call cost of a hot hit, every contender once per round, rounds interleaved."""
    from aiocache import cached as aiocache_cached
    from async_lru import alru_cache
    from cashews import Cache

    async def plain(x: int) -> int:
        return x

    ttl = cachetools.TTLCache(maxsize=10_000, ttl=300)

    async def ttlcache_lookup(x: int) -> int:
        # the expert's form (issue 18): a TTLCache looked up inside an async function
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
    slow = {"cashews mem:// @cache", "aiocache @cached (memory)"}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    returned_one = dict.fromkeys(contenders, True)  # every call's value checked
    async with swr:
        for name, fn in contenders.items():
            returned_one[name] &= await fn(1) == 1  # warm: the key is loaded
            returned_one[name] &= (await _per_call(fn, 1000))[1]
        for round_ in range(rounds):
            for name in _rotated(list(contenders), round_):
                calls = max(n // 20, 100) if name in slow else n
                us, ok = await _per_call(contenders[name], calls)
                samples[name].append(us)
                returned_one[name] &= ok
    await cashews.close()
    ttl_samples = samples["cachetools TTLCache in an async function"]
    ratios = {
        name: _summary([a / b for a, b in zip(samples[name], ttl_samples, strict=True)])
        for name in ("pk.SWRCache @cached", "pk.SWRCache.get")
    }
    lru_ratio = _summary(
        [
            a / b
            for a, b in zip(
                samples["pk.SWRCache @cached"], samples["async-lru alru_cache(ttl)"], strict=True
            )
        ]
    )
    hits = swr.statistics().hits
    return {
        "us_per_call": {name: _summary(v) for name, v in samples.items()},
        "ratio_to_ttlcache": ratios,
        "decorated_to_async_lru": lru_ratio,
        "values_correct": returned_one,
        "swr_hits_counted": hits,
        "swr_hits_expected": 2 * (1000 + rounds * n),  # the first call of each was a miss
    }


# -------------------------------------------------------------------- stampedes
async def _stampede(callers: int) -> dict[str, dict[str, Any]]:
    """Loads per ``callers`` concurrent cold callers, refreshes per stale callers."""
    from aiocache import cached as aiocache_cached
    from async_lru import alru_cache
    from cashews import Cache

    out: dict[str, dict[str, Any]] = {}
    values_correct: dict[str, bool] = {}

    async def gather_calls(fn: Callable[[int], Awaitable[Any]], name: str) -> None:
        """``callers`` concurrent calls of ``fn(1)``; every caller must get 1."""
        got = await asyncio.gather(*(fn(1) for _ in range(callers)))
        values_correct[name] = values_correct.get(name, True) and got == [1] * callers

    # -- the playbook's cache: serve from memory, fire a refresh on EVERY hit
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

    await gather_calls(seed_get, "playbook pattern (refresh on every hit)")
    cold = seed_loads
    seed_loads = 0
    await gather_calls(seed_get, "playbook pattern (refresh on every hit)")
    await asyncio.gather(*background)
    out["playbook pattern (refresh on every hit)"] = {
        "cold_loads": cold,
        "stale_refreshes": seed_loads,
    }

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
        await gather_calls(swr_fn, "pk.SWRCache")
        cold = swr_loads
        await asyncio.sleep(0.1)  # now stale
        await gather_calls(swr_fn, "pk.SWRCache")
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

    await gather_calls(lru_fn, "async-lru")
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
    await gather_calls(plain, "cashews @cache")
    await gather_calls(locked, "cashews @cache(lock=True)")
    await gather_calls(early, "cashews @early")
    early_cold = counts["early"]
    await asyncio.sleep(0.1)
    await gather_calls(early, "cashews @early")
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

    await gather_calls(aio_fn, "aiocache @cached")
    out["aiocache @cached"] = {"cold_loads": aio_loads, "stale_refreshes": "no stale mode"}
    for name, ok in values_correct.items():
        out[name]["values_correct"] = ok
    return out


# -------------------------------------------------------------------- batching
async def _batching(keys: int, rounds: int) -> dict[str, Any]:
    """Per-key cost of ``keys`` concurrent loads, three ways, for both loaders.

    * ``gather``: ``asyncio.gather(*(loader.load(k) ...))``. Both ``load``s
      return an asyncio Future here (ours does on asyncio with the loader
      entered), so gather makes no task per key.
    * ``tasks``: ``keys`` concurrent tasks each awaiting ``load`` (the real N+1
      shape: one handler per key); both pay one task per key. Our future is also
      a coroutine (``tg.start_soon(loader.load, k)`` works), and asyncio's Task
      waits on a Future subclass a little slower than on an exact Future.
    * ``load_many``: one ``load_many(keys)`` call.

    Each round runs every form once, in a rotated order, and the two loaders of a
    form back to back (alternating which goes first); a sample is the best of
    three runs. The values every caller got are checked against the keys.
    """
    from aiodataloader import DataLoader

    async def load_many(ks: list[int]) -> list[int]:
        return ks

    def pk_loader() -> pk.BatchLoader[int, int]:
        return pk.BatchLoader(load_many, max_batch=keys)

    def dl_loader() -> Any:
        return DataLoader(load_many, max_batch_size=keys, cache=False)

    async def gather_form(loader: Any) -> list[int]:
        return list(await asyncio.gather(*(loader.load(k) for k in range(keys))))

    async def tasks_form(loader: Any) -> list[int]:
        got = [0] * keys

        async def one(k: int) -> None:
            got[k] = await loader.load(k)

        async with asyncio.TaskGroup() as tg:
            for k in range(keys):
                tg.create_task(one(k))
        return got

    async def load_many_form(loader: Any) -> list[int]:
        return list(await loader.load_many(list(range(keys))))

    async def pk_round(form: Callable[[Any], Awaitable[list[int]]]) -> list[int]:
        async with pk_loader() as loader:
            return await form(loader)

    async def dl_round(form: Callable[[Any], Awaitable[list[int]]]) -> list[int]:
        return await form(dl_loader())

    forms = {"gather": gather_form, "tasks": tasks_form, "load_many": load_many_form}
    loaders = {"pk.BatchLoader": pk_round, "aiodataloader": dl_round}
    samples: dict[tuple[str, str], list[float]] = {
        (form, name): [] for form in forms for name in loaders
    }
    correct = True

    async def sample(form_name: str, name: str) -> float:
        """Seconds per key: the best of three back-to-back runs (one preemption is noise)."""
        nonlocal correct
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            got = await loaders[name](forms[form_name])
            best = min(best, time.perf_counter() - start)
            correct &= got == list(range(keys))
        return best / keys * 1e6

    for form_name in forms:  # warm up
        for name in loaders:
            await sample(form_name, name)
    for round_ in range(rounds):
        for form_name in _rotated(list(forms), round_):
            # the two loaders of a form run back to back, first one then the other
            for name in list(loaders)[:: 1 if round_ % 2 else -1]:
                samples[form_name, name].append(await sample(form_name, name))
    out: dict[str, Any] = {"correct": correct}
    for form_name in forms:
        ours, theirs = samples[form_name, "pk.BatchLoader"], samples[form_name, "aiodataloader"]
        out[form_name] = {
            "pk.BatchLoader": _summary(ours),
            "aiodataloader": _summary(theirs),
            "ratio": _summary([a / b for a, b in zip(ours, theirs, strict=True)]),
        }
    return out


# -------------------------------------------------------------------------- run
def _range(v: dict[str, float]) -> str:
    return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"


def _targets(
    hits: dict[str, Any], stampede: dict[str, dict[str, Any]], batching: dict[str, Any]
) -> list[dict[str, Any]]:
    """The targets, from the measurements. Single flight is exactly one load (and one
    refresh): 0 is not "at most 1", it is a cache that did not load."""
    ratio = hits["ratio_to_ttlcache"]
    swr = stampede["pk.SWRCache"]
    targets = [
        target(
            "SWRCache @cached hit / TTLCache-in-async hit (median of per-round ratios)",
            ratio["pk.SWRCache @cached"]["median"],
            1.0,
        ),
        target(
            "SWRCache.get hit / TTLCache-in-async hit (median of per-round ratios)",
            ratio["pk.SWRCache.get"]["median"],
            1.0,
        ),
        target(
            "SWRCache @cached hit / async-lru hit", hits["decorated_to_async_lru"]["median"], 1.0
        ),
        target(
            "SWRCache counted every hit (correctness, 1 = yes)",
            float(hits["swr_hits_counted"] == hits["swr_hits_expected"]),
            1.0,
            below=False,
        ),
        exactly("SWRCache loads per 1,000 cold callers", swr["cold_loads"], 1),
        exactly("SWRCache refreshes per 1,000 stale callers", swr["stale_refreshes"], 1),
        target(
            "BatchLoader and aiodataloader gave every caller its value (1 = yes)",
            float(batching["correct"]),
            1.0,
            below=False,
        ),
    ]
    for form, note in (
        ("tasks", "one task per caller, the N+1 shape"),
        ("load_many", "one load_many call"),
        ("gather", "asyncio.gather of loads: both return Futures, no task per key"),
    ):
        targets.append(
            target(
                f"BatchLoader / aiodataloader per-key cost, {note}",
                batching[form]["ratio"]["median"],
                1.0,
            )
        )
    return targets


def _wrong(
    hits: dict[str, Any], stampede: dict[str, dict[str, Any]], batching: dict[str, Any]
) -> list[str]:
    """Every wrong result (a value a caller got, a count): each fails the run."""
    wrong = [
        f"hot hit: {name} returned a wrong value"
        for name, ok in hits["values_correct"].items()
        if not ok
    ]
    wrong += [
        f"stampede: {name} gave a caller a wrong value"
        for name, row in stampede.items()
        if not row.get("values_correct", False)
    ]
    if hits["swr_hits_counted"] != hits["swr_hits_expected"]:
        wrong.append(
            f"SWRCache counted {hits['swr_hits_counted']} hits, expected "
            f"{hits['swr_hits_expected']}"
        )
    if not batching["correct"]:
        wrong.append("BatchLoader or aiodataloader gave a caller a wrong value")
    return wrong


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    # short samples, many rounds: neighbours in a round see the same machine load
    n, rounds = (3_000, 13) if quick else (20_000, 61)
    callers = 1000
    keys, batch_rounds = (500, 5) if quick else (500, 31)

    hits = asyncio.run(_hot_hits(n, rounds))
    print(
        table(
            [f"hot hit (asyncio), {rounds} interleaved rounds", "µs / call: median (range)"],
            [[k, _range(v)] for k, v in hits["us_per_call"].items()],
        )
    )
    print()
    print(
        table(
            ["ratio per round, same round", "median (range)"],
            [[f"{k} / TTLCache-in-async", _range(v)] for k, v in hits["ratio_to_ttlcache"].items()]
            + [["pk.SWRCache @cached / async-lru", _range(hits["decorated_to_async_lru"])]],
        )
    )
    stampede = asyncio.run(_stampede(callers))
    print()
    print(
        table(
            [f"{callers} concurrent callers", "loads (cold)", "refreshes (stale)"],
            [[k, v["cold_loads"], v["stale_refreshes"]] for k, v in stampede.items()],
        )
    )
    batching = asyncio.run(_batching(keys, batch_rounds))
    print()
    print(
        table(
            [
                f"{keys} concurrent loads (asyncio), {batch_rounds} rounds",
                "pk.BatchLoader µs/key",
                "aiodataloader µs/key",
                "ratio per round",
            ],
            [
                [form, _range(v["pk.BatchLoader"]), _range(v["aiodataloader"]), _range(v["ratio"])]
                for form, v in batching.items()
                if form != "correct"
            ],
        )
    )

    targets = _targets(hits, stampede, batching)
    wrong = _wrong(hits, stampede, batching)
    print()
    print_targets(targets)
    return {
        "wrong": wrong,
        "hot_hit": hits,
        "stampede": stampede,
        "batching_us_per_key": batching,
        "targets": targets,
        "sizes": {
            "hit_calls_per_sample": n,
            "hit_rounds": rounds,
            "callers": callers,
            "keys": keys,
            "batch_rounds": batch_rounds,
        },
    }
