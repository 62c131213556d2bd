"""The benchmarks' claims are checked by the code that writes them.

Each test breaks something on purpose (parallelkit, a contender, a measured number)
and checks that the benchmark reports it: a wrong result in ``"wrong"`` (so the run
exits 1), a missed target as not met, a report sentence that follows the
measurement. No test runs a whole benchmark and none asserts on a timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from benchmarks import __main__ as runner
from benchmarks import (
    _util,
    bench_cache,
    bench_eager,
    bench_fanout,
    bench_flow,
    bench_peers,
    bench_playbook,
    bench_startup,
)
from benchmarks._playbook_rows import HAND
from examples.crm import startup

import parallelkit as pk
from tests.test_benchmarks_smoke import map_loses_the_last_item  # noqa: F401 (a fixture)

# subprocesses / whole benchmark runs: the main job only, not the fast unit set
pytestmark = pytest.mark.slow


def _entry(result: dict[str, Any]) -> dict[str, Any]:
    return {"name": "x", "ok": True, "title": "X", "seconds": 0.1, "result": result}


# -- an exact count is not "at most" -------------------------------------------------------
def test_exactly_rejects_too_few_as_well_as_too_many() -> None:
    assert _util.exactly("loads", 1, 1)["met"] is True
    assert _util.exactly("loads", 0, 1)["met"] is False
    assert _util.exactly("loads", 2, 1)["met"] is False
    assert _util.exactly("loads", 0, 1)["limit"] == "== 1"


def _hits(values_correct: bool = True) -> dict[str, Any]:
    one = {"median": 0.5, "min": 0.5, "max": 0.5}
    return {
        "ratio_to_ttlcache": {"pk.SWRCache @cached": one, "pk.SWRCache.get": one},
        "decorated_to_async_lru": one,
        "values_correct": {"pk.SWRCache @cached": values_correct, "pk.SWRCache.get": True},
        "swr_hits_counted": 10,
        "swr_hits_expected": 10,
    }


def _batching(correct: bool = True) -> dict[str, Any]:
    one = {"median": 0.5, "min": 0.5, "max": 0.5}
    return {"correct": correct, **{f: {"ratio": one} for f in ("tasks", "load_many", "gather")}}


def test_a_cache_that_never_loads_misses_its_single_flight_targets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Break ``SWRCache.cached`` on purpose: the callers get None, nothing is loaded.

    0 loads per 1,000 cold callers used to be reported as met (``<= 1``), and the
    callers' values were never looked at.
    """
    pytest.importorskip("aiocache", reason="the cache benchmark's peers: the [dev] extras")

    def never_loads(self: pk.SWRCache, fn: Any) -> Any:
        async def cached(*args: Any) -> Any:
            return None

        return cached

    monkeypatch.setattr(bench_cache, "LOAD_DELAY", 0.001)
    monkeypatch.setattr(pk.SWRCache, "cached", never_loads)
    stampede = asyncio.run(bench_cache._stampede(20))
    assert stampede["pk.SWRCache"]["cold_loads"] == 0
    assert stampede["pk.SWRCache"]["values_correct"] is False
    assert stampede["async-lru"]["values_correct"] is True  # the peers are right
    targets = {t["target"]: t for t in bench_cache._targets(_hits(), stampede, _batching())}
    assert targets["SWRCache loads per 1,000 cold callers"]["met"] is False
    assert targets["SWRCache refreshes per 1,000 stale callers"]["met"] is False
    wrong = bench_cache._wrong(_hits(), stampede, _batching())
    assert wrong == ["stampede: pk.SWRCache gave a caller a wrong value"]
    assert not runner._good(_entry({"wrong": wrong}))


def test_wrong_cache_values_fail_the_cache_benchmark() -> None:
    """Correctness used to be a target only: a miss, and the run still exited 0."""
    stampede = {"pk.SWRCache": {"cold_loads": 1, "stale_refreshes": 1, "values_correct": True}}
    assert bench_cache._wrong(_hits(), stampede, _batching()) == []
    assert bench_cache._wrong(_hits(values_correct=False), stampede, _batching()) == [
        "hot hit: pk.SWRCache @cached returned a wrong value"
    ]
    assert bench_cache._wrong(_hits(), stampede, _batching(correct=False)) == [
        "BatchLoader or aiodataloader gave a caller a wrong value"
    ]
    miscounted = {**_hits(), "swr_hits_counted": 9}
    assert bench_cache._wrong(miscounted, stampede, _batching()) == [
        "SWRCache counted 9 hits, expected 10"
    ]


