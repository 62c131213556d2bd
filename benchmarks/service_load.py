"""The load generator of ``bench_service``: real HTTP from a separate process.

Two engines, the same requests:

* ``wrk`` (C, when installed: ``apt-get install wrk``): a Lua script cycles
  through pre-built requests, one connection per client, and prints its summary
  as JSON;
* httpx (always available): ``python -m benchmarks.service_load`` runs an
  ``httpx.AsyncClient`` with one keep-alive connection per client.

Both are closed loops: ``clients`` connections, each sending its next request as
soon as the previous answer arrived, for ``duration`` seconds. Every answer that
is not a 2xx counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The endpoints the benchmark loads: name -> what it is.
ENDPOINTS = {
    "webhook": "POST /webhooks/batch (20 events: conversation -> contact -> company -> rules)",
    "read": "GET /conversations/{id} (cached read, 2,000 conversations)",
    "enroll": "POST /companies/{id}/enrollments (fan-out: a session + an e-mail per contact)",
    "payment": "POST /payments (charge, then record || notify)",
}
WEBHOOK_EVENTS = 20
EVENTS = ("conversation.created", "conversation.closed", "message.received", "contact.idle")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    body: bytes | None


def requests_for(
    endpoint: str, n: int, *, seed: int = 18, tag: str = "x", conversations: int = 2000
) -> list[Request]:
    """``n`` deterministic requests for ``endpoint`` (payment ids are unique per ``tag``)."""
    rng = random.Random(f"{endpoint}-{seed}")
    companies = max(conversations // 100, 1)
    out: list[Request] = []
    for i in range(n):
        if endpoint == "webhook":
            events = [
                {"conversation_id": rng.randint(1, conversations), "event": rng.choice(EVENTS)}
                for _ in range(WEBHOOK_EVENTS)
            ]
            out.append(Request("POST", "/webhooks/batch", _json({"events": events})))
        elif endpoint == "read":
            out.append(Request("GET", f"/conversations/{rng.randint(1, conversations)}", None))
        elif endpoint == "enroll":
            company = rng.randint(1, companies)
            body = _json({"inactive_days": 21})
            out.append(Request("POST", f"/companies/{company}/enrollments", body))
        elif endpoint == "payment":
            body = _json({"payment_id": f"{tag}-{i}", "amount": 1000 + i % 1000})
            out.append(Request("POST", "/payments", body))
        else:
            msg = f"unknown endpoint {endpoint!r}; known: {sorted(ENDPOINTS)}"
            raise ValueError(msg)
    return out


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- wrk -------------------------------------------------------------------------------------------
def wrk_path() -> str | None:
    return shutil.which("wrk")


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" if b in (34, 92) or b < 32 else chr(b) for b in data) + '"'


_LUA_TEMPLATE = """
local reqs = {{{table}}}
local n = #reqs
local payment = {payment}
local tag = "{tag}"
local threads = {{}}
local counter = 0
local index = 0
tid = 0
local next_tid = 0

function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
  table.insert(threads, thread)
end

function init(args)
  index = tid * 7919
end

function request()
  if payment then
    counter = counter + 1
    local body = string.format('{{"payment_id":"%s-%d-%d","amount":1999}}', tag, tid, counter)
    return wrk.format("POST", "/payments", {{["Content-Type"] = "application/json"}}, body)
  end
  index = index + 1
  return reqs[(index % n) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def _wrk_script(endpoint: str, tag: str, conversations: int) -> str:
    if endpoint == "payment":
        table = ""
    else:
        entries = []
        for r in requests_for(endpoint, 400, conversations=conversations):
            headers = '{["Content-Type"] = "application/json"}' if r.body else "{}"
            body = _lua_string(r.body) if r.body else "nil"
            entries.append(f'wrk.format("{r.method}", "{r.path}", {headers}, {body})')
        table = ",\n".join(entries)
    return _LUA_TEMPLATE.format(
        table=table, payment="true" if endpoint == "payment" else "false", tag=tag
    )


def run_wrk(
    url: str, endpoint: str, *, clients: int, duration: float, tag: str, conversations: int = 2000
) -> dict[str, Any]:
    """One closed-loop ``wrk`` run; returns requests, errors, req/s, p50/p99 seconds."""
    wrk = wrk_path()
    if wrk is None:  # pragma: no cover - checked by the caller
        msg = "wrk is not installed"
        raise RuntimeError(msg)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_wrk_script(endpoint, tag, conversations))
    try:
        threads = min(2, clients)
        out = subprocess.run(
            [
                wrk,
                f"-t{threads}",
                f"-c{clients}",
                f"-d{max(1, round(duration))}s",
                "--timeout",
                "30s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        msg = f"wrk failed ({out.returncode}): {out.stdout[-800:]} {out.stderr[-800:]}"
        raise RuntimeError(msg)
    raw = json.loads(line[len("WRKJSON ") :])
    seconds = raw["duration_us"] / 1e6
    errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
    return {
        "engine": "wrk",
        "requests": raw["requests"],
        "seconds": seconds,
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50": raw["p50_us"] / 1e6,
        "p99": raw["p99_us"] / 1e6,
        "errors": errors,
    }


# -- httpx (the fallback engine, in a child process) -----------------------------------------------
async def _httpx_load(
    url: str, endpoint: str, clients: int, duration: float, tag: str, conversations: int
) -> dict[str, Any]:
    import httpx

    pool = requests_for(endpoint, 400, tag=tag, conversations=conversations)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        start = time.perf_counter()
        deadline = start + duration

        async def worker(k: int) -> None:
            nonlocal errors
            i = k * 7919
            counter = 0
            while time.perf_counter() < deadline:
                i += 1
                counter += 1
                if endpoint == "payment":
                    body = _json({"payment_id": f"{tag}-{k}-{counter}", "amount": 1999})
                    method, path = "POST", "/payments"
                else:
                    r = pool[i % len(pool)]
                    method, path, body = r.method, r.path, r.body
                t0 = time.perf_counter()
                try:
                    resp = await client.request(method, path, content=body, headers=headers)
                    ok = 200 <= resp.status_code < 300
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(worker(k) for k in range(clients)))
        seconds = time.perf_counter() - start
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "engine": "httpx",
        "requests": len(latencies),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50": q[49],
        "p99": q[98],
        "errors": errors,
    }


def run_httpx(
    url: str, endpoint: str, *, clients: int, duration: float, tag: str, conversations: int = 2000
) -> dict[str, Any]:
    """One closed-loop httpx run in a separate process (same result shape as :func:`run_wrk`)."""
    args = [sys.executable, "-m", "benchmarks.service_load", url, endpoint, str(clients)]
    args += [str(duration), tag, str(conversations)]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=duration + 120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0:
        msg = f"load generator failed: {out.stderr[-1500:]}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="httpx closed-loop load (used by bench_service)")
    parser.add_argument("url")
    parser.add_argument("endpoint", choices=sorted(ENDPOINTS))
    parser.add_argument("clients", type=int)
    parser.add_argument("duration", type=float)
    parser.add_argument("tag")
    parser.add_argument("conversations", type=int)
    a = parser.parse_args()
    result = asyncio.run(
        _httpx_load(a.url, a.endpoint, a.clients, a.duration, a.tag, a.conversations)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
