"""Orchestrator: graph start, readiness, timeout, retry, rollback, shutdown, health."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

import parallelkit as pk

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


class Recorder:
    """Records set-ups and tear-downs (with times) of generator services."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.times: dict[str, float] = {}
        self.open: set[str] = set()

    def service(
        self,
        orch: pk.Orchestrator,
        name: str,
        *deps: str,
        delay: float = 0.0,
        fail: BaseException | None = None,
        teardown_delay: float = 0.0,
        **options: Any,
    ) -> None:
        rec = self

        async def lifetime(**kwargs: Any) -> AsyncIterator[str]:
            rec.times[f"start {name}"] = anyio.current_time()
            await anyio.sleep(delay)
            if fail is not None:
                raise fail
            rec.events.append(f"up {name}")
            rec.open.add(name)
            rec.times[f"up {name}"] = anyio.current_time()
            try:
                yield f"{name}({','.join(str(kwargs[d]) for d in deps)})"
            finally:
                await anyio.sleep(teardown_delay)
                rec.events.append(f"down {name}")
                rec.open.discard(name)
                rec.times[f"down {name}"] = anyio.current_time()

        # give the generator the dependency parameters by name
        params = ", ".join(deps)
        namespace: dict[str, Any] = {"inner": lifetime}
        exec(
            f"async def {name}({params}):\n"
            f"    async for v in inner({', '.join(f'{d}={d}' for d in deps)}):\n"
            "        yield v\n",
            namespace,
        )
        orch.service(**options)(namespace[name])


async def test_three_shapes_and_injection() -> None:
    orch = pk.Orchestrator()
    torn: list[str] = []

    @orch.service
    async def config() -> dict[str, int]:
        return {"port": 1}

    @orch.service
    @asynccontextmanager
    async def pool(config: dict[str, int]) -> AsyncIterator[str]:
        yield f"pool:{config['port']}"
        torn.append("pool")

    @orch.service
    async def app(pool: str, config: dict[str, int], debug: bool = False) -> AsyncIterator[str]:
        yield f"app[{pool},{debug}]"
        torn.append("app")

    async with orch.start() as running:
        assert running["app"] == "app[pool:1,False]"
        assert running.get(pool) == "pool:1"
        assert running.get(config) == {"port": 1}
        assert running.get("app") == "app[pool:1,False]"
        assert list(running) == ["config", "pool", "app"]
        assert "app" in running
        assert "nope" not in running
        assert len(running) == 3
        assert running.state("app") == "ready"
        with pytest.raises(KeyError, match="no service named 'nope'"):
            running["nope"]
    assert torn == ["app", "pool"]
    assert running.state("app") == "stopped"


async def test_independent_services_start_in_parallel() -> None:
    orch = pk.Orchestrator()
    started: list[str] = []
    all_started = anyio.Event()

    def make(name: str) -> Any:
        async def lifetime() -> AsyncIterator[str]:
            started.append(name)
            if len(started) == 3:
                all_started.set()
            await all_started.wait()  # one after the other would never get here
            yield name

        return lifetime

    for name in ("a", "b", "c"):
        orch.service(name=name)(make(name))
    with anyio.fail_after(10):
        async with orch.start() as running:
            assert sorted(running) == sorted(started) == ["a", "b", "c"]
    assert all(running.timeline[n].waited_for == () for n in "abc")


async def test_dependent_waits_for_readiness_not_just_setup() -> None:
    orch = pk.Orchestrator()
    ready_at: list[float] = []
    became_ready = anyio.Event()

    async def is_ready() -> bool:
        if became_ready.is_set():
            ready_at.append(anyio.current_time())
            return True
        return False

    @orch.service(ready=pk.probes.call(is_ready), timeout=5)
    async def db() -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def warm_up() -> None:
                await anyio.sleep(0.1)
                became_ready.set()

            tg.start_soon(warm_up)
            yield "db"

    started: list[float] = []

    @orch.service
    async def api(db: str) -> str:
        started.append(anyio.current_time())
        return "api"

    async with orch.start() as running:
        assert running["api"] == "api"
        span = running.timeline["api"]
    assert started[0] >= ready_at[0]
    assert span.kind == "start"
    assert span.waited_for == ("db",)
    assert [s.name for s in running.timeline.critical_path("start")] == ["db", "api"]
    assert {s.kind for s in running.timeline} == {"start", "ready", "stop"}


