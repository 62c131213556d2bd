"""The service benchmark's cells, and its summary: medians, ranges, ratios paired per round."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from ._util import target

__all__ = [
    "AA",
    "CLIENTS",
    "PK",
    "RATIO_HEADERS",
    "REDIS",
    "ROW_HEADERS",
    "Cell",
    "markdown_table",
    "summarize",
]

CLIENTS = (16, 64)
PK, AA, REDIS = "parallelkit", "parallelkit (A/A twin)", "parallelkit + RedisStore"


@dataclass
class Cell:
    """One measured run: one server, one endpoint, one concurrency, one round."""

    server: str
    endpoint: str
    clients: int
    round: int
    rps: float
    p50: float
    p99: float
    cpu_per_request: float
    statements_per_request: float
    errors: int
    requests: int
    extra: dict[str, Any] = field(default_factory=dict)


# -- summary ---------------------------------------------------------------------------------------
def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _span(values: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    if not values:
        return "-"
    lo, mid, hi = min(values) * scale, _med(values) * scale, max(values) * scale
    return f"{fmt.format(mid)} [{fmt.format(lo)}-{fmt.format(hi)}]"


def _paired(
    cells: list[Cell], a: str, b: str, endpoint: str, clients: int, metric: str
) -> list[float]:
    """Per-round ratios a/b of ``metric`` (the rounds interleave a and b)."""
    by_round: dict[int, dict[str, float]] = {}
    for c in cells:
        if c.endpoint == endpoint and c.clients == clients and c.server in (a, b):
            by_round.setdefault(c.round, {})[c.server] = getattr(c, metric)
    return [r[a] / r[b] for r in by_round.values() if a in r and b in r and r[b] > 0]


def _gc(cells: list[Cell]) -> str:
    """CPU in the garbage collector per request (µs, median of rounds), full collections
    (all rounds): part of the CPU column, shown because a full collection of a large
    heap is a pause that every request in flight waits for (p99)."""
    spent = [c.extra["gc_per_request"] for c in cells if "gc_per_request" in c.extra]
    if not spent:
        return "-"
    return f"{_med(spent) * 1e6:.1f} ({sum(c.extra.get('gc_full', 0) for c in cells)})"


def summarize(cells: list[Cell], endpoints: list[str], labels: list[str]) -> dict[str, Any]:
    rows = []
    for endpoint in endpoints:
        for clients in CLIENTS:
            for label in labels:
                mine = [
                    c
                    for c in cells
                    if (c.endpoint, c.clients, c.server) == (endpoint, clients, label)
                ]
                if not mine:
                    continue
                rows.append(
                    [
                        endpoint,
                        clients,
                        label,
                        _span([c.rps for c in mine], fmt="{:.0f}"),
                        f"{_med([c.p50 for c in mine]) * 1000:.1f}",
                        _span([c.p99 for c in mine], 1000, "{:.1f}"),
                        _span([c.cpu_per_request for c in mine], 1000, "{:.2f}"),
                        f"{_med([c.statements_per_request for c in mine]):.2f}",
                        _gc(mine),
                        sum(c.errors for c in mine),
                    ]
                )
    ratios = []
    targets: list[dict[str, Any]] = []
    for endpoint in endpoints:
        for clients in CLIENTS:
            row: list[Any] = [endpoint, clients]
            for other in ("ordinary", "expert"):
                for metric, below in (("rps", False), ("cpu_per_request", True), ("p99", True)):
                    values = _paired(cells, PK, other, endpoint, clients, metric)
                    row.append(_span(values, fmt="{:.2f}"))
                    if values:
                        name = f"{endpoint} @{clients}: {metric} parallelkit / {other}"
                        targets.append(target(name, _med(values), 1.0, below=below))
            for metric in ("rps", "cpu_per_request", "p99"):
                row.append(_span(_paired(cells, AA, PK, endpoint, clients, metric), fmt="{:.2f}"))
            ratios.append(row)
    for clients in CLIENTS:
        values = _paired(cells, REDIS, PK, "read", clients, "cpu_per_request")
        if values:
            name = f"read @{clients}: CPU/request RedisStore / MemoryStore"
            targets.append(target(name, _med(values), 1.1))
            # ...measured on Redis, not on local memory: no read degraded in any round
            degraded = sum(
                c.extra.get("store_degraded", 0) + c.extra.get("store_timeouts", 0)
                for c in cells
                if (c.server, c.endpoint, c.clients) == (REDIS, "read", clients)
            )
            name = f"read @{clients}: RedisStore timeouts + reads degraded to local memory"
            targets.append(target(name, degraded, 0))
    return {"rows": rows, "ratios": ratios, "targets": targets}


ROW_HEADERS = [
    "endpoint",
    "clients",
    "variant",
    "req/s med [range]",
    "p50 ms",
    "p99 ms med [range]",
    "CPU ms/req med [range]",
    "stmts/req",
    "GC µs/req (full)",
    "errors",
]
RATIO_HEADERS = [
    "endpoint",
    "clients",
    "req/s pk/ord",
    "CPU pk/ord",
    "p99 pk/ord",
    "req/s pk/exp",
    "CPU pk/exp",
    "p99 pk/exp",
    "A/A req/s",
    "A/A CPU",
    "A/A p99",
]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
