"""The playbook's table, run again: its sequential code, its parallel code, parallelkit, a bound.

The playbook is the TypeScript "parallel execution" playbook of a CRM backend that
parallelkit started from; its "REAL PERFORMANCE IMPROVEMENTS" table claims five
timings (``PLAYBOOK``). For each row this runs, in one process, interleaved and
repeated:

* **before**: the playbook's sequential code;
* **after (as written)**: its parallel code translated faithfully
  (``Promise.all`` -> ``asyncio.gather``), bugs included;
* **parallelkit**: the ``examples/crm`` version of the same work;
* **hand-written asyncio**: the same work without parallelkit, in the same
  conditions (parallelkit's own cost is its time over this one);
* extra lines where they teach something (a set-based insert, a joined collection).

Every run's result is checked against a truth computed without parallelkit (the
rows in the database, the charge ids, the order services started in): a wrong
result is reported as wrong, whatever its speed, and fails the run.

Two lower bounds, both computed without parallelkit; a row's **bound** is the larger:

* the **model bound**: the critical path through the real dependencies, or the
  connection pool's floor, computed from the simulated durations (no measurement);
* the **CPU bound**: the CPU time the event loop's thread spends on a hand-written
  asyncio form of the same statements (``gather`` + ``Semaphore``) run with the
  simulated latency off, the least of its runs: what Python, SQLAlchemy and the
  driver cost here, which no implementation on one event loop can go under.

Simulated durations are the playbook's times a per-row time scale (1 in
``--full``; smaller in the main job, see ``_playbook_rows.QUICK``). The database
rows run on a real database (embedded SQLite, or ``--database``) with a simulated
round trip before every statement, **calibrated per row** so that the playbook's
sequential code takes the playbook's sequential time; the report checks that it
did (within ``TOLERANCE``), and does not judge the claim of a row where it did not.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any

from examples.crm.db import POOL_SIZE

from ._measure import Plan
from ._playbook_rows import FULL, HAND, PLAYBOOK, QUICK, measure
from ._util import run_async, table

TITLE = "the playbook's table: its sequential code, its parallel code, parallelkit, a lower bound"

VARIANTS = ("before", "after", "parallelkit")
#: How far the playbook's sequential code, run here, may be from the playbook's figure.
TOLERANCE = 0.15
#: parallelkit / bound: the most parallelkit may cost over the bound (default 1.5); a
#: target only where the bound is the model's (latency dominates): where this machine's
#: CPU dominates, the hand-written comparison below is the one that says something.
BOUND_LIMIT = {"4 DB queries": 1.2}
#: parallelkit / the same work written by hand in asyncio, in the same conditions.
HAND_LIMIT = 1.25


# -- one row --------------------------------------------------------------------------------
def _row(name: str, data: dict[str, Any], scale: float) -> dict[str, Any]:
    """One row of the table: measured, bounds, calibration and the verdict, all computed."""
    playbook_before, playbook_after = PLAYBOOK[name]
    m = data["measured"]
    before, after, pk = (m[v]["median"] for v in VARIANTS)
    hand = m[HAND]["median"]
    cpu = data["cpu_bound"]["seconds"] if "cpu_bound" in data else 0.0
    bound = max(data["model_bound"], cpu)
    claimed, target_before = playbook_after / 1000 * scale, playbook_before / 1000 * scale
    calibration = before / target_before
    row = {
        "operation": name,
        "scale": scale,
        "playbook_before_ms": playbook_before,
        "playbook_after_ms": playbook_after,
        "playbook_saving_pct": round(100 * (1 - playbook_after / playbook_before), 1),
        "before_ms": before * 1000,
        "after_ms": after * 1000,
        "parallelkit_ms": pk * 1000,
        "hand_ms": hand * 1000,
        "pk_over_hand": round(pk / hand, 2),
        # the hand-written form is the same work only if it sends the same statements
        "same_work": m["parallelkit"]["statements"] == m[HAND]["statements"],
        "model_bound_ms": data["model_bound"] * 1000,
        "cpu_bound_ms": cpu * 1000,
        "bound_ms": bound * 1000,
        "saving_pct": round(100 * (1 - pk / before), 1),
        "bound_saving_pct": round(100 * (1 - bound / before), 1),
        "pk_over_bound": round(pk / bound, 2),
        "bound_limit": BOUND_LIMIT.get(name, 1.5),
        "latency_bound": data["model_bound"] >= cpu,  # the model's bound is the larger
        "calibration": round(calibration, 3),
        # only the database rows have a modelled (calibrated) part; start-up is the log's sleeps
        "calibrated": abs(calibration - 1) <= TOLERANCE if "calibration" in data else None,
        "correct": {v: x["correct"] for v, x in m.items()},
        "statements": {v: x["statements"] for v, x in m.items()},
        "spread_ms": {v: [x["min"] * 1000, x["max"] * 1000] for v, x in m.items()},
    }
    if not row["correct"]["after"]:  # a wrong result is wrong whatever the timings
        verdict = "no: its parallel code gives a wrong result"
    elif row["calibrated"] is False:
        verdict = (
            f"not judged: the sequential code took {calibration:.2f}x the playbook's time here "
            f"(tolerance {TOLERANCE:.0%})"
        )
    elif claimed < bound * (1 - TOLERANCE):
        verdict = "no: the claim is below the lower bound"
    elif after > claimed * (1 + TOLERANCE):
        verdict = "no: not as written"
    else:
        verdict = "holds"
    row["verdict"] = verdict
    return row


def _at(row: dict[str, Any], key: str) -> str:
    """A measured duration in the playbook's units (divided by the row's time scale)."""
    return f"{row[key] / row['scale']:,.0f} ms"


def _reached(row: dict[str, Any]) -> str:
    ratio, limit = row["pk_over_bound"], row["bound_limit"]
    return f"within {limit:g}x of it ({ratio:.2f}x)" if ratio <= limit else f"{ratio:.2f}x of it"


# -- why each verdict: sentences built from the measured numbers ----------------------------
def _why_startup(row: dict[str, Any], data: dict[str, Any]) -> str:
    is_path = abs(row["playbook_after_ms"] * row["scale"] - row["model_bound_ms"]) <= (
        TOLERANCE * row["model_bound_ms"]
    )
    return (
        f"Model: {data['model']}. As written, the two `Promise.all` phases took "
        f"{_at(row, 'after_ms')}: phase two waits for the slowest service of phase one. "
        f"The claimed {row['playbook_after_ms']:,} ms {'is' if is_path else 'is not'} the "
        f"critical path ({_at(row, 'model_bound_ms')}), which needs each service to wait only "
        f"for what it uses; the `Orchestrator` took {_at(row, 'parallelkit_ms')}, "
        f"{_reached(row)}."
    )


#: The enrollments row's extra line (its name, as ``_playbook_bulk`` measures it).
SET_BASED = "set-based (2 statements)"


def _why_enrollments(row: dict[str, Any], data: dict[str, Any]) -> str:
    trips = (row["statements"]["before"] or 0) / 100  # measured: statements per enrollment
    per = trips * data["calibration"]["round_trip_ms"] / row["scale"]
    waves = int(row["playbook_after_ms"] // per) if per else 0
    need = f"{math.ceil(100 / waves)} connections at once" if waves else "more than 100 connections"
    text = (
        f"Each enrollment is {trips:g} round trips (look up, insert: {per:,.0f} ms here). A pool "
        f"of {POOL_SIZE} connections runs at most {POOL_SIZE} at once, so 100 take at least "
        f"{_at(row, 'model_bound_ms')}; the claimed {row['playbook_after_ms']:,} ms needs {need}. "
        "Unbounded `gather` queues the rest on the pool (at larger sizes they wait past its "
        f"timeout and fail); `pk.map(limit=pool size)` took {_at(row, 'parallelkit_ms')} with "
        "nothing queued."
    )
    bulk = data["measured"].get(SET_BASED)
    if bulk is None:
        return text
    beats = bulk["correct"] and bulk["median"] * 1000 < min(row["after_ms"], row["parallelkit_ms"])
    verdict = "beats both" if beats else "does not beat both here"
    return (
        f"{text} A set-based insert ({bulk['statements']} statements for all 100) {verdict}: "
        "see its line."
    )


def _why_four_queries(row: dict[str, Any], data: dict[str, Any]) -> str:
    trip = data["calibration"]["round_trip_ms"] / row["scale"]
    n, before = row["statements"]["parallelkit"], row["statements"]["before"]
    saves = f"{1 - n / before:.0%}" if before else "nothing"
    claim = (
        f"the claimed {row['playbook_after_ms']} ms is {row['playbook_after_ms'] / trip:.2f} "
        "round trip"
        if trip
        else "no round trip was left to simulate (this machine alone took the playbook's time)"
    )
    return (
        "The four queries are a chain (each needs the previous row's foreign key): nothing "
        f"can run in parallel; the only win is fewer round trips. One round trip is {trip:,.0f} "
        f"ms here, so {before} -> {n} saves at most {saves}; {claim}. `eager(...)` sent {n} "
        f"statement{'s' if n != 1 else ''} ({_at(row, 'parallelkit_ms')}), {_reached(row)}."
    )


def _why_payment(row: dict[str, Any], data: dict[str, Any]) -> str:
    found = data.get("why_wrong", {}).get("after") or ["see the check"]
    race = (
        "The playbook's single `Promise.all` runs the insert that stores `charge.id` while the "
        "charge that creates it is still running: its runs were checked wrong "
        f"({', '.join(found)}). "
        if not row["correct"]["after"]
        else "The playbook's parallel code gave correct rows in this run. "
    )
    return (
        f"{race}The correct bound is charge + max(insert, webhook) = "
        f"{_at(row, 'model_bound_ms')} ({row['bound_saving_pct']:g}% saving); `Flow` took "
        f"{_at(row, 'parallelkit_ms')}, {_reached(row)}."
    )


def _why_detection(row: dict[str, Any], data: dict[str, Any]) -> str:
    return (
        f"50 companies on a {POOL_SIZE}-connection pool take at least "
        f"{_at(row, 'model_bound_ms')} ({data['bound_note']}). `Promise.all` starts all 50 (or "
        "50,000) at once and one failing company discards every result; `pk.map(limit=..., "
        f"settle=True, retry=...)` took {_at(row, 'parallelkit_ms')} ({_reached(row)}), keeps "
        "every outcome and retries transient errors."
    )


WHY: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "Server startup": _why_startup,
    "100 cadence enrollments": _why_enrollments,
    "4 DB queries": _why_four_queries,
    "Payment processing": _why_payment,
    "50 company detection": _why_detection,
}


# -- the report -----------------------------------------------------------------------------
def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _intro(plan: Plan, database: str) -> str:
    return (
        "Each simulated duration is the playbook's times the row's *time scale* (1 in a full "
        "run: the ms are the playbook's units; to compare a smaller scale, divide by it; "
        f"savings are scale-free). Medians of {plan.repeat} interleaved runs "
        f"({plan.before_runs} for the sequential code); database: {database}, a pool of "
        f"{POOL_SIZE} connections, with a simulated round trip before each statement, "
        "calibrated per row so that the playbook's sequential code takes the playbook's "
        f"sequential time (checked: the *calibration* column must be within {TOLERANCE:.0%} of "
        "1, or the row's claim is not judged). Every run's result is checked against a truth "
        "computed without parallelkit. The *lower bound* is the larger of the model's bound "
        "(critical path or pool floor, computed) and the CPU bound (the event loop's CPU time "
        "for a hand-written asyncio form with the latency off, least of its runs); neither uses "
        "parallelkit."
    )


def _markdown(rows: list[dict[str, Any]], details: dict[str, Any], plan: Plan, db: str) -> str:
    lines = [
        _intro(plan, db),
        "",
        "| operation | playbook: before → after (saving) | time scale | before ms | after as "
        "written ms | parallelkit ms | hand-written ms | lower bound ms | parallelkit / bound | "
        "saving (pk) | calibration | the playbook's claim |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        after = _ms(r["after_ms"]) + ("" if r["correct"]["after"] else " (wrong)")
        pk = _ms(r["parallelkit_ms"]) + ("" if r["correct"]["parallelkit"] else " (**WRONG**)")
        lines.append(
            f"| {r['operation']} | {r['playbook_before_ms']:,} → {r['playbook_after_ms']:,} "
            f"({r['playbook_saving_pct']:g}%) | {r['scale']:g} | {_ms(r['before_ms'])} | {after} "
            f"| {pk} | {_ms(r['hand_ms'])} | {_ms(r['bound_ms'])} | {r['pk_over_bound']:.2f}x | "
            f"{r['saving_pct']:g}% | {r['calibration']:.2f} | {r['verdict']} |"
        )
    lines += [
        "",
        "Lower bounds, statements sent (counted with a plain SQLAlchemy event) and extra lines:",
        "",
        "| operation | model bound ms | CPU bound ms (event-loop CPU of the hand-written form) | "
        "statements: before / "
        "after / parallelkit | extra lines |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        d = details[r["operation"]]
        cpu = d.get("cpu_bound")
        cpu_text = f"{cpu['seconds'] * 1000:.1f} ({cpu['form']})" if cpu else "-"
        s = r["statements"]
        statements = " / ".join(str(s[v]) for v in VARIANTS) if s["before"] is not None else "-"
        extra = "; ".join(
            f"{k}: {_ms(v['median'] * 1000)} ms"
            + (f", {v['statements']} statements" if v["statements"] is not None else "")
            + ("" if v["correct"] else " (**wrong**)")
            for k, v in d["measured"].items()
            if k not in (*VARIANTS, HAND)
        )
        lines.append(
            f"| {r['operation']} | {_ms(r['model_bound_ms'])} | {cpu_text} | {statements} | "
            f"{extra or '-'} |"
        )
    lines += ["", "Spread (min-max ms over the runs):", ""]
    for r in rows:
        spread = "; ".join(f"{k} {lo:.1f}-{hi:.1f}" for k, (lo, hi) in r["spread_ms"].items())
        lines.append(f"- {r['operation']}: {spread}")
    lines += ["", "### Where the playbook's claims hold, and where they do not", ""]
    for r in rows:
        d = details[r["operation"]]
        cal = d.get("calibration")
        calibrated = (
            f" Simulated round trip {cal['round_trip_ms'] / r['scale']:,.1f} ms per statement in "
            f"the playbook's units ({cal['probe_share']:.0%} of the sequential code, "
            f"{cal['probe_statements']} statements, took {cal['cost_ms']:.1f} ms here with no "
            "latency)."
            if cal
            else ""
        )
        hand = (
            f" Written by hand in asyncio, the same work took {_at(r, 'hand_ms')}: parallelkit "
            f"{r['pk_over_hand']:.2f}x that."
            if r["same_work"]
            else f" Written by hand in asyncio ({r['statements'][HAND]} statements where "
            f"parallelkit sent {r['statements']['parallelkit']}: not the same work), it took "
            f"{_at(r, 'hand_ms')}."
        )
        lines.append(
            f"- **{r['operation']}** ({r['verdict']}; lower bound: {d['bound_note']}). "
            f"{WHY[r['operation']](r, d)}{hand}{calibrated}"
        )
    return "\n".join(lines) + "\n"


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = []
    for r in rows:
        op = r["operation"]
        targets += [
            {
                "target": f"{op}: parallelkit's result correct",
                "measured": r["correct"]["parallelkit"],
                "limit": "True",
                "met": r["correct"]["parallelkit"],
            },
            {
                "target": f"{op}: parallelkit / the same work hand-written in asyncio",
                "measured": r["pk_over_hand"],
                "limit": f"<= {HAND_LIMIT:g}, the same statements",
                # a hand-written form that sends other statements is no comparison
                "met": r["same_work"] and r["pk_over_hand"] <= HAND_LIMIT,
            },
        ]
        if r["latency_bound"]:  # a CPU bound measures this machine, not the design
            targets.append(
                {
                    "target": f"{op}: parallelkit / lower bound",
                    "measured": r["pk_over_bound"],
                    "limit": f"<= {r['bound_limit']:g}",
                    "met": r["pk_over_bound"] <= r["bound_limit"],
                }
            )
        if r["calibrated"] is not None:
            targets.append(
                {
                    "target": f"{op}: the playbook's sequential code here / its figure",
                    "measured": r["calibration"],
                    "limit": f"{1 - TOLERANCE:g} to {1 + TOLERANCE:g}",
                    "met": r["calibrated"],
                }
            )
    return targets


def _chart(rows: list[dict[str, Any]], database: str) -> dict[str, Any]:
    return {
        "title": "The playbook's table, run again: time as % of its sequential code",
        "unit": "% of the sequential code's time",
        "highlight": "parallelkit",
        "bound": "lower bound",
        "note": (
            f"{database}; lower bound = max(model, CPU), computed without parallelkit; "
            "(as written: wrong) = the playbook's parallel code gives a wrong result"
        ),
        "groups": {
            r["operation"] + ("" if r["correct"]["after"] else "\n(as written: wrong)"): {
                "parallelkit": 100 * r["parallelkit_ms"] / r["before_ms"],
                "lower bound": 100 * r["bound_ms"] / r["before_ms"],
                "the playbook's claim": 100 * r["playbook_after_ms"] / r["playbook_before_ms"],
                "its parallel code as written": 100 * r["after_ms"] / r["before_ms"],
                "hand-written asyncio": 100 * r["hand_ms"] / r["before_ms"],
            }
            for r in rows
        },
    }


def report(measured: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Print the table; return the JSON-ready result with targets, chart and Markdown."""
    details, database = measured["details"], measured["database"]
    rows = [_row(name, details[name], plan.scales[name]) for name in PLAYBOOK if name in details]
    print(f"median of {plan.repeat} runs, {database}, pool {POOL_SIZE}; ms as measured")
    print(
        table(
            ["operation", "scale", "before", "after*", "parallelkit", "by hand", "bound", "claim"],
            [
                [
                    r["operation"],
                    f"{r['scale']:g}",
                    _ms(r["before_ms"]),
                    _ms(r["after_ms"]) + ("" if r["correct"]["after"] else " WRONG"),
                    _ms(r["parallelkit_ms"]) + ("" if r["correct"]["parallelkit"] else " WRONG"),
                    _ms(r["hand_ms"]),
                    _ms(r["bound_ms"]),
                    r["verdict"],
                ]
                for r in rows
            ],
        )
    )
    print("* after = the playbook's parallel code as written")
    wrong = [
        f"{r['operation']}: {v} gave a wrong result"
        + (
            f" ({details[r['operation']]['measured'][v]['error']})"
            if "error" in details[r["operation"]]["measured"][v]
            else ""
        )
        for r in rows
        for v, ok in r["correct"].items()
        if not ok and v != "after"  # the playbook's parallel code being wrong is a finding
    ]
    return {
        "rows": rows,
        "details": details,
        "meta": {
            "database": database,
            "pool_size": POOL_SIZE,
            "tolerance": TOLERANCE,
            "plan": {"scales": dict(plan.scales), "repeat": plan.repeat, "runs": plan.before_runs},
        },
        "targets": _targets(rows),
        "chart": _chart(rows, database),
        "summary": [
            f"{r['operation']:<24} {r['saving_pct']:g}% under the sequential code, "
            f"{r['pk_over_hand']:.2f}x hand-written, {r['pk_over_bound']:.2f}x its lower bound; "
            f"the playbook's claim: {r['verdict']}"
            for r in rows
        ],
        "wrong": wrong,
        "markdown": _markdown(rows, details, plan, database),
    }


def run(*, quick: bool, database: str | None, redis: str | None = None) -> dict[str, Any]:
    """The benchmark entry point: ``database`` None is embedded SQLite; Redis is not used."""
    plan = QUICK if quick else FULL
    return report(run_async(measure(plan, database)), plan)


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv, database=None), indent=2, default=str))
