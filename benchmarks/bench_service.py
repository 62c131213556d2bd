"""The CRM service under real HTTP load: ordinary vs expert vs parallelkit (issue 18).

``python -m benchmarks service [--quick] [--database URL]`` (Redis: set
``PARALLELKIT_BENCH_REDIS_URL``), or directly, with every option::

    python -m benchmarks.bench_service --quick --database postgresql://... --redis redis://...

What it does:

1. starts one uvicorn server **process** per variant of :mod:`examples.service`
   (ordinary, expert, parallelkit, a second identical parallelkit server for
   the A/A row, and with Redis a parallelkit server whose cache is a
   ``RedisStore``); each seeds its own copy of the data (2,000 conversations);
2. sends the same sampled requests to every server and compares the answers
   byte for byte (before and after the load);
3. loads each endpoint from a **separate process** (``wrk`` if installed, else
   an httpx client) at 16 and 64 concurrent clients, variants interleaved and
   their order rotated each round, several rounds;
4. per cell: requests/s, p50/p99 latency, the server process's CPU seconds per
   request (psutil, before/after), SQL statements per request (the server's
   counter, ``GET /debug/stats``), the part of the CPU spent in the garbage
   collector and its full collections (``gc.callbacks`` in the server), and errors
   (non-2xx, socket errors);
5. reports medians with the range over rounds, and parallelkit's ratios against
   each variant (paired per round), with the A/A ratio as the noise level.

The machine may be shared and noisy: read a ratio against the A/A row's range
before trusting it. Database and Redis servers run in their own processes; their
CPU is not in "CPU per request". Results go to ``results/service/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._registry import RESULTS, report_progress
from ._util import print_targets, table, unreachable
from .service_load import ENDPOINTS, requests_for, run_httpx, run_wrk, wrk_path
from .service_report import (
    AA,
    CLIENTS,
    PK,
    RATIO_HEADERS,
    REDIS,
    ROW_HEADERS,
    Cell,
    markdown_table,
    summarize,
)

TITLE = "FastAPI service over real HTTP: ordinary vs expert vs parallelkit (uvicorn, wrk/httpx)"
ROOT = Path(__file__).resolve().parent.parent
OUT = RESULTS / "service"


@dataclass
class Server:
    """One uvicorn server process serving one variant."""

    label: str
    variant: str
    name: str
    store: str = "memory"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    ps: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stats(self) -> dict[str, Any]:
        """The server's counters: ``statements``, ``requests`` (finished), ``active``,
        ``gc_seconds`` / ``gc_full`` (CPU in the garbage collector, full collections)."""
        with urllib.request.urlopen(f"{self.url}/debug/stats", timeout=30) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def idle(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until no request is running (the load's last requests finish), then stats."""
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def output_dir() -> Path:
    """``results/service/``, created, with a ``.gitignore`` so nothing in it is tracked."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ".gitignore").write_text("*\n")
    return OUT


def start(servers: list[Server], database: str | None, redis: str | None) -> None:
    """Start every server (they seed concurrently) and wait until each answers ``/health``."""
    import psutil

    output_dir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for server in servers:
        server.port = _free_port()
        args = [sys.executable, "-m", "examples.service", "--variant", server.variant]
        args += ["--name", server.name, "--port", str(server.port), "--store", server.store]
        if database:
            args += ["--database", database]
        if redis and server.store == "redis":
            args += ["--redis", redis]
        server.log = OUT / f"server-{server.name}.log"
        with server.log.open("wb") as log:
            server.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)
        server.ps = psutil.Process(server.proc.pid)
    deadline = time.monotonic() + 180
    for server in servers:
        while True:
            assert server.proc is not None
            if server.proc.poll() is not None:
                tail = server.log.read_text()[-2000:] if server.log else ""
                msg = f"server {server.label} exited with {server.proc.returncode}: {tail}"
                raise RuntimeError(msg)
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp,
            ):
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                msg = f"server {server.label} did not become ready"
                raise RuntimeError(msg)
            time.sleep(0.2)


def stop(servers: list[Server]) -> None:
    """SIGINT (uvicorn's graceful stop: the lifespan tears down), then SIGKILL if stuck."""
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in servers:
        if server.proc is None:
            continue
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


# -- identical answers -----------------------------------------------------------------------------
def check_identical(
    servers: list[Server], endpoints: list[str], samples: int, tag: str
) -> dict[str, Any]:
    """Send the same requests to every server; every answer must be byte-identical."""
    import httpx

    checked = 0
    mismatches: list[dict[str, Any]] = []
    with httpx.Client(timeout=60) as client:
        for endpoint in endpoints:
            targets = [s for s in servers if endpoint == "read" or s.store == "memory"]
            for request in requests_for(endpoint, samples, seed=99, tag=tag):
                answers = {}
                for server in targets:
                    resp = client.request(
                        request.method,
                        server.url + request.path,
                        content=request.body,
                        headers={"Content-Type": "application/json"},
                    )
                    answers[server.label] = (resp.status_code, resp.content)
                checked += 1
                if len(set(answers.values())) != 1 or next(iter(answers.values()))[0] != 200:
                    mismatches.append(
                        {
                            "endpoint": endpoint,
                            "path": request.path,
                            "answers": {k: [v[0], v[1][:300].decode()] for k, v in answers.items()},
                        }
                    )
    return {"checked": checked, "identical": not mismatches, "mismatches": mismatches[:5]}


def wrong_answers(cold: dict[str, Any], warm: dict[str, Any]) -> list[str]:
    """The requests whose answers differed between the variants (or were not 200): wrong
    results, which fail the run (the ordinary and expert servers are the truth)."""
    return [
        f"{kind}: {m['endpoint']} {m['path']}: the variants' answers differ (or are not 200)"
        for kind, checked in (("cold", cold), ("warm", warm))
        for m in checked["mismatches"]  # the first five of each
    ]


# -- one measured run ------------------------------------------------------------------------------
def measure(
    server: Server, endpoint: str, clients: int, duration: float, tag: str, engine: str, rnd: int
) -> Cell:
    load = run_wrk if engine == "wrk" else run_httpx
    before = server.idle()
    cpu0 = server.cpu()
    result = load(server.url, endpoint, clients=clients, duration=duration, tag=tag)
    after = server.idle()  # the requests still running when the load stopped finish too
    cpu1 = server.cpu()
    # CPU and statements per request: over every request the server finished in the
    # window (counted by the server), so the stragglers' work is not charged to others
    served = max(after["requests"] - before["requests"], 1)
    return Cell(
        server=server.label,
        endpoint=endpoint,
        clients=clients,
        round=rnd,
        rps=result["rps"],
        p50=result["p50"],
        p99=result["p99"],
        cpu_per_request=(cpu1 - cpu0) / served,
        statements_per_request=(after["statements"] - before["statements"]) / served,
        errors=result["errors"],
        requests=result["requests"],
        extra={
            "served": served,
            # of the CPU: the time in Python's garbage collector, and its full collections
            "gc_per_request": (after["gc_seconds"] - before["gc_seconds"]) / served,
            "gc_full": after["gc_full"] - before["gc_full"],
            # a RedisStore's commands that timed out and reads served from local memory
            # instead (an outage, or an event loop too busy to read Redis's answers in time)
            **_store_degraded(before.get("store"), after.get("store")),
        },
    )


def _store_degraded(before: Any, after: Any) -> dict[str, int]:
    """``store_timeouts`` / ``store_degraded`` in the window, for a server with a store."""
    if not before or not after:
        return {}
    return {
        "store_timeouts": after["timeouts"] - before["timeouts"],
        "store_degraded": after["degraded"] - before["degraded"],
    }


def _servers(redis: str | None) -> list[Server]:
    servers = [
        Server("ordinary", "ordinary", "ordinary"),
        Server("expert", "expert", "expert"),
        Server(PK, "parallelkit", "parallelkit"),
        Server(AA, "parallelkit", "parallelkit_aa"),
    ]
    if redis:
        servers.append(Server(REDIS, "parallelkit", "parallelkit_redis", store="redis"))
    return servers


# -- the run ---------------------------------------------------------------------------------------
def run(
    *,
    quick: bool,
    database: str | None,
    redis: str | None = None,
    rounds: int | None = None,
    duration: float | None = None,
    endpoints: list[str] | None = None,
    engine: str = "auto",
) -> dict[str, Any]:
    redis = redis or os.environ.get("PARALLELKIT_BENCH_REDIS_URL") or None
    if redis and (why := unreachable(redis, 6379)):
        return {"skipped": f"Redis: {why}"}
    if engine == "auto":
        engine = "wrk" if wrk_path() else "httpx"
    rounds = rounds or (2 if quick else 3)
    duration = duration or (3.0 if quick else 8.0)
    warmup = 1.0 if quick else 3.0
    samples = 5 if quick else 20
    endpoints = endpoints or list(ENDPOINTS)
    servers = _servers(redis)
    labels = [s.label for s in servers]
    load_before = os.getloadavg()
    print(
        f"{len(servers)} servers ({', '.join(labels)}), {database or 'SQLite'}, "
        f"load generator: {engine}; {rounds} rounds x {duration:g} s per cell; "
        f"load average before: {load_before[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    cells: list[Cell] = []
    started = time.perf_counter()
    try:
        report_progress("starting the servers (each seeds 2,000 conversations)")
        start(servers, database, redis)
        report_progress("checking identical answers (cold caches)")
        cold = check_identical(servers, endpoints, samples, "sample-cold")
        for endpoint in endpoints:
            for server in servers:
                if endpoint != "read" and server.store != "memory":
                    continue
                report_progress(f"warm-up {endpoint} on {server.label}")
                load = run_wrk if engine == "wrk" else run_httpx
                load(server.url, endpoint, clients=16, duration=warmup, tag=f"warm-{server.name}")
        for rnd in range(rounds):
            for endpoint in endpoints:
                mine = [s for s in servers if endpoint == "read" or s.store == "memory"]
                for clients in CLIENTS:
                    shift = rnd % len(mine)
                    for server in mine[shift:] + mine[:shift]:  # rotated each round
                        report_progress(
                            f"round {rnd + 1}/{rounds}: {endpoint} @{clients} on {server.label}"
                        )
                        cell = measure(
                            server, endpoint, clients, duration, f"r{rnd}c{clients}", engine, rnd
                        )
                        cells.append(cell)
                        print(
                            f"  r{rnd + 1} {endpoint:<8} @{clients:<3} {server.label:<26} "
                            f"{cell.rps:8.0f} req/s  p99 {cell.p99 * 1000:7.1f} ms  "
                            f"CPU {cell.cpu_per_request * 1000:6.2f} ms/req  "
                            f"{cell.statements_per_request:6.2f} stmts/req  errors {cell.errors}  "
                            f"GC {cell.extra['gc_per_request'] * 1e6:6.1f} us/req "
                            f"({cell.extra['gc_full']} full)",
                            flush=True,
                        )
        report_progress("checking identical answers (warm caches)")
        warm = check_identical(servers, endpoints, samples, "sample-warm")
    finally:
        stop(servers)
    summary = summarize(cells, endpoints, labels)
    identical = cold["identical"] and warm["identical"]
    summary["targets"].insert(
        0,
        {
            "target": "identical answers from every variant (sampled, cold and warm)",
            "measured": f"{cold['checked'] + warm['checked']} requests x {len(servers)} servers",
            "limit": "all identical",
            "met": identical,
        },
    )
    errors = sum(c.errors for c in cells)
    text = "\n".join(
        [
            "",
            table(ROW_HEADERS, summary["rows"]),
            "",
            "parallelkit's ratios, paired per round: median [range]; A/A = twin / parallelkit",
            "(req/s above 1 and CPU, p99 below 1 favour parallelkit).",
            table(RATIO_HEADERS, summary["ratios"]),
            "",
            f"identical answers: {identical} ({cold['checked']} cold + {warm['checked']} warm "
            f"requests, each sent to every server); errors under load: {errors}",
        ]
    )
    print(text)
    print_targets(summary["targets"])
    load_after = os.getloadavg()
    markdown = "\n\n".join(
        [
            f"Servers: {', '.join(labels)}; database: {database or 'SQLite (aiosqlite)'}; "
            f"Redis: {'yes' if redis else 'no'}; load generator: {engine}; {rounds} rounds x "
            f"{duration:g} s per cell, variants interleaved (order rotated per round). Load "
            f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
            f"{os.cpu_count()} CPUs shared with other work: read ratios against the A/A columns.",
            markdown_table(ROW_HEADERS, summary["rows"]),
            markdown_table(RATIO_HEADERS, summary["ratios"]),
            f"Identical answers: {identical}; errors under load: {errors}.",
        ]
    )
    result = {
        "database": database or "sqlite",
        "redis": bool(redis),
        "engine": engine,
        "rounds": rounds,
        "duration": duration,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"before": load_before, "after": load_after},
        "identical": {"cold": cold, "warm": warm},
        "cells": [c.__dict__ for c in cells],
        "rows": summary["rows"],
        "ratios": summary["ratios"],
        "targets": summary["targets"],
        "markdown": markdown,
        "wrong": wrong_answers(cold, warm),
    }
    _save(result, text)
    return result


def _save(result: dict[str, Any], text: str) -> None:
    output_dir()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    kind = "sqlite" if result["database"] == "sqlite" else "pg"
    kind += "-redis" if result["redis"] else ""
    (OUT / f"service-{kind}-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (OUT / f"service-{kind}-{stamp}.txt").write_text(text + "\n")
    print(f"-> {OUT / f'service-{kind}-{stamp}.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_service", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default: SQLite)")
    parser.add_argument("--redis", default=None, help="Redis URL: adds a RedisStore server")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell")
    parser.add_argument("--endpoints", nargs="*", choices=sorted(ENDPOINTS), default=None)
    parser.add_argument("--engine", choices=("auto", "wrk", "httpx"), default="auto")
    a = parser.parse_args(argv)
    result = run(
        quick=a.quick,
        database=a.database,
        redis=a.redis,
        rounds=a.rounds,
        duration=a.duration,
        endpoints=a.endpoints,
        engine=a.engine,
    )
    return 0 if not result.get("skipped") and not result.get("wrong") else 1


if __name__ == "__main__":
    sys.exit(main())