async def test_definition_errors_before_anything_starts() -> None:
    orch = pk.Orchestrator()
    started: list[str] = []

    @orch.service
    async def a(b: str) -> str:
        started.append("a")
        return "a"

    with pytest.raises(pk.DefinitionError, match="duplicate service name 'a'"):

        @orch.service(name="a")
        async def other() -> str:
            return "x"

    with pytest.raises(pk.CycleError) as info:

        @orch.service
        async def b(a: str) -> str:
            return "b"

    assert info.value.cycle in (("b", "a", "b"), ("a", "b", "a"))

    @orch.service
    async def c() -> str:
        started.append("c")
        return "c"

    with pytest.raises(pk.DefinitionError, match="'a' needs 'b'"):
        orch.start()
    assert started == []


async def test_sync_function_and_bad_options_rejected() -> None:
    orch = pk.Orchestrator()
    with pytest.raises(TypeError, match="sync function"):

        @orch.service
        def sync() -> int:
            return 1

    with pytest.raises(ValueError, match="timeout"):
        orch.service(timeout=0)
    with pytest.raises(ValueError, match="stop_timeout"):
        orch.service(stop_timeout=-1)
    with pytest.raises(TypeError, match="retry"):
        orch.service(retry=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="critical"):
        orch.service(critical="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ready"):
        orch.service(ready=5)  # type: ignore[arg-type]
    with pytest.raises(pk.DefinitionError, match="identifier"):
        orch.service(name="not a name")


async def test_sync_factory_returning_a_non_context_manager_fails_at_start() -> None:
    orch = pk.Orchestrator()

    class Factory:  # a callable object: could be a context-manager factory
        def __call__(self) -> int:
            return 1

    orch.service(name="odd")(Factory())
    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pass
    assert isinstance(info.value.__cause__, TypeError)


async def test_setup_timeout_and_probe_timeout() -> None:
    orch = pk.Orchestrator()

    @orch.service(timeout=0.05)
    async def slow() -> AsyncIterator[str]:
        await anyio.sleep(10)
        yield "never"

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pass
    assert info.value.service == "slow"
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "0.05s" in str(info.value.__cause__)

    orch2 = pk.Orchestrator()
    torn: list[str] = []

    @orch2.service(ready=pk.probes.call(lambda: False, name="never"), timeout=0.1)
    async def unready() -> AsyncIterator[str]:
        try:
            yield "x"
        finally:
            torn.append("unready")

    with pytest.raises(pk.StartupError) as info2:
        async with orch2.start():
            pass
    assert isinstance(info2.value.__cause__, TimeoutError)
    assert "call never not ready" in str(info2.value.__cause__)
    assert torn == ["unready"]  # the set-up that did succeed was undone


async def test_retry_tears_down_each_failed_attempt() -> None:
    orch = pk.Orchestrator()
    log: list[str] = []
    attempts = 0

    @orch.service(retry=pk.Retry(attempts=3, backoff=0))
    async def flaky() -> AsyncIterator[int]:
        nonlocal attempts
        attempts += 1
        log.append(f"setup {attempts}")
        try:
            if attempts < 3:
                raise ConnectionError(f"attempt {attempts}")
            yield attempts
        finally:
            log.append(f"teardown {attempts}")

    async with orch.start() as running:
        assert running["flaky"] == 3
    assert log == ["setup 1", "teardown 1", "setup 2", "teardown 2", "setup 3", "teardown 3"]

    orch2 = pk.Orchestrator()

    @orch2.service(retry=pk.Retry(attempts=2, backoff=0), ready=lambda: False, timeout=0.05)
    async def hopeless() -> str:
        return "x"

    with pytest.raises(pk.StartupError) as info:
        async with orch2.start():
            pass
    assert isinstance(info.value.__cause__, TimeoutError)


