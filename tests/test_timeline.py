"""pk.Timeline and pk.Span: totals, the critical path and the renderings."""

from __future__ import annotations

import json

import pytest

import parallelkit as pk
from parallelkit import Span


def sample() -> pk.Timeline:
    # origin 100.0: charge 0-50 ms, record 50-70, notify 50-90 (queued at 50, started 60)
    return pk.Timeline(
        [
            Span("charge", 100.0, 100.0, 100.05),
            Span("record", 100.05, 100.05, 100.07, "ok", ("charge",)),
            Span("notify", 100.05, 100.06, 100.09, "ok", ("charge",)),
        ],
        origin=100.0,
        name="payment",
    )


def test_total_is_from_the_run_start_to_the_end_of_the_last_span() -> None:
    assert sample().total == pytest.approx(0.09)
    late = pk.Timeline([Span("a", 5.0, 6.0, 7.0)], origin=4.0)
    assert late.total == pytest.approx(3.0)
    assert pk.Timeline([Span("a", 5.0, 6.0, 7.0)]).origin == 5.0  # default: first queued
    assert pk.Timeline().total == 0.0


def test_span_durations() -> None:
    span = sample()["notify"]
    assert span.duration == pytest.approx(0.03)
    assert span.wait == pytest.approx(0.01)


def test_critical_path_follows_the_dependency_that_ended_last() -> None:
    timeline = sample()
    assert [s.name for s in timeline.critical_path()] == ["charge", "notify"]
    diamond = pk.Timeline(
        [
            Span("a", 0, 0, 1),
            Span("b", 1, 1, 5, "ok", ("a",)),
            Span("c", 1, 1, 2, "ok", ("a",)),
            Span("d", 5, 5, 6, "ok", ("b", "c")),
            Span("x", 0, 0, 3),  # independent, ends before d
        ]
    )
    assert [s.name for s in diamond.critical_path()] == ["a", "b", "d"]
    assert pk.Timeline().critical_path() == ()


def after_shutdown() -> pk.Timeline:
    """An orchestrator's timeline after a stop: start-up spans, then the stop phase
    (reverse order: http stops first, then the db it depended on)."""
    return pk.Timeline(
        [
            Span("db", 0, 0, 1, kind="start"),
            Span("cache", 0, 0, 0.5, kind="start"),
            Span("http", 1, 1, 2, "ok", ("db", "cache"), kind="start"),
            Span("http", 9, 9, 10, "ok", (), kind="stop"),
            Span("cache", 10, 10, 10.2, "ok", ("http",), kind="stop"),
            Span("db", 10, 10, 11, "ok", ("http",), kind="stop"),
        ],
        origin=0.0,
        name="service",
    )


def test_critical_path_after_a_shutdown_is_the_start_ups() -> None:
    """The stop spans ended last, but they are a separate phase: by default the
    critical path is the start-up's chain, never the stop order."""
    timeline = after_shutdown()
    assert [s.name for s in timeline.critical_path()] == ["db", "http"]
    assert {s.kind for s in timeline.critical_path()} == {"start"}
    assert [s.name for s in timeline.critical_path("start")] == ["db", "http"]
    assert [s.name for s in timeline.critical_path("stop")] == ["http", "db"]  # when asked
    assert timeline.to_text().splitlines()[-1] == "critical path: db → http"
    assert timeline.to_dict()["critical_path"] == ["db", "http"]
    crit = [line for line in timeline.to_mermaid().splitlines() if ":crit" in line]
    assert [line.split()[0] for line in crit] == ["db", "http"]  # start section only
    only_stops = pk.Timeline([s for s in timeline if s.kind == "stop"])
    assert only_stops.critical_path() == ()  # nothing but a shutdown: no start-up chain
    assert [s.name for s in only_stops.critical_path("stop")] == ["http", "db"]


def test_to_text_draws_waiting_only_where_a_span_waited() -> None:
    no_wait = pk.Timeline([Span("a", 0, 0, 1), Span("b", 1, 1, 2, "ok", ("a",))])
    assert "░" not in no_wait.to_text()
    waited = pk.Timeline([Span("a", 0, 0, 1), Span("b", 0, 1, 2)])  # b waited for a slot
    assert "░" in waited.to_text().splitlines()[2]


def test_getitem_and_iteration() -> None:
    timeline = sample()
    assert timeline["record"].waited_for == ("charge",)
    assert [s.name for s in timeline] == ["charge", "record", "notify"]
    assert len(timeline) == 3
    with pytest.raises(KeyError, match="no span named 'nope'"):
        timeline["nope"]
    assert repr(timeline) == "<Timeline 'payment', 3 spans, total=90.0 ms>"


def test_to_text_is_a_compact_gantt() -> None:
    text = sample().to_text(width=18)
    lines = text.splitlines()
    assert lines[0] == "payment total 90.0 ms, 3 spans"
    assert lines[1].startswith("charge |██████████")
    assert "░" in lines[3]  # notify waited for a slot from 50 to 60 ms
    assert "50.0 →     70.0 ms  ok" in lines[2]
    assert lines[-1] == "critical path: charge → notify"
    with pytest.raises(ValueError, match="width"):
        sample().to_text(width=3)
    for wrong in ("40", 40.0, True):
        with pytest.raises(TypeError, match="width must be an int"):
            sample().to_text(width=wrong)  # type: ignore[arg-type]
    assert pk.Timeline().to_text() == "total 0.0 ms, 0 spans"


def test_to_mermaid() -> None:
    text = sample().to_mermaid()
    assert text.splitlines()[:4] == ["gantt", "    title payment", "    dateFormat x",
                                     "    axisFormat %S.%L"]  # fmt: skip
    assert "    charge :crit, done, s0, 0, 50" in text
    assert "    record :done, s1, 50, 70" in text
    assert "    notify :crit, done, s2, 60, 90" in text
    odd = pk.Timeline([Span("a:b", 0, 0, 1, "error")]).to_mermaid(title="x")
    assert "a_b :crit, active" in odd


def test_to_dict_is_json_ready_and_relative() -> None:
    data = json.loads(json.dumps(sample().to_dict()))
    assert data["critical_path"] == ["charge", "notify"]
    notify = data["spans"][2]
    assert notify == {
        "name": "notify",
        "kind": "step",
        "status": "ok",
        "queued": pytest.approx(0.05),
        "start": pytest.approx(0.06),
        "end": pytest.approx(0.09),
        "waited_for": ["charge"],
    }


def test_span_is_frozen() -> None:
    span = Span("a", 0, 0, 1)
    with pytest.raises(AttributeError):
        span.name = "b"  # type: ignore[misc]


def test_a_step_that_fails_from_clock_reading_zero_keeps_its_start() -> None:
    # trio's MockClock starts at 0.0: a span started then is not "no start" (its end)
    import anyio
    import trio.testing

    flow = pk.Flow()

    @flow.step
    async def charge() -> str:
        await anyio.sleep(2.0)
        raise ConnectionError("card network down")

    async def main() -> pk.Timeline:
        assert anyio.current_time() == 0.0
        return (await flow.run(settle=True)).timeline

    clock = trio.testing.MockClock(autojump_threshold=0)
    timeline = anyio.run(main, backend="trio", backend_options={"clock": clock})
    span = timeline["charge"]
    assert (span.status, span.start, span.end, span.queued) == ("error", 0.0, 2.0, 0.0)
    assert "░" not in timeline.to_text()  # no wait for a slot: none was drawn
