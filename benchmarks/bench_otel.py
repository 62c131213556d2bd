"""Tracing: what ``parallelkit.otel`` costs ``pk.map`` per item, on and off.

Four states of one process, side by side, each a ``pk.map`` of a no-op async
function (it does not suspend, so the fan-out's own cost is all there is):

* **never instrumented**: measured first, before the instrumentor is touched;
* **instrumented** (an SDK ``TracerProvider`` exporting to memory): one span per call;
* **instrumented, item spans** (``item_spans=True``): a span per item too (fewer
  items, reported per item);
* **after uninstrument**: the instrumentor was on and was turned off again; this
  must cost what "never instrumented" costs (the "zero cost" claim).

A few uncounted warm-up calls come first; then rounds of the same shape (a call,
the sample, a small call), first never instrumented, then with the instrumented
and uninstrumented states alternating. Spans are counted from the
exporter: instrumented runs must leave exactly one ``pk.map`` span per call (and
one per item with item spans), runs after ``uninstrument()`` none; otherwise the
result is reported as wrong.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio

import parallelkit as pk

from ._util import print_targets, table, target

TITLE = "Tracing: pk.map per-item cost never instrumented, instrumented, after uninstrument"


async def noop(x: int) -> int:
    return x


def _per_item_us(items: int, limit: int) -> float:
    """CPU seconds per item of one ``pk.map`` call, in µs (CPU time: another
    process on a shared core does not count)."""

    async def once() -> float:
        start = time.process_time()
        result = await pk.map(noop, range(items), limit=limit)
        elapsed = time.process_time() - start
        if len(result) != items or result[-1] != items - 1:
            raise AssertionError("pk.map returned a wrong result")
        return elapsed

    return anyio.run(once) / items * 1e6


def run(*, quick: bool, database: str | None) -> dict[str, Any]:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from parallelkit.otel import ParallelkitInstrumentor
    except ImportError as exc:
        return {"skipped": f"needs the otel extra: {exc}"}

    items, rounds, limit = (50_000, 9, 100) if quick else (200_000, 15, 100)
    item_items = items // 50
    samples: dict[str, list[float]] = {
        "never instrumented": [],
        "instrumented": [],
        "instrumented, item spans": [],
        "after uninstrument": [],
    }
    for _ in range(10):  # warm up (imports, first calls, the allocator): not counted
        _per_item_us(items, limit)
    for _ in range(rounds):  # first, before the instrumentor is ever touched, in rounds
        _per_item_us(items, limit)  # shaped like the later ones: a call of the same size,
        samples["never instrumented"].append(_per_item_us(items, limit))  # the sample,
        _per_item_us(item_items, limit)  # and a small call

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = ParallelkitInstrumentor()
    wrong: list[str] = []

    def measure(name: str, n: int, expect_spans: int, on: Callable[[], None] | None) -> None:
        exporter.clear()
        if on is not None:
            on()
        try:
            samples[name].append(_per_item_us(n, limit))
        finally:
            if on is not None:
                instrumentor.uninstrument()
        spans = len(exporter.get_finished_spans())
        if spans != expect_spans:
            wrong.append(f"{name}: {spans} spans, expected {expect_spans}")

    for _ in range(rounds):
        measure("instrumented", items, 1, lambda: instrumentor.instrument(tracer_provider=provider))
        measure("after uninstrument", items, 0, None)
        measure(
            "instrumented, item spans",
            item_items,
            1 + item_items,
            lambda: instrumentor.instrument(tracer_provider=provider, item_spans=True),
        )

    medians = {name: statistics.median(values) for name, values in samples.items()}
    best = {name: min(values) for name, values in samples.items()}
    ratios = {name: best[name] / best["never instrumented"] for name in samples}
    rows = [[name, best[name], medians[name], ratios[name], len(samples[name])] for name in samples]
    print(
        f"pk.map(noop, range(n), limit={limit}), asyncio, CPU time; n = {items:,} "
        f"({item_items:,} with item spans); {rounds} runs each"
    )
    print(table(["state", "µs/item best", "µs/item median", "x never (best)", "runs"], rows))
    after = ratios["after uninstrument"]
    targets = [target("after uninstrument / never instrumented (best per item)", after, 1.05)]
    print_targets(targets)
    summary = [
        f"pk.map µs/item (best): never {best['never instrumented']:.3f}, after uninstrument "
        f"{best['after uninstrument']:.3f}, instrumented {best['instrumented']:.3f}, "
        f"item spans {best['instrumented, item spans']:.1f}"
    ]
    result: dict[str, Any] = {
        "items": items,
        "item_span_items": item_items,
        "limit": limit,
        "rounds": rounds,
        "µs/item best": best,
        "µs/item median": medians,
        "x never (best)": ratios,
        "samples µs/item": samples,
        "targets": targets,
        "summary": summary,
        "chart": {
            "title": "pk.map per-item CPU cost by tracing state (best run)",
            "unit": "µs/item",
            "groups": {"pk.map": dict(best)},
            "highlight": "after uninstrument",
        },
    }
    if wrong:
        result["wrong"] = wrong
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv, database=None), indent=2))
