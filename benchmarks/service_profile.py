"""Profile one endpoint of the service under load: where does each variant's CPU go?

``python -m benchmarks.service_profile [--endpoint enroll] [--clients 64] [--seconds 20]``

Starts the ordinary, expert and parallelkit servers (as ``bench_service`` does),
loads the endpoint with ``wrk`` one server at a time while ``py-spy record``
samples that server process (``pip install py-spy``; needs ptrace rights; only the
thread holding the GIL is sampled, so the event loop's idle wait is left out), and
prints, per variant: CPU per request, and the share of samples by library
(inclusive: a sample counts for every library on its stack) and the top frames
by self time. Collapsed stacks and the summary go to ``results/service/``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .bench_service import OUT, Server, start, stop
from .service_load import ENDPOINTS, run_wrk

#: Library buckets, by the path of a frame's file (the first match wins).
BUCKETS = (
    ("parallelkit", "/parallelkit/"),
    ("anyio", "/anyio/"),
    ("asyncio", "/asyncio/"),
    ("sqlalchemy", "/sqlalchemy/"),
    ("aiosqlite/asyncpg", "/aiosqlite/"),
    ("aiosqlite/asyncpg", "/asyncpg/"),
    ("fastapi/starlette/pydantic", "/fastapi/"),
    ("fastapi/starlette/pydantic", "/starlette/"),
    ("fastapi/starlette/pydantic", "/pydantic"),
    ("uvicorn", "/uvicorn/"),
    ("the service", "/examples/"),
)


def _bucket(frame: str) -> str:
    # py-spy writes "func (package/module.py:line)", a full path outside site-packages
    for name, needle in BUCKETS:
        if needle in frame or f"({needle[1:]}" in frame:
            return name
    return "other"


def summarize(collapsed: Path, top: int = 25) -> dict[str, Any]:
    """Inclusive share per library and top self frames from py-spy's collapsed stacks."""
    total = 0
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_frames: Counter[str] = Counter()
    in_frame: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():  # a frame name with a newline in it
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        for bucket in {_bucket(f) for f in frames}:
            inclusive[bucket] += count
        self_frames[frames[-1]] += count
        # the event loop's own C code (uvloop: I/O, callbacks, the idle wait) shows as its
        # last Python frame, Runner.run
        last = frames[-1]
        leaf[("event loop (C)" if last.startswith("Runner.run") else _bucket(last))] += count
        for frame in set(frames):
            in_frame[frame] += count
    share = {k: round(100 * v / total, 1) for k, v in inclusive.most_common()} if total else {}
    tops = (
        [(f, round(100 * n / total, 1)) for f, n in self_frames.most_common(top)] if total else []
    )
    pk = [
        (f, round(100 * n / total, 1))
        for f, n in in_frame.most_common()
        if _bucket(f) == "parallelkit" and total
    ][:top]
    by_leaf = {k: round(100 * v / total, 1) for k, v in leaf.most_common()} if total else {}
    return {
        "samples": total,
        "self_by_library": by_leaf,
        "inclusive": share,
        "self": tops,
        "parallelkit_frames": pk,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_profile")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="enroll")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--database", default=None)
    parser.add_argument("--variants", nargs="*", default=["ordinary", "expert", "parallelkit"])
    a = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    servers = [Server(v, v, f"prof_{v}") for v in a.variants]
    results: dict[str, Any] = {}
    try:
        start(servers, a.database, None)
        for server in servers:  # warm up (caches, statement caches, pool)
            run_wrk(server.url, a.endpoint, clients=16, duration=2, tag=f"warm-{server.name}")
        for server in servers:
            out = OUT / f"profile-{a.endpoint}-{server.variant}.txt"
            before, cpu0 = server.idle(), server.cpu()
            recorder = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.proc.pid if server.proc else 0),
                    "--format",
                    "raw",
                    "--rate",
                    "250",
                    "--duration",
                    str(a.seconds),
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(0.5)
            load = run_wrk(
                server.url, a.endpoint, clients=a.clients, duration=a.seconds - 1, tag="prof"
            )
            recorder.wait(timeout=a.seconds + 60)
            after, cpu1 = server.idle(), server.cpu()
            served = max(after["requests"] - before["requests"], 1)
            summary = summarize(out)
            summary["cpu_ms_per_request"] = round((cpu1 - cpu0) / served * 1000, 3)
            summary["rps"] = round(load["rps"], 1)
            results[server.variant] = summary
    finally:
        stop(servers)
    for variant, s in results.items():
        print(
            f"\n== {variant}: {s['rps']} req/s, {s['cpu_ms_per_request']} ms CPU/request, "
            f"{s['samples']} samples"
        )
        print(
            "  self time by library: "
            + ", ".join(f"{k} {v}%" for k, v in s["self_by_library"].items())
        )
        print(
            "  inclusive share by library: "
            + ", ".join(f"{k} {v}%" for k, v in s["inclusive"].items())
        )
        print("  top self frames:")
        for frame, pct in s["self"][:15]:
            print(f"    {pct:5.1f}%  {frame}")
        if s["parallelkit_frames"]:
            print("  parallelkit frames (inclusive):")
            for frame, pct in s["parallelkit_frames"][:12]:
                print(f"    {pct:5.1f}%  {frame}")
    (OUT / f"profile-{a.endpoint}.json").write_text(__import__("json").dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
