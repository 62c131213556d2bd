"""Smoke tests of the benchmark suite: it runs, and writes its report (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import __main__ as runner
from benchmarks._registry import available

ROOT = Path(__file__).resolve().parent.parent


def test_the_seed_benchmark_is_registered_first() -> None:
    assert available()[0] == "seed"


def test_targets_are_normalized_for_the_report() -> None:
    as_list = {"targets": [{"target": "a", "measured": 1, "limit": "<= 2", "met": True}]}
    as_dict = {"targets": {"b": {"target": "<= 3", "ratio": 4, "met": False}}}
    assert runner._targets(as_list) == as_list["targets"]
    assert runner._targets(as_dict) == [
        {"target": "b", "measured": 4, "limit": "<= 3", "met": False}
    ]
    report = runner._report(
        {
            "environment": {
                "generated": "now",
                "platform": "p",
                "python": "3",
                "cpus": 2,
                "quick": True,
                "database": "SQLite",
            },
            "benchmarks": {
                "x": {
                    "ok": True,
                    "title": "X",
                    "seconds": 1.0,
                    "quick": True,
                    "result": as_dict,
                    "output": "table",
                },
                "y": {"ok": False, "title": "Y", "error": "boom", "traceback": "tb"},
            },
        }
    )
    assert "| b | 4 | <= 3 | **NO** |" in report  # a miss is shown, not hidden
    assert "**failed**: boom" in report


@pytest.mark.slow
def test_seed_benchmark_quick_smoke(tmp_path: Path) -> None:
    """``python -m benchmarks seed --quick`` end to end, results in a temp dir."""
    env = {**os.environ, "PARALLELKIT_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "seed", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    seed = results["benchmarks"]["seed"]["result"]
    assert [r["operation"] for r in seed["rows"]] == [
        "Server startup",
        "100 cadence enrollments",
        "4 DB queries",
        "Payment processing",
        "50 company detection",
    ]
    statements = {r["operation"]: r["statements"] for r in seed["rows"]}
    assert statements["4 DB queries"]["before"] == 4
    assert statements["4 DB queries"]["parallelkit"] == 1
    assert statements["100 cadence enrollments"]["parallelkit"] == 200
    payment = seed["details"]["Payment processing"]["correct"]
    assert payment == {"before": True, "after": False, "parallelkit": True}  # the race shows
    report = (tmp_path / "report.md").read_text()
    assert "Where the seed's claims hold" in report
    assert "charge + max(insert, webhook)" in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "seed.png").stat().st_size > 1000