async def test_rollback_reverse_order_cancels_in_flight_and_closes_ports() -> None:
    rec, orch = Recorder(), pk.Orchestrator()
    rec.service(orch, "db")
    rec.service(orch, "cache", "db")
    rec.service(orch, "api", "cache", "db")
    rec.service(orch, "slow", "db", delay=10)  # in flight when api's sibling fails
    rec.service(orch, "mailer", "api", fail=ConnectionError("smtp down"), delay=0.05)
    ports: list[int] = []

    @orch.service
    async def server(db: str) -> AsyncIterator[int]:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as lst:
            ports.append(lst.extra(anyio.abc.SocketAttribute.local_port))
            yield ports[-1]

    with anyio.fail_after(5), pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pytest.fail("the body must not run")
    err = info.value
    assert err.service == "mailer"
    assert isinstance(err.__cause__, ConnectionError)
    assert err.teardown_errors == ()
    assert rec.open == set()
    downs = [e for e in rec.events if e.startswith("down")]
    assert sorted(downs) == ["down api", "down cache", "down db"]
    assert downs.index("down api") < downs.index("down cache") < downs.index("down db")
    assert "up slow" not in rec.events  # cancelled, never finished its set-up
    assert not await pk.probes.tcp("127.0.0.1", ports[0]).check()


async def test_teardown_errors_are_reported_with_the_cause() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise OSError("disk gone")

    @orch.service
    async def api(db: str) -> str:
        raise ValueError("bad config")

    with pytest.raises(pk.StartupError) as info:
        async with orch.start():
            pass
    assert isinstance(info.value.__cause__, ValueError)
    [(name, exc)] = info.value.teardown_errors
    assert name == "db"
    assert isinstance(exc, OSError)
    assert "rollback failed" in str(info.value)


async def test_non_critical_failure_skips_dependents_only() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> str:
        return "db"

    @orch.service(critical=False)
    async def search(db: str) -> str:
        raise ConnectionError("es down")

    @orch.service
    async def indexer(search: str) -> str:
        return "never"

    @orch.service
    async def api(db: str) -> str:
        return "api"

    async with orch.start() as running:
        assert running["api"] == "api"
        assert isinstance(running.failed["search"], ConnectionError)
        assert running.skipped["indexer"].dependency == "search"
        with pytest.raises(KeyError, match="failed to start"):
            running["search"]
        with pytest.raises(KeyError, match="was not started"):
            running["indexer"]
        assert running.state("indexer") == "skipped"
        health = await running.health()
    assert health.status == "failing"  # indexer is critical and was skipped
    assert not health.services["search"].ok
    assert health.services["api"].ok


async def test_shutdown_reverse_order_each_once_parallel_independents() -> None:
    rec, orch = Recorder(), pk.Orchestrator()
    rec.service(orch, "db")
    stopping: list[str] = []
    both_stopping = anyio.Event()

    def make(name: str) -> Any:
        async def lifetime(db: str) -> AsyncIterator[str]:
            yield f"{name}({db})"
            stopping.append(name)
            if len(stopping) == 2:
                both_stopping.set()
            await both_stopping.wait()  # a then b, one after the other, would never get here
            rec.events.append(f"down {name}")

        return lifetime

    orch.service(name="a")(make("a"))
    orch.service(name="b")(make("b"))
    with anyio.fail_after(10):
        async with orch.start() as running:
            assert running["a"] == "a(db())"
    assert rec.events.count("down db") == 1
    assert rec.events[-1] == "down db"  # after both of its dependents
    assert sorted(rec.events[-3:-1]) == ["down a", "down b"]
    stops = [s for s in running.timeline if s.kind == "stop"]
    assert {s.name for s in stops} == {"db", "a", "b"}
    assert running.timeline["db"].kind == "stop"
    # the timeline agrees: db's stop began after both dependents' stops ended
    db_stop = running.timeline["db"]
    assert db_stop.start >= max(running.timeline["a"].end, running.timeline["b"].end)


