"""RedisLimiter: a concurrency bound and a start rate shared by many processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Literal

import anyio
from redis.asyncio import Redis
from typing_extensions import Self, final

from .._core.backend import task_id
from .._core.check import (
    callable_with,
    choice,
    clock_reading,
    count,
    count_or_none,
    number,
    number_at_least,
    number_or_none,
    text,
)
from .._core.limiter import Limiter, validate_rate
from .._core.owned import OwnedTaskGroup
from ._common import jittered, lease_seconds, new_token, validate_client
from ._give_back import give_back_once_answered, left_to_expire, timed_out, void_key
from ._lease import keep_renewed
from ._limiter_rate import Line, Turn, Turns
from ._limiter_scripts import ACQUIRE, RENEW, RESERVE, UNRESERVE, VOID, VOID_TURN
from ._outage import Down, Guard
from ._stats import RedisLimiterStatistics

__all__ = ["RedisLimiter", "RedisLimiterStatistics"]

FailMode = Literal["open", "closed", "local"]
_FAIL_MODES: tuple[FailMode, ...] = ("local", "open", "closed")

#: The slowest global rate: a start every 10**9 s (31.7 years); far slower ones overflow Redis.
MIN_RATE = 1e-9


@final
class _Hold:
    """One ``async with``: its slot in Redis (``token``, renewed by ``owner``'s task),
    and with ``fail="local"`` one of the in-process slots (``slot``)."""

    __slots__ = ("owner", "slot", "token")

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.owner: OwnedTaskGroup | None = None
        self.slot = False  # holds one of the in-process slots (``fail="local"``)


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
      holder, scored by its expiry). Acquiring is one Lua script (drop expired
      leases, count, add); releasing removes the token. A holder that dies stops
      renewing and its lease expires after ``lease`` seconds. While a slot is
      held, its lease is renewed every ``lease / 3`` by a small task in a task
      group that belongs to that ``async with`` block (so no background task
      outlives its holder). Waiters poll, sleeping until the earliest lease could
      end but at most ``poll`` seconds (jittered); they are not served first come,
      first served across processes.
    * **rate** is GCRA (the same algorithm as the in-process
      :class:`~parallelkit.Limiter`) in one atomic Lua script: each start reserves
      the next slot and sleeps until it, so no polling. A process's callers wait
      in line, and only the head holds a reservation: a caller that gives up
      passes its turn on, none is lost (as in :class:`~parallelkit.Limiter`).

    Both run on one clock for every process: the Redis server's (``TIME``), unless
    you pass ``clock=`` (then every process must pass the same clock).

    When Redis is unreachable, or a command does not answer within
    ``command_timeout``, ``fail=`` decides:

    * ``"local"`` (default): fall back to an in-process
      :class:`~parallelkit.Limiter` with the same numbers, so each process keeps
      its own bound (the global total may reach ``processes * concurrency``). The
      in-process bound counts every holder of this process, also those whose slot
      came from Redis before the outage: each hold takes an in-process slot first,
      Redis's second (a process never holds more than ``concurrency`` anyway, and
      its waiters beyond that wait in the process, first come first served,
      without polling Redis);
    * ``"open"``: do not limit at all;
    * ``"closed"``: raise :class:`~parallelkit.redis.RedisUnavailable`.

    After an outage error the limiter uses the fallback for ``retry_after``
    seconds without touching Redis, then tries Redis again.

    Args:
        redis: a ``redis.asyncio.Redis`` client.
        name: the shared name: every process using it shares the bounds.
        concurrency: the global maximum of holders at once (``None``: unbounded).
        rate: the global maximum of starts per second (``None``: unlimited; at
            least ``1e-9``, a start every 31.7 years: slower intervals overflow Redis).
        burst: starts that may happen back to back after an idle period.
        lease: seconds a dead holder's slot stays taken (renewed while held); at
            least 0.01, at most ``1e9`` (31.7 years).
        fail: the outage policy: ``"local"``, ``"open"`` or ``"closed"``.
        poll: the longest pause between two attempts while waiting for a slot.
        retry_after: seconds to stay on the fallback after an outage error.
        prefix: a namespace for the Redis keys (``{prefix}:limiter:{name}:...``).
        command_timeout: seconds one Redis command may take before Redis counts
            as unreachable; ``None`` leaves it to the client's own timeouts.
        clock: a zero-argument function returning seconds, shared by every
            process (tests pass a fake one); ``None`` (default): Redis ``TIME``.

    Raises:
        ValueError: a bound, duration or ``fail`` is out of range.
        TypeError: an argument of the wrong type.

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
        "_clock",
        "_concurrency",
        "_fail",
        "_fallbacks",
        "_guard",
        "_holders_key",
        "_holds",
        "_lease",
        "_line",
        "_local",
        "_lost",
        "_name",
        "_poll",
        "_rate",
        "_redis",
        "_renew_script",
        "_reserve_script",
        "_slots",
        "_turns",
        "_unreserve_script",
        "_void_script",
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
        command_timeout: float | None = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        validate_client(redis)
        self._redis = redis
        self._name = text("name", name)
        text("prefix", prefix)
        self._concurrency = count_or_none("concurrency", concurrency)
        self._rate = validate_rate(rate)
        if self._rate is not None:  # a start interval Redis can store
            number_at_least("rate", rate, MIN_RATE, unit="starts per second")
        self._burst = count("burst", burst)
        self._lease = lease_seconds("lease", lease)
        self._fail: FailMode = choice("fail", fail, _FAIL_MODES)
        self._poll = number("poll", poll)
        self._guard = Guard(
            timeout=number_or_none("command_timeout", command_timeout),
            retry_after=number("retry_after", retry_after),
            redis=redis,
        )
        # a plain function of no arguments: an async one's coroutine is no time
        self._clock = None if clock is None else callable_with("clock", clock, 0, what="a callable")
        # fail="local": every hold takes one of this process's ``concurrency`` slots
        # first, so the fallback's bound counts the holders whose slot came from Redis
        # too; the fallback's own limiter is the rate only
        local = self._fail == "local"
        concurrency = self._concurrency if local else None
        self._slots = Limiter(concurrency=concurrency) if concurrency else None
        self._local = Limiter(rate=self._rate, burst=burst) if local and self._rate else None
        base = f"{prefix}:limiter:{{{name}}}"  # hash tag: one cluster slot per limiter
        self._holders_key = f"{base}:holders"
        self._acquire_script = redis.register_script(ACQUIRE)
        self._renew_script = redis.register_script(RENEW)
        self._reserve_script = redis.register_script(RESERVE)
        self._unreserve_script = redis.register_script(UNRESERVE)
        self._void_script = redis.register_script(VOID)
        self._line = Line()  # this process's callers waiting for a start
        self._turns = Turns(
            self._guard,
            self._reserve_script,
            self._unreserve_script,
            redis.register_script(VOID_TURN),
            f"{base}:rate",
            line=self._line,
            interval_ms=1000.0 / self._rate if self._rate is not None else 0.0,
            burst=self._burst,
            now=self._now,
            what=self._what,
            lease=self._lease,
            poll=self._poll,
        )
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
            redis_errors=self._guard.errors,
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

    @property
    def _what(self) -> str:
        return f"RedisLimiter {self._name!r}"

    # -- Redis paths -----------------------------------------------------------------
    def _now(self) -> str:
        """The scripts' last argument: our clock in ms, or "" for Redis TIME."""
        if self._clock is None:
            return ""
        now = self._clock()
        clock_reading("clock", now)  # a clock that returns no finite number is named
        return repr(float(now) * 1000)

    async def _take_slot(self) -> tuple[str, float]:
        """A slot's token, and when the script that took it was sent (anyio's clock)."""
        token = new_token()
        assert self._concurrency is not None
        lease_ms = round(self._lease * 1000)
        keys = [self._holders_key, void_key(self._holders_key, token)]
        self._waiting += 1
        try:
            while True:
                args: list[float | str] = [token, self._concurrency, lease_ms, self._now()]
                command = self._acquire_script(keys=keys, args=args)
                sent = anyio.current_time()
                try:
                    wait_ms = int(await self._guard.call("acquire", command))
                except BaseException as exc:
                    # cancelled (or timed out, or the connection reset) with the reply on
                    # its way: the script may have taken the slot (nobody would give it
                    # back before ``lease``), or run later (VOID: it takes nothing then);
                    # not when it was never sent. Timed out: a stalled Redis may run it
                    # when it answers again: a give-back is tried until Redis answers one
                    if not isinstance(exc, Down) or exc.sent:
                        with contextlib.suppress(Exception):  # raise the acquire's error
                            if timed_out(exc):
                                await give_back_once_answered(
                                    self._guard,
                                    lambda: self._void_script(keys=keys, args=[token, lease_ms]),
                                    until=sent + self._lease,
                                    pause=self._poll,
                                )
                            else:
                                await self._give_back(token, log=False, void=True)
                    raise
                if wait_ms == 0:
                    return token, sent
                await anyio.sleep(jittered(min(self._poll, wait_ms / 1000)))
        finally:
            self._waiting -= 1

    async def _reserve(self) -> Turn:
        """Reserve the next start: the seconds to wait for it, and how to give it back
        (called by the head of the line; raising, it has passed the line on)."""
        return await self._turns.reserve()

    async def _give_back(self, token: str, *, log: bool = True, void: bool = False) -> None:
        """Give the slot of ``token`` back in Redis (``void``: by ``VOID``, which also
        leaves a tombstone: its acquire may not have run yet, see :meth:`_take_slot`).

        Shielded, and bounded (a free connection included): else the lease expires,
        as when Redis is down or refuses the write (``log``: log a refusal, not when
        the caller raises an error of its own). Sent even while the guard's circuit
        is open (a slot Redis gave us is given back there, or every process would be
        a slot short for ``lease`` seconds after one failed command, this caller's
        or another's).
        """
        limit = self._lease if self._guard.timeout is None else self._guard.timeout
        what = self._what if log else None
        with anyio.move_on_after(min(limit, self._lease), shield=True), left_to_expire(what):
            if not void:
                command = self._redis.zrem(self._holders_key, token)
            else:
                keys = [self._holders_key, void_key(self._holders_key, token)]
                command = self._void_script(keys=keys, args=[token, round(self._lease * 1000)])
            await self._guard.call("release", command, force=True, timeout=self._lease)

    async def _renew_forever(self, token: str, since: float) -> None:
        lease_ms = round(self._lease * 1000)
        await keep_renewed(
            self._guard,
            self._lease,
            lambda: self._renew_script(
                keys=[self._holders_key], args=[token, lease_ms, self._now()]
            ),
            what=self._what,
            since=since,
        )
        self._lost += 1  # counted; the holder finishes its work regardless

    async def _acquire_redis(self) -> _Hold:
        hold = _Hold(None)
        if self._concurrency is not None:
            token, since = await self._take_slot()
            # renewed from now on: the wait for the rate below may outlast the lease
            owner = OwnedTaskGroup(f"a hold of {self!r}")
            try:
                tg = await owner.enter()
                tg.start_soon(self._renew_forever, token, since, name="RedisLimiter renewal")
            except BaseException:
                await self._give_back(token)
                raise
            hold.token, hold.owner = token, owner
        if self._rate is not None:
            try:
                await self._wait_rate()
            except BaseException as exc:
                await self._let_go(hold, type(exc), exc, exc.__traceback__)
                raise
        return hold

    async def _wait_rate(self) -> None:
        """Wait for a start: in line (first come, first served), then, at the head,
        reserve one in Redis and sleep until it (see :mod:`._limiter_rate`)."""
        await self._line.join()
        turn = await self._reserve()  # raising, it has passed the line on
        try:
            if turn.delay > 0:
                try:
                    await anyio.sleep(turn.delay)
                except BaseException:
                    await self._turns.give_back(turn)  # a start that never happened
                    raise
        finally:
            self._line.pass_on()

    async def _acquire(self) -> _Hold:
        slots = self._slots
        if slots is None:
            return await self._acquire_here()
        self._waiting += 1
        try:
            await slots.acquire_slot()
        finally:
            self._waiting -= 1
        try:
            hold = await self._acquire_here()
        except BaseException:
            slots.release()
            raise
        hold.slot = True
        return hold

    async def _acquire_here(self) -> _Hold:
        """A hold from Redis, or from the ``fail=`` policy when Redis is down."""
        try:
            return await self._acquire_redis()
        except Down as down:
            if self._fail == "closed":
                error = down.unavailable(self._what, "fail='closed'")
                raise error from down.cause
        self._fallbacks += 1
        local = self._local
        if local is None:  # fail="open", or "local" with no rate (the slot is taken)
            return _Hold(None)
        self._waiting += 1
        try:
            await local.wait_rate()
        finally:
            self._waiting -= 1
        return _Hold(None)

    # -- async with -------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        hold = await self._acquire()
        self._holds.setdefault(task_id(), []).append(hold)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task = task_id()
        stack = self._holds.get(task)
        if not stack:
            msg = f"{self!r}: __aexit__ without a matching __aenter__ in this task"
            raise RuntimeError(msg)
        hold = stack.pop()
        if not stack:
            del self._holds[task]
        return await self._let_go(hold, exc_type, exc, tb)

    async def _let_go(
        self,
        hold: _Hold,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Stop the hold's renewal and give its slot back."""
        try:
            if hold.owner is not None:  # stop the renewal
                return bool(await hold.owner.exit(exc_type, exc, tb, cancel=True))
            return False
        finally:
            try:
                if hold.token is not None:  # also when the rate's reservation found Redis down
                    await self._give_back(hold.token)
            finally:
                if hold.slot:
                    assert self._slots is not None
                    self._slots.release()
