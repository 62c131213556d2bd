"""RedisLimiter: a concurrency bound and a start rate shared by many processes."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from typing_extensions import Self, final

from .._core.check import number
from .._core.limiter import Limiter, validate_limit, validate_rate
from ._common import (
    OUTAGE_ERRORS,
    Outage,
    RedisUnavailable,
    is_outage,
    jittered,
    new_token,
    validate_client,
    validate_lease_seconds,
    validate_name,
)

__all__ = ["RedisLimiter", "RedisLimiterStatistics"]

FailMode = Literal["open", "closed", "local"]

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""
# KEYS[1] holders zset (token -> lease expiry, ms); ARGV[1] token, ARGV[2] limit,
# ARGV[3] lease (ms). Returns 0 when the slot is taken, else ms until a lease ends.
_ACQUIRE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease))
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = math.ceil(tonumber(first[2]) - now)
if wait < 1 then wait = 1 end
return wait
"""
)
# KEYS[1] holders; ARGV[1] token, ARGV[2] lease (ms). 1 if the lease was still held.
_RENEW = (
    _NOW_MS
    + """
local lease = tonumber(ARGV[2])
local changed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[1])
if changed == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease))
end
return changed
"""
)
# KEYS[1] the GCRA "theoretical arrival time" (ms); ARGV[1] interval (ms), ARGV[2]
# burst. Reserves the next start; returns how long to wait for it (ms, a string).
_RESERVE = (
    _NOW_MS
    + """
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local start = tat - (tonumber(ARGV[2]) - 1) * interval
if start < now then start = now end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return string.format('%.3f', start - now)
"""
)


@final
@dataclass(frozen=True, slots=True)
class RedisLimiterStatistics:
    """A snapshot of a :class:`~parallelkit.redis.RedisLimiter`, for this process.

    Attributes:
        concurrency: the configured global bound, or ``None``.
        rate: the configured global starts per second, or ``None``.
        held: slots this process holds right now (Redis or fallback).
        waiting: tasks of this process waiting for a slot.
        redis_errors: Redis outage errors seen so far.
        fallbacks: acquisitions served by the ``fail=`` policy instead of Redis.
        lost_leases: leases that expired while held (the holder was unreachable
            for longer than ``lease``).
    """

    concurrency: int | None
    rate: float | None
    held: int
    waiting: int
    redis_errors: int
    fallbacks: int
    lost_leases: int


@final
class _Hold:
    __slots__ = ("local", "tg", "token")

    def __init__(self, token: str | None, local: bool, tg: TaskGroup | None) -> None:
        self.token = token
        self.local = local
        self.tg = tg


