"""The benchmark suite runs, writes only where it is told, and can fail.

No assertion here is on a timing. The tests that break parallelkit on purpose check
that the playbook benchmark reports the result as wrong (and so fails the run),
whatever its speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmarks import __main__ as runner
from benchmarks import _playbook_rows, bench_playbook
from benchmarks._measure import Plan
from benchmarks._playbook_rows import HAND
from benchmarks._registry import NEEDS, QUICK_BUDGET_S, available, default
from examples.crm import payment, startup

import parallelkit as pk

from .conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent


def _tiny(row: str, scale: float = 0.02) -> Plan:
    return Plan(scales={row: scale}, repeat=1, before_runs=1, floor_runs=1)


def _run_row(row: str, scale: float = 0.02) -> dict[str, Any]:
    plan = _tiny(row, scale)
    return bench_playbook.report(asyncio.run(_playbook_rows.measure(plan, rows=(row,))), plan)


def _correct_target(result: dict[str, Any], row: str) -> bool:
    (target,) = (
        t for t in result["targets"] if t["target"] == f"{row}: parallelkit's result correct"
    )
    return bool(target["met"])


# -- the runner ---------------------------------------------------------------------------------
def test_the_playbook_benchmark_is_registered_first() -> None:
    assert available()[0] == "playbook"


def test_every_module_of_the_main_job_has_a_quick_budget() -> None:
    """The runner warns when a module overruns its share of the minute: each has one."""
    runs = [name for name in default() if name not in NEEDS]
    assert runs, "the main job runs no benchmark"
    assert [name for name in runs if name not in QUICK_BUDGET_S] == []
    assert all(budget > 0 for budget in QUICK_BUDGET_S.values())


def test_targets_are_normalized_for_the_report() -> None:
    as_list = {"targets": [{"target": "a", "measured": 1, "limit": "<= 2", "met": True}]}
    as_dict = {"targets": {"b": {"target": "<= 3", "ratio": 4, "met": False}}}
    assert runner._targets(as_list) == as_list["targets"]
    assert runner._targets(as_dict) == [
        {"target": "b", "measured": 4, "limit": "<= 3", "met": False}
    ]


def _merged(benchmarks: dict[str, Any]) -> dict[str, Any]:
    env = {
        "generated": "now",
        "machine": "m",
        "cpu": "c",
        "platform": "p",
        "python": "3",
        "cpus": 2,
        "quick": True,
        "database": "SQLite",
        "redis": "no",
    }
    return {"environment": env, "benchmarks": benchmarks}


def test_the_report_shows_misses_failures_and_wrong_results() -> None:
    entries = {
        "x": {"ok": True, "title": "X", "seconds": 1.0, "quick": True, "output": "table",
              "result": {"targets": {"b": {"target": "<= 3", "ratio": 4, "met": False}}}},
        "y": {"ok": False, "title": "Y", "error": "boom", "traceback": "tb"},
        "z": {"ok": True, "title": "Z", "seconds": 1.0, "result": {"wrong": ["row: parallelkit"]}},
    }  # fmt: skip
    report = runner._report(_merged(entries))
    assert "| b | 4 | <= 3 | **NO** |" in report  # a miss is shown, not hidden
    assert "**FAILED: boom**" in report
    assert "WRONG RESULTS: row: parallelkit" in report
    assert [runner._good(e) for e in entries.values()] == [True, False, False]


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for rest in ("``", ":func:", ":class:", ":data:", ":mod:"):
        assert rest not in text
    assert not [line for line in text.splitlines() if line.lstrip().startswith(".. ")]
    assert "--full" in text
    assert "--redis" in text
    assert "playbook" in text


def test_publish_needs_a_full_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        runner.main(["playbook", "--publish"])
    assert exit_.value.code == 2
    assert "--full" in capsys.readouterr().err


def test_modules_that_need_redis_are_not_run_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[str] = []

    def load(name: str) -> Any:
        class Module:
            TITLE = name

            @staticmethod
            def run(**kwargs: Any) -> dict[str, Any]:
                called.append(name)
                return {"kwargs": kwargs}

        return Module

    monkeypatch.setattr(runner, "load", load)
    names = ["redis", "flow"]
    assert set(NEEDS["redis"]) == {"redis"}
    args = runner._parser(names).parse_args(["--out", str(tmp_path)])
    entries = {e["name"]: e for e in (runner._run_one(n, args, lambda _t: None) for n in names)}
    assert called == ["flow"]
    assert entries["redis"]["result"] == {"skipped": "not run: needs --redis URL"}
    assert entries["flow"]["result"]["kwargs"] == {"quick": True, "database": None}


def test_the_default_output_directory_is_ignored_by_git() -> None:
    """A local run never writes a tracked file: its default output is ignored."""
    default = ROOT / ".benchmarks"
    assert Path(os.environ.get("PARALLELKIT_BENCH_RESULTS", default)) == runner._registry.RESULTS
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(default / "report.md")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, ".benchmarks/ must be ignored by git"


def _git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.slow
def test_the_main_job_playbook_end_to_end(tmp_path: Path) -> None:
    """``python -m benchmarks playbook`` at quick sizes: report, chart, nothing else written."""
    before = _git_status()
    env = {**os.environ, "PARALLELKIT_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "playbook"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # exit 1 only for a failed module or a wrong result; a missed speed target is reported
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _git_status() == before  # the checkout is as it was
    assert f"report: {tmp_path / 'report.md'}" in out.stdout or "report.md" in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    playbook = results["benchmarks"]["playbook"]["result"]
    assert [r["operation"] for r in playbook["rows"]] == list(_playbook_rows.PLAYBOOK)
    statements = {r["operation"]: r["statements"] for r in playbook["rows"]}
    assert statements["4 DB queries"]["before"] == 4
    assert statements["4 DB queries"]["parallelkit"] == 1
    assert statements["100 cadence enrollments"]["parallelkit"] == 200
    correct = {r["operation"]: r["correct"] for r in playbook["rows"]}
    assert correct["Payment processing"] == {
        "before": True,
        "after": False,
        "parallelkit": True,
        HAND: True,
    }
    assert all(c["parallelkit"] and c["before"] and c[HAND] for c in correct.values())
    assert playbook["wrong"] == []
    report = (tmp_path / "report.md").read_text()
    assert "Where the playbook's claims hold" in report
    assert "The *playbook* is the TypeScript" in report  # the word explained
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("matplotlib is missing: CI installs the bench extra, the chart must exist")
        pytest.skip("matplotlib is not installed (pip install -e '.[bench]'): no chart to check")
    assert (tmp_path / "playbook.png").stat().st_size > 1000


# -- the playbook benchmark can fail ------------------------------------------------------------
def test_the_payment_row_checks_every_result() -> None:
    result = _run_row("Payment processing")
    (row,) = result["rows"]
    assert row["correct"] == {"before": True, "after": False, "parallelkit": True, HAND: True}
    assert result["wrong"] == []
    assert "wrong result" in row["verdict"] or row["verdict"].startswith("not judged")


def test_a_flow_wired_in_the_wrong_order_is_reported_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the payment flow on purpose: record and notify no longer wait for the charge."""
    wrong = pk.Flow(name="payment, record and notify not waiting for the charge")

    @wrong.step
    async def charge(payment_id: str, amount: int, stripe: Any) -> Any:
        return await stripe.create_charge(amount=amount, currency="usd", source=payment_id)

    @wrong.step
    async def record(payment_id: str, amount: int, sessions: Any) -> Any:
        return await payment._insert(sessions, payment_id, amount, None)

    @wrong.step
    async def notify(payment_id: str, webhooks: Any) -> Any:
        return await webhooks.post(payment.WEBHOOK_URL, {"payment_id": payment_id})

    monkeypatch.setattr(payment, "payment_flow", wrong)
    result = _run_row("Payment processing")
    (row,) = result["rows"]
    assert row["correct"]["parallelkit"] is False
    assert result["wrong"] == ["Payment processing: parallelkit gave a wrong result"]
    assert not _correct_target(result, "Payment processing")
    assert "WRONG" in result["markdown"]


