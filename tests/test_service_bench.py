"""The service benchmark's own logic: requests, pairing per round, targets (no timing asserts)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import anyio
import pytest

pytest.importorskip("fastapi")

from benchmarks import bench_service
from benchmarks.bench_service import AA, PK, Cell, summarize
from benchmarks.service_load import _lua_string, requests_for


def cell(server: str, rnd: int, rps: float, cpu: float, p99: float = 0.1) -> Cell:
    return Cell(server, "read", 16, rnd, rps, 0.01, p99, cpu, 0.0, 0, 100)


def test_requests_are_deterministic_and_payment_ids_unique() -> None:
    assert requests_for("webhook", 5) == requests_for("webhook", 5)
    bodies = [json.loads(r.body or b"") for r in requests_for("webhook", 3)]
    assert all(len(b["events"]) == 20 for b in bodies)
    ids = [json.loads(r.body or b"")["payment_id"] for r in requests_for("payment", 50, tag="t")]
    assert len(set(ids)) == 50
    assert {r.path for r in requests_for("read", 200)} <= {
        f"/conversations/{i}" for i in range(1, 2001)
    }
    with pytest.raises(ValueError, match="unknown endpoint"):
        requests_for("nope", 1)


def test_lua_strings_escape_quotes_and_digits_after_escapes() -> None:
    # "\0341" would be read by Lua as byte 34 then "1" only with 3-digit escapes
    assert _lua_string(b'{"a":1}') == '"{\\034a\\034:1}"'


def test_ratios_are_paired_per_round_and_targets_computed() -> None:
    cells = [
        cell("ordinary", 0, 100, 0.004),
        cell("expert", 0, 200, 0.002),
        cell(PK, 0, 220, 0.001),
        cell(AA, 0, 200, 0.001),
        cell("ordinary", 1, 50, 0.004),  # a slow round for everyone
        cell("expert", 1, 100, 0.002),
        cell(PK, 1, 90, 0.001),
        cell(AA, 1, 100, 0.001),
    ]
    summary = summarize(cells, ["read"], ["ordinary", "expert", PK, AA])
    by_name = {t["target"]: t for t in summary["targets"]}
    # paired: round 0 1.1, round 1 0.9 -> median 1.0 (an unpaired median would mix rounds)
    assert by_name["read @16: rps parallelkit / expert"]["measured"] == pytest.approx(1.0)
    assert by_name["read @16: rps parallelkit / expert"]["met"] is True
    assert by_name["read @16: rps parallelkit / ordinary"]["measured"] == pytest.approx(2.0)
    assert by_name["read @16: cpu_per_request parallelkit / expert"]["measured"] == 0.5
    row = summary["ratios"][0]
    assert row[:2] == ["read", 16]
    assert row[-3].startswith("1.01 [0.91-1.11]")  # A/A req/s: twin / parallelkit


def test_the_redis_store_target_counts_only_reads_served_by_redis() -> None:
    """Cheaper than memory because it degraded to local memory is no result: a round
    with timeouts or degraded reads fails the target that says so."""
    from benchmarks.bench_service import REDIS, _store_degraded

    assert _store_degraded(None, None) == {}
    stats = {"timeouts": 2, "degraded": 5}
    assert _store_degraded({"timeouts": 0, "degraded": 1}, stats) == {
        "store_timeouts": 2,
        "store_degraded": 4,
    }
    cells = [cell(PK, r, 100, 0.001) for r in range(2)]
    cells += [cell(REDIS, r, 100, 0.001) for r in range(2)]
    cells[2].extra.update(store_timeouts=0, store_degraded=0)
    cells[3].extra.update(store_timeouts=1, store_degraded=3)
    by_name = {t["target"]: t for t in summarize(cells, ["read"], [PK, REDIS])["targets"]}
    assert by_name["read @16: CPU/request RedisStore / MemoryStore"]["met"] is True
    degraded = by_name["read @16: RedisStore timeouts + reads degraded to local memory"]
    assert (degraded["measured"], degraded["met"]) == (4, False)


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four uvicorn servers, the httpx load generator, one short round of reads."""
    monkeypatch.setattr(bench_service, "OUT", tmp_path)
    monkeypatch.delenv("PARALLELKIT_BENCH_REDIS_URL", raising=False)
    result = bench_service.run(
        quick=True, database=None, rounds=1, duration=1.0, endpoints=["read"], engine="httpx"
    )
    assert result["identical"]["cold"]["identical"]
    assert result["identical"]["warm"]["identical"]
    servers = {c["server"] for c in result["cells"]}
    assert servers == {"ordinary", "expert", PK, AA}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in result["cells"])
    assert all(c["cpu_per_request"] > 0 for c in result["cells"])
    assert result["targets"][0]["met"] is True  # identical answers
    assert any(p.suffix == ".json" for p in tmp_path.iterdir())
    assert os.path.exists(tmp_path / ".gitignore")


def test_the_service_benchmark_runs_only_when_named() -> None:
    from benchmarks._registry import available, default

    assert "service" in available()
    assert "service" not in default()
    assert default() == [n for n in available() if n != "service"]


@pytest.mark.slow
def test_calls_are_counted_per_request_and_by_library(capsys: pytest.CaptureFixture[str]) -> None:
    """The call counter serves each variant in-process (SQLite): every answer is checked,
    and only the parallelkit variant calls into parallelkit (the others never import it)."""
    from benchmarks import service_calls

    counts = {
        v: anyio.run(
            functools.partial(
                service_calls.count, v, "payment", clients=4, requests=20, database=None
            )
        )
        for v in ("expert", "parallelkit")
    }
    for v, result in counts.items():
        assert result["total"] == pytest.approx(sum(result["by_library"].values()))
        assert result["by_library"]["sqlalchemy"] > 0, v
    assert "parallelkit" not in counts["expert"]["by_library"]
    assert counts["parallelkit"]["by_library"]["parallelkit"] > 0
    assert service_calls.main(["--endpoint", "read", "--requests", "10", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    assert "read: calls per request" in out
    assert "total" in out


@pytest.mark.slow
def test_cpu_per_request_is_measured_in_one_process_and_paired_per_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every variant served in this process (SQLite): a CPU figure per round and app,
    parallelkit's ratios computed round by round from those figures, the A/A twin's too."""
    from benchmarks import service_cpu

    result = anyio.run(
        functools.partial(
            service_cpu.measure,
            "read",
            variants=("expert", "parallelkit"),
            clients=2,
            requests=10,
            rounds=2,
        )
    )
    cpu = result["cpu"]
    assert list(cpu) == ["expert", "parallelkit", service_cpu.TWIN]
    assert all(len(xs) == 2 and all(x > 0 for x in xs) for xs in cpu.values())
    expected = {
        "parallelkit / expert": [
            a / b for a, b in zip(cpu["parallelkit"], cpu["expert"], strict=True)
        ],
        "A/A (twin / parallelkit)": [
            a / b for a, b in zip(cpu[service_cpu.TWIN], cpu["parallelkit"], strict=True)
        ],
    }
    assert result["ratios"] == expected
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        anyio.run(functools.partial(service_cpu.measure, "read", rounds=0))
    with pytest.raises(ValueError, match="endpoint must be one of"):
        anyio.run(functools.partial(service_cpu.measure, "nope"))
    assert service_cpu.main(
        ["--endpoint", "read", "--requests", "5", "--clients", "2", "--rounds", "1",
         "--variants", "expert"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "read: CPU per request in one process" in out
    assert "paired per round" not in out  # no parallelkit app: no ratio to show