@final
class RedisLimiter:
    """A :class:`~parallelkit.Limiter` whose bounds hold across every process.

    A partner API allows 10 concurrent calls and 25 per second *per account*, and
    your service runs on six replicas: a local limiter in each replica would allow
    60 and 150. Give each replica a ``RedisLimiter`` with the same ``name`` and the
    numbers hold globally. It is accepted wherever ``limit=`` takes a limiter
    (:func:`~parallelkit.map`, :func:`~parallelkit.gather`, ``Flow.run``…) and
    works directly with ``async with limiter:``.

    How it works:

    * **concurrency** is a Redis sorted set of *leases* (a random token per
      holder, scored by its expiry on the Redis clock). Acquiring is one Lua
      script (drop expired leases, count, add); releasing removes the token. A
      holder that dies stops renewing and its lease expires after ``lease``
      seconds. While a slot is held, its lease is renewed every ``lease / 3`` by a
      small task in a task group that belongs to that ``async with`` block (so no
      background task outlives its holder). Waiters poll, sleeping until the
      earliest lease could end but at most ``poll`` seconds (jittered); they are
      not served first come, first served across processes.
    * **rate** is GCRA (the same algorithm as the in-process
      :class:`~parallelkit.Limiter`) in one atomic Lua script on the Redis clock:
      each start reserves the next slot and sleeps until it, so no polling.

    When Redis is unreachable, ``fail=`` decides:

    * ``"local"`` (default): fall back to an in-process
      :class:`~parallelkit.Limiter` with the same numbers, so each process keeps
      its own bound (the global total may reach ``processes * concurrency``);
    * ``"open"``: do not limit at all;
    * ``"closed"``: raise :class:`~parallelkit.redis.RedisUnavailable`.

    After an outage error the limiter uses the fallback for ``retry_after``
    seconds without touching Redis, then tries Redis again.

    Args:
        redis: a ``redis.asyncio.Redis`` client.
        name: the shared name: every process using it shares the bounds.
        concurrency: the global maximum of holders at once (``None``: unbounded).
        rate: the global maximum of starts per second (``None``: unlimited).
        burst: starts that may happen back to back after an idle period.
        lease: seconds a dead holder's slot stays taken (renewed while held).
        fail: the outage policy: ``"local"``, ``"open"`` or ``"closed"``.
        poll: the longest pause between two attempts while waiting for a slot.
        retry_after: seconds to stay on the fallback after an outage error.
        prefix: a namespace for the Redis keys (``{prefix}:limiter:{name}:...``).

    Raises:
        ValueError: a bound, ``lease``, ``poll`` or ``fail`` is out of range.

    Example:
        ```python
        partner = RedisLimiter(redis, "partner-api", concurrency=10, rate=25)

        async with partner:
            await call_partner()

        await pk.map(sync_company, company_ids, limit=partner)
        ```
    """

    __slots__ = (
        "_acquire_script",
        "_burst",
        "_concurrency",
        "_fail",
        "_fallbacks",
        "_holders_key",
        "_holds",
        "_interval_ms",
        "_lease",
        "_local",
        "_lost",
        "_name",
        "_outage",
        "_poll",
        "_rate",
        "_rate_key",
        "_redis",
        "_renew_script",
        "_reserve_script",
        "_waiting",
    )

    def __init__(
        self,
        redis: Redis,
        name: str,
        /,
        *,
        concurrency: int | None = None,
        rate: float | None = None,
        burst: int = 1,
        lease: float = 30.0,
        fail: FailMode = "local",
        poll: float = 0.05,
        retry_after: float = 1.0,
        prefix: str = "pk",
    ) -> None:
        validate_client(redis)
        self._redis = redis
        self._name = validate_name(name)
        validate_name(prefix, "prefix")
        self._concurrency = validate_limit(concurrency, "concurrency")
        self._rate = validate_rate(rate)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            msg = f"burst must be an int >= 1, got {burst!r}"
            raise ValueError(msg)
        self._burst = burst
        self._lease = validate_lease_seconds(lease, "lease")
        poll_s = number("poll", poll, finite=True)
        retry_s = number("retry_after", retry_after, finite=True)
        self._poll = poll_s
        if fail not in ("open", "closed", "local"):
            msg = f"fail must be 'open', 'closed' or 'local', got {fail!r}"
            raise ValueError(msg)
        self._fail: FailMode = fail
        self._local = Limiter(self._concurrency, self._rate, burst=burst)
        self._outage = Outage(retry_s)
        base = f"{prefix}:limiter:{{{name}}}"  # hash tag: one cluster slot per limiter
        self._holders_key = f"{base}:holders"
        self._rate_key = f"{base}:rate"
        self._interval_ms = 1000.0 / self._rate if self._rate is not None else 0.0
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._renew_script = redis.register_script(_RENEW)
        self._reserve_script = redis.register_script(_RESERVE)
        self._holds: dict[int, list[_Hold]] = {}
        self._waiting = 0
        self._fallbacks = 0
        self._lost = 0

    # -- introspection -------------------------------------------------------------
    @property
    def concurrency(self) -> int | None:
        """The global concurrency bound, or ``None`` (``SupportsLimit``)."""
        return self._concurrency

    @property
    def rate(self) -> float | None:
        """The global rate in starts per second, or ``None``."""
        return self._rate

    @property
    def burst(self) -> int:
        """How many starts may happen back to back."""
        return self._burst

    @property
    def name(self) -> str:
        """The shared name."""
        return self._name

    @property
    def fail(self) -> FailMode:
        """The outage policy."""
        return self._fail

    def statistics(self) -> RedisLimiterStatistics:
        """Return a frozen snapshot of this process's view of the limiter."""
        return RedisLimiterStatistics(
            concurrency=self._concurrency,
            rate=self._rate,
            held=sum(len(stack) for stack in self._holds.values()),
            waiting=self._waiting,
            redis_errors=self._outage.errors,
            fallbacks=self._fallbacks,
            lost_leases=self._lost,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"RedisLimiter({self._name!r}, concurrency={self._concurrency!r}, "
            f"rate={self._rate!r}, burst={self._burst}, fail={self._fail!r}, "
            f"held={stats.held}, waiting={stats.waiting})"
        )

    # -- Redis paths -----------------------------------------------------------------
    async def _take_slot(self) -> str:
        token = new_token()
        assert self._concurrency is not None
        args: list[str | int] = [token, self._concurrency, round(self._lease * 1000)]
        self._waiting += 1
        try:
            while True:
                wait_ms = int(await self._acquire_script(keys=[self._holders_key], args=args))
                if wait_ms == 0:
                    return token
                await anyio.sleep(jittered(min(self._poll, wait_ms / 1000)))
        finally:
            self._waiting -= 1

    async def _give_back(self, token: str) -> None:
        with anyio.move_on_after(self._lease, shield=True):
            try:
                await self._redis.zrem(self._holders_key, token)
            except OUTAGE_ERRORS as exc:
                self._outage.failed(exc)  # the lease expires on its own

    async def _renew_forever(self, token: str) -> None:
        lease_ms = round(self._lease * 1000)
        while True:
            await anyio.sleep(self._lease / 3)
            try:
                reply = await self._renew_script(keys=[self._holders_key], args=[token, lease_ms])
            except OUTAGE_ERRORS as exc:
                self._outage.failed(exc)
                continue
            if not int(reply):
                self._lost += 1  # counted; the holder finishes its work regardless
                return

    async def _acquire_redis(self) -> _Hold:
        token: str | None = None
        if self._concurrency is not None:
            token = await self._take_slot()
        try:
            if self._rate is not None:
                reply = await self._reserve_script(
                    keys=[self._rate_key], args=[self._interval_ms, self._burst]
                )
                delay = float(reply) / 1000
                if delay > 0:
                    await anyio.sleep(delay)
        except BaseException:
            if token is not None:
                await self._give_back(token)
            raise
        self._outage.succeeded()
        return _Hold(token, local=False, tg=None)

    async def _acquire(self) -> _Hold:
        if not self._outage.down:
            try:
                return await self._acquire_redis()
            except OUTAGE_ERRORS as exc:
                if not is_outage(exc):
                    raise
                self._outage.failed(exc)
                if self._fail == "closed":
                    msg = f"RedisLimiter {self._name!r}: Redis unreachable (fail='closed')"
                    raise RedisUnavailable(msg) from exc
        elif self._fail == "closed":
            msg = f"RedisLimiter {self._name!r}: Redis unreachable (fail='closed')"
            raise RedisUnavailable(msg) from self._outage.last_error
        self._fallbacks += 1
        if self._fail == "open":
            return _Hold(None, local=False, tg=None)
        self._waiting += 1
        try:
            await self._local.acquire()
        finally:
            self._waiting -= 1
        return _Hold(None, local=True, tg=None)

    # -- async with -------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        hold = await self._acquire()
        if hold.token is not None:
            tg = anyio.create_task_group()
            try:
                await tg.__aenter__()
                tg.start_soon(self._renew_forever, hold.token, name="RedisLimiter renewal")
            except BaseException:
                await self._give_back(hold.token)
                raise
            hold.tg = tg
        self._holds.setdefault(anyio.get_current_task().id, []).append(hold)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task_id = anyio.get_current_task().id
        stack = self._holds.get(task_id)
        if not stack:
            msg = f"{self!r}: __aexit__ without a matching __aenter__ in this task"
            raise RuntimeError(msg)
        hold = stack.pop()
        if not stack:
            del self._holds[task_id]
        try:
            if hold.tg is not None:
                hold.tg.cancel_scope.cancel()  # stop the renewal
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    return bool(await hold.tg.__aexit__(exc_type, exc, tb))
                await hold.tg.__aexit__(None, None, None)
            return False
        finally:
            if hold.local:
                self._local.release()
            elif hold.token is not None:
                await self._give_back(hold.token)