def test_the_hot_hit_loop_checks_every_value() -> None:
    async def right(x: int) -> int:
        return x

    async def wrong(x: int) -> int:
        return 0

    assert asyncio.run(bench_cache._per_call(right, 5))[1] is True
    assert asyncio.run(bench_cache._per_call(wrong, 5))[1] is False


# -- fan-out: every run's result is checked ----------------------------------------------
@pytest.mark.usefixtures("map_loses_the_last_item")
def test_a_map_that_loses_work_is_reported_wrong_by_fanout() -> None:
    """A lossy ``pk.map`` does less work, so it was faster, and its targets were met."""
    wrong: list[str] = []
    bench_fanout._duel(30, 5, 1, wrong)
    assert wrong == [
        "asyncio: pk.map: not the 30 results of its 30 items (got 29)",
        "trio: pk.map: not the 30 results of its 30 items (got 29)",
    ]
    wrong.clear()
    bench_fanout._large_limit(1, wrong)
    assert sorted(wrong) == [
        "asyncio: limit=200,000: not the 5 results of its 5 items (got 4)",
        "asyncio: limit=5: not the 5 results of its 5 items (got 4)",
    ]


def test_the_fanout_check_knows_unordered_contenders() -> None:
    assert bench_fanout.wrong_result("pk.imap unordered", [2, 0, 1], 3) is None
    assert bench_fanout.wrong_result("pk.imap ordered", [2, 0, 1], 3) is not None
    assert bench_fanout.wrong_result("pk.map", [0, 1, 1], 3) is not None
    assert bench_fanout.wrong_result("pk.map", None, 3) is not None


