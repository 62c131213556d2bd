"""Counts accept any integer that implements ``__index__`` (a NumPy integer, say).

``pk.map(f, items, limit=np.int64(4))`` and ``limit=len(df) // 4`` are everyday
code; the checker takes such a value and returns a plain ``int``, and every call
site stores and uses that int, never the original object. ``Index`` below is the
smallest such integer: it has ``__index__`` and nothing else, so a call site that
kept it would fail at its first arithmetic or comparison. Bools stay refused,
floats too, with the messages they always had.
"""

from __future__ import annotations

import enum
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import parallelkit as pk
from parallelkit import probes
from parallelkit._core.check import count, count_or_none

pytestmark = pytest.mark.anyio


class Index:
    """An integer-like object with only ``__index__``, as NumPy integers have."""

    __slots__ = ("_value",)

    def __init__(self, value: int) -> None:
        self._value = value

    def __index__(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"Index({self._value})"


class BadIndex:
    """``__index__`` that says no (a NumPy array with more than one element)."""

    def __index__(self) -> int:
        msg = "only integer scalar arrays can be converted to a scalar index"
        raise TypeError(msg)

    def __repr__(self) -> str:
        return "BadIndex()"


class Colour(enum.IntEnum):
    RED = 3


def _plain(value: object, expected: int) -> None:
    assert type(value) is int
    assert value == expected


# ------------------------------------------------------------------------ the checker
def test_count_returns_a_plain_int_for_an_index_object() -> None:
    _plain(count("limit", Index(4)), 4)
    _plain(count_or_none("limit", Index(4)), 4)
    _plain(count("n", Index(0), minimum=0), 0)
    _plain(count("limit", Colour.RED), 3)  # an int subclass comes back as a plain int
    assert count_or_none("limit", None) is None


def test_an_index_object_below_the_minimum_is_a_value_error_showing_it() -> None:
    with pytest.raises(ValueError, match=r"^limit must be >= 1, got Index\(0\)$"):
        count("limit", Index(0))
    with pytest.raises(ValueError, match=r"^width must be >= 10, got Index\(9\)$"):
        count("width", Index(9), minimum=10)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(True, "True"), (False, "False"), (4.0, "4.0"), ("4", "'4'"), (None, "None")],
)
def test_bools_floats_and_others_are_refused_as_before(value: object, shown: str) -> None:
    with pytest.raises(TypeError, match=rf"^limit must be an int, got {shown}$"):
        count("limit", value)
    if value is not None:
        with pytest.raises(TypeError, match=rf"^limit must be an int, or None, got {shown}$"):
            count_or_none("limit", value, extra="or None")


def test_an_index_that_refuses_is_a_type_error_naming_the_argument() -> None:
    with pytest.raises(TypeError, match=r"^limit must be an int, got BadIndex\(\)$") as info:
        count("limit", BadIndex())
    assert isinstance(info.value.__cause__, TypeError)  # its own reason stays reachable


def test_numpy_integers_are_counts_and_numpy_bools_are_not() -> None:
    np = pytest.importorskip("numpy")
    _plain(count("limit", np.int64(4)), 4)
    _plain(count("limit", np.uint8(4)), 4)
    with pytest.raises(TypeError, match=r"^limit must be an int, got "):
        count("limit", np.True_)
    with pytest.raises(TypeError, match=r"^limit must be an int, got "):
        count("limit", np.float64(4.0))
    assert pk.Limiter(concurrency=np.int64(2)).statistics().concurrency == 2


# ------------------------------------------------------------------- public arguments
def test_synchronous_options_store_a_plain_int() -> None:
    limiter = pk.Limiter(concurrency=Index(3), rate=10, burst=Index(2))
    _plain(limiter.statistics().concurrency, 3)
    assert "concurrency=3" in repr(limiter)
    retry = pk.Retry(attempts=Index(4))
    _plain(retry.attempts, 4)
    assert retry == pk.Retry(attempts=4)
    with pytest.raises(TypeError, match=r"^attempts must be an int, got True$"):
        pk.Retry(attempts=True)
    with pytest.raises(TypeError, match=r"^burst must be an int, got 2.0$"):
        pk.Limiter(rate=1, burst=2.0)  # type: ignore[arg-type]