async def test_stop_timeout_cancels_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    orch = pk.Orchestrator()
    order: list[str] = []

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        order.append("db")

    @orch.service(stop_timeout=0.1)
    async def stuck(db: str) -> AsyncIterator[str]:
        yield "stuck"
        try:
            await anyio.sleep(30)
        finally:
            order.append("stuck cancelled")

    with anyio.fail_after(5), caplog.at_level(logging.WARNING):
        async with orch.start():
            pass
    assert order == ["stuck cancelled", "db"]
    assert "did not stop within stop_timeout=0.1s" in caplog.text


async def test_body_error_propagates_after_ordered_stop() -> None:
    rec, orch = Recorder(), pk.Orchestrator()
    rec.service(orch, "db")
    rec.service(orch, "api", "db")
    with pytest.raises(ZeroDivisionError):
        async with orch.start():
            1 / 0  # noqa: B018
    assert rec.events[-2:] == ["down api", "down db"]


async def test_outer_cancellation_still_stops_in_order() -> None:
    rec, orch = Recorder(), pk.Orchestrator()
    rec.service(orch, "db", teardown_delay=0.01)
    rec.service(orch, "api", "db", teardown_delay=0.01)
    with anyio.CancelScope() as scope:
        async with orch.start():
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert rec.events[-2:] == ["down api", "down db"]
    # cancelled during start-up: what started is rolled back
    rec2, orch2 = Recorder(), pk.Orchestrator()
    rec2.service(orch2, "db")
    db_up = anyio.Event()

    @orch2.service
    async def slow(db: str) -> str:
        db_up.set()
        await anyio.sleep_forever()
        return "never"  # pragma: no cover

    with anyio.CancelScope() as scope2:
        async with anyio.create_task_group() as tg:

            async def cancel_once_db_is_up() -> None:
                await db_up.wait()
                scope2.cancel()

            tg.start_soon(cancel_once_db_is_up)
            async with orch2.start():
                pytest.fail("not reached")
    assert rec2.events == ["up db", "down db"]


async def test_crash_while_running_stops_everything_and_raises() -> None:
    rec, orch = Recorder(), pk.Orchestrator()
    rec.service(orch, "db")

    @orch.service
    async def worker(db: str) -> AsyncIterator[str]:
        async with anyio.create_task_group() as tg:

            async def loop() -> None:
                await anyio.sleep(0.05)
                raise RuntimeError("worker died")

            tg.start_soon(loop)
            yield "worker"

    with anyio.fail_after(5), pytest.raises(RuntimeError, match="worker died"):
        async with orch.start():
            await anyio.sleep(10)
    assert rec.events == ["up db", "down db"]


async def test_teardown_error_after_clean_body_raises_group() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"
        raise OSError("flush failed")

    with pytest.raises(ExceptionGroup, match="services failed to stop: 'db'") as info:
        async with orch.start() as running:
            pass
    assert isinstance(info.value.exceptions[0], OSError)
    assert running.teardown_errors[0][0] == "db"


async def test_health_reruns_probes() -> None:
    orch = pk.Orchestrator()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    @orch.service(ready=pk.probes.tcp("127.0.0.1", port), timeout=5)
    async def server() -> int:
        return port

    @orch.service(critical=False, ready=lambda: flag["ok"])
    async def optional() -> str:
        return "x"

    flag = {"ok": True}
    async with orch.start() as running:
        health = await running.health()
        assert health.ok
        assert health.status == "ok"
        flag["ok"] = False
        assert (await running.health()).status == "degraded"
        await listener.aclose()
        health = await running.health()
        assert health.status == "failing"
        assert "ConnectionRefused" in (health.services["server"].reason or "")