# -- flow: every step ran, with its inputs ----------------------------------------------
def test_a_flow_that_skips_its_steps_is_reported_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break ``Flow.run`` on purpose: it runs nothing (and so was the fastest scheduler)."""

    async def runs_nothing(self: pk.Flow, **_: Any) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(pk.Flow, "run", runs_nothing)
    wrong: list[str] = []
    bench_flow.part_per_node(2, 1, wrong)
    assert wrong == [
        "200 nodes: pk.Flow did not run every step with its inputs",
        "200 nodes: pk.Flow (trio) did not run every step with its inputs",
    ]  # the hand-written scheduler is right


def test_a_step_started_without_its_inputs_fails() -> None:
    step = bench_flow.make_step("n1_0", ["n0_0", "n0_1"], None)
    assert asyncio.run(step(n0_0="n0_0", n0_1="n0_1")) == "n1_0"
    with pytest.raises(AssertionError, match="started without its inputs"):
        asyncio.run(step(n0_0=None, n0_1="n0_1"))
    graph = {"a": [], "b": ["a"]}
    assert bench_flow.wrong_steps(graph, {"a": "a", "b": "b"}) == []
    assert bench_flow.wrong_steps(graph, {"a": "a"}) == ["b"]


# -- start-up: checked without parallelkit's timeline, and a wrong start fails the run ----
def test_an_orchestrator_that_ignores_a_dependency_fails_the_startup_benchmark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """socket_io no longer waits for http: the check used to be printed, never failed."""
    right = asyncio.run(bench_startup.orchestrated(0.01))
    assert right[2] is True
    assert bench_startup.wrong_results([right], model_matches_log=True) == []

    def build_orchestrator(scale: float, **_: Any) -> pk.Orchestrator:
        orch = pk.Orchestrator(name="wired wrong")
        for name in startup.SEED_DURATIONS:

            async def part(name: str = name) -> str:
                return await startup._simulate(name, scale)

            orch.service(name=name)(part)
        return orch

    monkeypatch.setattr(startup, "build_orchestrator", build_orchestrator)
    run = asyncio.run(bench_startup.orchestrated(0.01))
    assert run[2] is False  # recorded by the benchmark, not read from parallelkit
    wrong = bench_startup.wrong_results([right, run], model_matches_log=True)
    assert "Orchestrator: a service started before what it needs was ready" in wrong
    assert not runner._good(_entry({"wrong": wrong}))


def test_the_startup_check_does_not_trust_parallelkits_timeline() -> None:
    """A timeline that says all is well does not make a wrong start right."""
    timeline = asyncio.run(bench_startup.orchestrated(0.01))[1]
    assert bench_startup.respects_dependencies(timeline)
    lying = (0.0, timeline, False)  # the independent record says a service started early
    assert bench_startup.wrong_results([lying], model_matches_log=True) == [
        "Orchestrator: a service started before what it needs was ready"
    ]


# -- peers and eager: the truth is plain SQL, and a wrong answer fails the run -----------
def test_peers_checks_every_contender_against_plain_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    """``eager`` and ``fetch_peers`` wrong the same way: they used to agree, so "correct"."""
    real = bench_peers.contenders

    def broken(engine: Any, n_reads: int) -> dict[str, Any]:
        runs = real(engine, n_reads)
        for name in (bench_peers.EAGER, bench_peers.PEERS_LOAD):
            fn = runs[name]

            async def last_lost(fn: Any = fn) -> Any:
                return (await fn())[:-1]

            runs[name] = last_lost
        return runs

    monkeypatch.setattr(bench_peers, "contenders", broken)
    sizes = bench_peers.Sizes(repeat=1, slow_repeat=1, reads=3, calls=10)
    r = asyncio.run(bench_peers.measure_on(bench_peers.seeded_sqlite(), sizes))
    assert r[bench_peers.EAGER]["correct"] is False
    assert r[bench_peers.PEERS_LOAD]["correct"] is False
    assert r[bench_peers.LAZY]["correct"] is True
    assert r[bench_peers.LISTENER_ON]["correct"] is True
    assert r[bench_peers.QUERY_PEERS]["correct"] is True
    assert bench_peers.wrong_for("sqlite", r) == [
        f"sqlite: {bench_peers.PEERS_LOAD} gave a wrong answer",
        f"sqlite: {bench_peers.EAGER} gave a wrong answer",
    ]
    # statements counted with a plain SQLAlchemy event: 1 query + 3 hops
    assert r[bench_peers.PEERS_SYNC]["queries"] == 4


def test_a_wrong_eager_answer_fails_the_eager_benchmark() -> None:
    r = {"per request": {"a": {"correct": True}, "b": {"correct": False}}}
    assert bench_eager.wrong_for("sqlite", r) == ["sqlite: per request: b gave a wrong answer"]


# -- the playbook's report: comparisons of the same work, sentences from measurements -----
def _four_queries(hand_statements: int) -> tuple[dict[str, Any], dict[str, Any]]:
    measured = {
        v: {"median": t, "min": t, "max": t, "statements": n, "correct": True}
        for v, t, n in [
            ("before", 0.200, 4),
            ("after", 0.052, 1),
            ("parallelkit", 0.054, 1),
            (HAND, 0.105, hand_statements),
        ]
    }
    data = {
        "measured": measured,
        "calibration": {
            "round_trip_ms": 48.0,
            "probe_share": 1.0,
            "probe_statements": 4,
            "cost_ms": 5.0,
        },
        "cpu_bound": {"seconds": 0.001, "form": "one joined statement"},
        "model_bound": 0.048,
        "bound_note": "one round trip",
    }
    return bench_playbook._row("4 DB queries", data, 0.5), data


def test_a_hand_written_form_with_other_statements_is_not_the_same_work() -> None:
    """The 4-queries row compared 1 statement with a 2-statement hand form: 0.5x, met."""
    row, data = _four_queries(hand_statements=2)
    assert row["same_work"] is False
    (hand,) = (
        t
        for t in bench_playbook._targets([row])
        if t["target"] == "4 DB queries: parallelkit / the same work hand-written in asyncio"
    )
    assert hand["measured"] == 0.51
    assert hand["met"] is False
    markdown = bench_playbook._markdown([row], {"4 DB queries": data}, _plan(), "SQLite")
    assert "the same work took" not in markdown
    assert "(2 statements where parallelkit sent 1: not the same work)" in markdown
    same, _ = _four_queries(hand_statements=1)
    assert same["same_work"] is True


def _plan() -> Any:
    from benchmarks._measure import Plan

    return Plan(scales={"4 DB queries": 0.5}, repeat=1, before_runs=1, floor_runs=1)


def test_the_four_queries_saving_follows_the_statements_sent() -> None:
    row, data = _four_queries(hand_statements=1)
    assert "so 4 -> 1 saves at most 75%" in bench_playbook.WHY["4 DB queries"](row, data)
    row["statements"]["parallelkit"] = 2
    assert "so 4 -> 2 saves at most 50%" in bench_playbook.WHY["4 DB queries"](row, data)


def test_the_set_based_insert_beats_both_only_when_it_did() -> None:
    row = {
        "scale": 1.0,
        "playbook_after_ms": 150,
        "model_bound_ms": 400.0,
        "after_ms": 350.0,
        "parallelkit_ms": 330.0,
        "statements": {"before": 200},
    }
    data: dict[str, Any] = {
        "calibration": {"round_trip_ms": 20.0},
        "measured": {"set-based (2 statements)": {"median": 0.012, "statements": 2,
                                                 "correct": True}},
    }  # fmt: skip
    why = bench_playbook.WHY["100 cadence enrollments"]
    assert "Each enrollment is 2 round trips" in why(row, data)
    assert "(2 statements for all 100) beats both" in why(row, data)
    data["measured"]["set-based (2 statements)"]["median"] = 0.5  # slower than both
    assert "does not beat both here" in why(row, data)
    data["measured"]["set-based (2 statements)"].update(median=0.012, correct=False)
    assert "does not beat both here" in why(row, data)


def test_the_payment_sentence_names_what_its_check_found() -> None:
    row = {
        "scale": 1.0,
        "correct": {"after": False},
        "model_bound_ms": 700.0,
        "bound_saving_pct": 12.5,
        "parallelkit_ms": 703.0,
        "pk_over_bound": 1.0,
        "bound_limit": 1.5,
    }
    found = ["no charge id in the row", "no webhook announcing a charge id"]
    data = {"why_wrong": {"after": found}}
    text = bench_playbook.WHY["Payment processing"](row, data)
    assert "(no charge id in the row, no webhook announcing a charge id)" in text
    assert "before it existed" not in text


def test_answers_that_differ_fail_the_service_benchmark() -> None:
    """Identical answers were a target only: a mismatch was a miss, and the run exited 0."""
    from benchmarks import bench_service

    same = {"checked": 3, "identical": True, "mismatches": []}
    assert bench_service.wrong_answers(same, same) == []
    differ = {
        "checked": 3,
        "identical": False,
        "mismatches": [{"endpoint": "read", "path": "/read/1", "answers": {}}],
    }
    wrong = bench_service.wrong_answers(same, differ)
    assert wrong == ["warm: read /read/1: the variants' answers differ (or are not 200)"]
    assert not runner._good(_entry({"wrong": wrong}))


def test_x_faster_than_map_pairs_the_same_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """gather+Semaphore runs in the first round only; pk.map got slower in later rounds.

    Within its round gather took 5x pk.map's CPU; the old ratio of two medians (gather
    over hand in round 1, pk.map over hand in every round) said 0.5x, a miss.
    """
    cpu = {
        bench_fanout.HAND: [1.0, 1.0, 1.0],
        "pk.map": [1.0, 10.0, 10.0],
        "asyncio.gather + Semaphore": [5.0],
    }

    def fake(backend: str, contenders: Any, *_: Any, **__: Any) -> tuple[Any, Any]:
        return ({k: cpu[k] for k in contenders}, {k: cpu[k] for k in contenders})

    monkeypatch.setattr(bench_fanout, "interleaved", fake)
    monkeypatch.setattr(
        bench_fanout,
        "_asyncio_contenders",
        lambda n, limit: dict.fromkeys(cpu),
    )
    monkeypatch.setattr(bench_fanout, "_trio_contenders", lambda n, limit: dict.fromkeys(cpu))
    overhead = bench_fanout._overhead(10, 2, 3, 1)
    assert bench_fanout.to_map(overhead, "asyncio", "asyncio.gather + Semaphore") == 5.0


def test_a_wrong_parallel_code_is_a_verdict_even_when_not_calibrated() -> None:
    row, data = _four_queries(hand_statements=1)
    data["measured"]["before"]["median"] = 0.400  # 2x the playbook's time: not calibrated
    data["measured"]["after"]["correct"] = False
    row = bench_playbook._row("4 DB queries", data, 0.5)
    assert row["calibrated"] is False
    assert row["verdict"] == "no: its parallel code gives a wrong result"