def test_probes_take_index_ports_and_status_codes() -> None:
    probe = probes.tcp("127.0.0.1", Index(6379))  # type: ignore[arg-type]
    assert probe.name == "tcp 127.0.0.1:6379"
    with pytest.raises(ValueError, match=r"^port must be <= 65535, got Index\(70000\)$"):
        probes.tcp("127.0.0.1", Index(70000))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^port must be an int, got True$"):
        probes.tcp("127.0.0.1", True)
    probes.http("http://127.0.0.1:8000/", status=Index(204))  # type: ignore[arg-type]
    probes.http("http://127.0.0.1:8000/", status=[Index(200), 204])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^status must be an int or a non-empty collection"):
        probes.http("http://127.0.0.1:8000/", status=True)
    with pytest.raises(TypeError, match=r"^status must be an int or a non-empty collection"):
        probes.http("http://127.0.0.1:8000/", status=200.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^status must be an HTTP status code .* Index\(600\)$"):
        probes.http("http://127.0.0.1:8000/", status=Index(600))  # type: ignore[arg-type]


def test_orchestrator_max_restarts_is_stored_as_a_plain_int() -> None:
    orch = pk.Orchestrator()
    orch.process("worker", ["true"], restart="on-failure", max_restarts=Index(2))  # type: ignore[arg-type]
    _plain(orch._specs["worker"].extra["max_restarts"], 2)
    with pytest.raises(TypeError, match=r"^max_restarts must be an int, or None, got True$"):
        orch.process("other", ["true"], max_restarts=True)


# ---------------------------------------------------------------------- async, both


async def test_map_limit_index_bounds_the_running_items() -> None:
    running = peak = 0

    async def work(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        running -= 1
        return x * 2

    assert await pk.map(work, range(10), limit=Index(2)) == [x * 2 for x in range(10)]  # type: ignore[arg-type]
    assert 1 <= peak <= 2
    with pytest.raises(TypeError, match=r"^limit must be an int, a Limiter or None, got True$"):
        await pk.map(work, range(3), limit=True)
    with pytest.raises(TypeError, match=r"^limit must be an int, a Limiter or None, got 2.0$"):
        await pk.map(work, range(3), limit=2.0)  # type: ignore[arg-type]


async def test_map_retry_attempts_index_retries() -> None:
    calls = 0

    async def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError
        return x

    retry = pk.Retry(attempts=Index(3), backoff=0)
    assert await pk.map(flaky, [7], retry=retry) == [7]
    assert calls == 3


async def test_limiter_with_index_bounds_is_usable() -> None:
    limiter = pk.Limiter(concurrency=Index(1), burst=Index(1))
    async with limiter:
        assert limiter.statistics().running == 1
    assert await pk.map(_double, [1, 2], limit=limiter) == [2, 4]


async def _double(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x * 2


async def test_batch_loader_max_batch_index_splits_batches() -> None:
    sizes: list[int] = []

    async def load_many(keys: list[int]) -> dict[int, int]:
        sizes.append(len(keys))
        return {k: k * 10 for k in keys}

    async with pk.BatchLoader(load_many, max_batch=Index(2)) as loader:  # type: ignore[arg-type]
        assert "max_batch=2," in repr(loader)
        assert await pk.gather(*(loader.load(k) for k in range(5))) == [0, 10, 20, 30, 40]
    assert sum(sizes) == 5
    assert max(sizes) <= 2


async def test_tcp_probe_connects_with_a_plain_int_port(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    async def refuse(host: str, port: object, **_: object) -> None:
        seen.append(port)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(anyio, "connect_tcp", refuse)
    probe = probes.tcp("127.0.0.1", Index(6379))  # type: ignore[arg-type]
    assert await probe.reason() is not None
    assert len(seen) == 1
    _plain(seen[0], 6379)


class _Answer:
    """A connection that answers one HTTP status line."""

    def __init__(self, code: int) -> None:
        self._line = f"HTTP/1.1 {code} X\r\n\r\n".encode()

    async def send(self, _data: bytes) -> None:
        pass

    async def receive(self, _max_bytes: int = 65536) -> bytes:
        return self._line

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> _Answer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        pass


async def test_http_probe_matches_index_status_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    answer = 204

    async def connect(host: str, port: object, **_: object) -> _Answer:
        _plain(port, 8000)
        return _Answer(answer)

    monkeypatch.setattr(anyio, "connect_tcp", connect)
    url = "http://127.0.0.1:8000/health"
    one = probes.http(url, status=Index(204))  # type: ignore[arg-type]
    several = probes.http(url, status=[Index(200), Index(204)])  # type: ignore[list-item]
    assert await one.reason() is None
    assert await several.reason() is None
    answer = 503
    assert await one.reason() == "status 503"
    assert await several.reason() == "status 503"


async def test_flow_limits_and_timeline_width_take_index_ints() -> None:
    flow = pk.Flow("index")

    @flow.step(limit=Index(1))  # type: ignore[arg-type]
    async def a() -> int:
        await anyio.lowlevel.checkpoint()
        return 1

    @flow.step
    async def b(a: int) -> int:
        return a + 1

    result = await flow.run(limit=Index(2))  # type: ignore[arg-type]
    assert result["b"] == 2
    chart = result.timeline.to_text(width=Index(20))  # type: ignore[arg-type]
    assert "2 spans" in chart
    assert chart == result.timeline.to_text(width=20)
    with pytest.raises(TypeError, match=r"^width must be an int, got True$"):
        result.timeline.to_text(width=True)
    with pytest.raises(ValueError, match=r"^width must be >= 10, got Index\(9\)$"):
        result.timeline.to_text(width=Index(9))  # type: ignore[arg-type]


# ------------------------------------------------------------------- integrations
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlalchemy_loader_by_id_max_batch_is_a_plain_int() -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy import Column, Integer
    from sqlalchemy.orm import DeclarativeBase

    from parallelkit.sqlalchemy import loader_by_id

    class Base(DeclarativeBase):
        pass

    class Thing(Base):
        __tablename__ = "index_things"
        id = Column(Integer, primary_key=True)

    loader = loader_by_id(lambda: None, Thing, max_batch=Index(3))  # type: ignore[arg-type]
    assert "max_batch=3," in repr(loader)
    with pytest.raises(TypeError, match=r"^max_batch must be an int, got True$"):
        loader_by_id(lambda: None, Thing, max_batch=True)


def test_taskiq_prefetch_is_passed_on_as_a_plain_int() -> None:
    pytest.importorskip("taskiq_redis")
    from parallelkit.taskiq import redis_broker

    broker = redis_broker("redis://127.0.0.1:6379/0", prefetch=Index(5))  # type: ignore[arg-type]
    _plain(broker.unacknowledged_batch_size, 5)
    _plain(broker.count, 5)  # xread_count