@pytest.fixture
def map_loses_the_last_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break ``pk.map`` on purpose: it drops the last item's work and result."""
    real = pk.map

    async def lossy(fn: Any, items: Any, /, **options: Any) -> Any:
        return await real(fn, list(items)[:-1], **options)

    monkeypatch.setattr(pk, "map", lossy)


@pytest.mark.usefixtures("map_loses_the_last_item")
@pytest.mark.parametrize("row", ["100 cadence enrollments", "50 company detection"])
def test_a_map_that_loses_work_is_reported_wrong(row: str) -> None:
    result = _run_row(row, scale=0.002)
    (measured,) = result["rows"]
    assert measured["correct"]["parallelkit"] is False
    assert measured["correct"]["before"] is True  # the truth is not parallelkit's
    (wrong,) = result["wrong"]
    assert wrong.startswith(f"{row}: parallelkit gave a wrong result")


def test_an_orchestrator_that_ignores_a_dependency_is_reported_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Break the start-up on purpose: socket_io no longer waits for the http server."""

    def build_orchestrator(scale: float, **_: Any) -> pk.Orchestrator:
        def simulated(name: str) -> Any:
            async def part() -> str:
                return await startup._simulate(name, scale)

            return part

        orch = pk.Orchestrator(name="wired wrong")
        for name in startup.SEED_DURATIONS:
            orch.service(name=name)(simulated(name))
        return orch

    monkeypatch.setattr(startup, "build_orchestrator", build_orchestrator)
    result = _run_row("Server startup", scale=0.01)
    (row,) = result["rows"]
    assert row["correct"] == {"before": True, "after": True, "parallelkit": False, HAND: True}
    assert result["wrong"] == ["Server startup: parallelkit gave a wrong result"]


def test_the_four_queries_row_reports_its_ratio_to_one_round_trip() -> None:
    result = _run_row("4 DB queries", scale=0.5)  # 50 ms round trips: latency dominates
    (row,) = result["rows"]
    assert row["correct"]["parallelkit"] is True
    assert row["latency_bound"] is (row["model_bound_ms"] >= row["cpu_bound_ms"])
    targets = {t["target"]: t for t in result["targets"]}
    hand = targets["4 DB queries: parallelkit / the same work hand-written in asyncio"]
    assert hand["measured"] == row["pk_over_hand"]
    if row["latency_bound"]:  # one round trip is the bound; the target is eager's 1.2x
        bound = targets["4 DB queries: parallelkit / lower bound"]
        assert bound["limit"] == "<= 1.2"
        assert bound["measured"] == row["pk_over_bound"]
    else:  # this machine alone took longer than the round trip: no bound target
        assert "4 DB queries: parallelkit / lower bound" not in targets


def test_a_machine_slower_than_the_playbook_gets_no_claim_judged() -> None:
    """A round trip calibrated to 0 (this machine alone took the playbook's time)."""
    measured = {
        v: {"median": t, "min": t, "max": t, "statements": n, "correct": True}
        for v, t, n in [
            ("before", 0.040, 4),
            ("after", 0.012, 1),
            ("parallelkit", 0.020, 2),
            (HAND, 0.019, 2),
        ]
    }
    data = {
        "measured": measured,
        "calibration": {
            "round_trip_ms": 0.0,
            "probe_share": 1.0,
            "probe_statements": 4,
            "cost_ms": 25.0,
        },
        "cpu_bound": {"seconds": 0.010, "form": "one joined statement"},
        "model_bound": 0.0,
        "bound_note": "one round trip",
    }
    row = bench_playbook._row("4 DB queries", data, 0.05)
    assert row["calibrated"] is False  # 40 ms where the playbook's 400 ms x 0.05 is 20 ms
    assert row["verdict"].startswith("not judged")
    assert row["bound_ms"] == pytest.approx(10.0)  # the CPU bound
    text = bench_playbook.WHY["4 DB queries"](row, data)
    assert "no round trip was left to simulate" in text


def test_publish_rewrites_only_the_results_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\nintro\n\n{runner.BEGIN}\nold\n{runner.END}\n\nfooter\n")
    monkeypatch.setattr(runner, "DOCS_PAGE", page)
    monkeypatch.setattr(runner, "DOCS_ASSETS", tmp_path / "assets")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.png").write_bytes(b"png")
    entry = {
        "ok": True,
        "title": "X",
        "seconds": 1.0,
        "result": {"markdown": "### Where\n\ntext", "chart": {"title": "t", "groups": {}}},
    }
    runner._publish(_merged({"x": entry}), tmp_path / "out")
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n")
    assert text.endswith(f"{runner.END}\n\nfooter\n")
    assert "old" not in text
    assert "\n### x: X\n" in text  # the page's headings stay above the results'
    assert "\n#### Where\n" in text
    assert "(assets/bench-x.png)" in text
    assert (tmp_path / "assets" / "bench-x.png").read_bytes() == b"png"
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        runner._publish(_merged({"x": entry}), tmp_path / "out")