async def test_health_without_await_is_a_snapshot_and_awaiting_it_probes() -> None:
    orch = pk.Orchestrator()
    probed: list[str] = []

    def probe() -> bool:
        probed.append("probe")
        return flag["ok"]

    @orch.service(ready=probe)
    async def cache() -> str:
        return "cache"

    @orch.service(critical=False)
    async def flaky() -> AsyncIterator[str]:
        yield "flaky"

    @orch.service(critical=False)
    async def missing() -> str:
        raise ConnectionError("down")

    flag = {"ok": True}
    async with orch.start() as running:
        probes_at_start = len(probed)
        flag["ok"] = False
        snapshot = running.health()  # as DESIGN.md writes it: no await, no I/O
        assert isinstance(snapshot, pk.Health)
        assert len(probed) == probes_at_start
        assert snapshot.status == "degraded"  # only the failed non-critical service
        assert snapshot.services["cache"].ok
        assert not snapshot.services["missing"].ok
        assert "ConnectionError" in (snapshot.services["missing"].reason or "")
        fresh = await running.health()  # the probe runs again now
        assert len(probed) == probes_at_start + 1
        assert fresh.status == "failing"
        assert not fresh.services["cache"].ok
        assert fresh == await snapshot  # awaiting any Health probes again
        assert len(probed) == probes_at_start + 2
        with pytest.raises(ValueError, match="timeout"):
            running.health(timeout=0)


async def test_adding_after_start_and_repr() -> None:
    orch = pk.Orchestrator("app")

    @orch.service
    async def db() -> str:
        return "db"

    assert repr(orch) == "<Orchestrator 'app' services=['db']>"
    assert list(orch.services) == ["db"]
    async with orch.start() as running:
        assert "db" in repr(running)
    with pytest.raises(RuntimeError, match="already started"):
        orch.service(name="late")(db)
    # an orchestrator can be started again
    async with orch.start() as again:
        assert again["db"] == "db"
    assert math.isfinite(again.timeline.total)


async def test_text_after_shutdown_shows_the_start_chain() -> None:
    orch = pk.Orchestrator("app")
    release = anyio.Event()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "db"

    @orch.service(ready=release.is_set)
    async def cache(db: str) -> AsyncIterator[str]:
        release.set()
        yield "cache"

    @orch.service
    async def api(cache: str) -> str:
        return "api"

    async with orch.start() as running:
        during = running.timeline.to_text()
    after = running.timeline.to_text()
    kinds = {s.kind for s in running.timeline}
    assert kinds == {"start", "ready", "stop"}  # three kinds, told apart
    assert "critical path: db → cache → api" in during
    assert "critical path: db → cache → api" in after  # not the stop order
    assert "cache (ready)" in after
    assert "db (stop)" in after


async def test_one_start_at_a_time_and_each_start_object_once() -> None:
    # two starts at once would run every service twice (two of every process)
    orch = pk.Orchestrator(name="api")
    setups = 0

    @orch.service
    async def db() -> AsyncIterator[str]:
        nonlocal setups
        setups += 1
        yield "db"

    async with orch.start() as running:
        assert running["db"] == "db"
        with pytest.raises(RuntimeError, match=r"^this Orchestrator 'api' is already started"):
            async with orch.start():
                pass  # pragma: no cover - refused
        with pytest.raises(RuntimeError, match=r"is already started"):
            await orch.serve()
    assert setups == 1
    started = orch.start()
    async with started:
        pass
    with pytest.raises(RuntimeError, match=r"^this orch\.start\(\) was already entered"):
        async with started:
            pass  # pragma: no cover - refused
    async with orch.start() as running:  # a new start after a stop is fine
        assert running["db"] == "db"
    assert setups == 3
