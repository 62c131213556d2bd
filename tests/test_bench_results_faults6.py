"""The benchmark runner's results: two runs writing to one ``--out`` keep each other's
entries; the redis benchmark reads its Redis URL when it runs, not at import."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import benchmarks._results as results
import pytest
from benchmarks import bench_redis


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ENV = {
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


def _entry(name: str) -> dict[str, Any]:
    return {"name": name, "ok": True, "title": name, "seconds": 1.0, "result": {}}


def test_two_runs_writing_results_at_once_keep_both_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merge = results._merge
    lock = threading.Lock()
    inside = 0
    most = 0
    both_in = threading.Event()

    def slow_merge(out: Path, entries: list[dict[str, Any]], env: dict[str, Any]) -> Any:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            if inside == 2:
                both_in.set()
        # the other run gets this long to read the file too (it can, unless locked out)
        both_in.wait(0.5)
        try:
            return merge(out, entries, env)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(results, "_merge", slow_merge)
    env = ENV
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results.write_results(tmp_path, [_entry(name)], env)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("fanout", "flow")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert most == 1  # one read-merge-write at a time
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["benchmarks"]) == {"fanout", "flow"}
    assert (tmp_path / "report.md").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".results.json.")] == []


def test_a_failed_write_leaves_the_previous_results_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results.write_results(tmp_path, [_entry("fanout")], ENV)
    before = (tmp_path / "results.json").read_text()

    def broken(merged: dict[str, Any], out: Path | None = None) -> str:
        raise RuntimeError("the report failed")

    monkeypatch.setattr(results, "_report", broken)
    with pytest.raises(RuntimeError, match="the report failed"):
        results.write_results(tmp_path, [_entry("flow")], ENV)
    # results.json was replaced whole (with both entries) or not at all; no temp file left
    merged = json.loads((tmp_path / "results.json").read_text())
    assert "fanout" in merged["benchmarks"]
    assert before != ""
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_the_redis_benchmark_reads_its_url_when_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    # imported above, before the variable is set: the run must still use it
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    monkeypatch.setenv("PARALLELKIT_BENCH_REDIS_URL", url)
    result = bench_redis.run(quick=True, database=None)
    assert url in result["skipped"]


def test_the_redis_benchmark_uses_the_url_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARALLELKIT_BENCH_REDIS_URL", raising=False)
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    result = bench_redis.run(quick=True, database=None, redis=url)
    assert url in result["skipped"]
