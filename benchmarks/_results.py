"""What a benchmark run's results say, and the report written from them.

:mod:`benchmarks.__main__` runs the modules and collects one entry per benchmark
(its result, its output, whether it failed); this module reads those entries
(status, targets, whether they are good), merges them into ``results.json``,
draws each benchmark's chart and writes the Markdown of ``report.md`` (the same
sections go to docs/benchmarks.md with ``--publish``). Kept apart from the
runner: nothing here runs a benchmark, and the report's layout changes for
reasons of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._registry import available

PLAYBOOK = (
    "The *playbook* is the TypeScript \u201cparallel execution\u201d playbook of a CRM "
    "backend that parallelkit started from: six patterns (parallel reads, dev workflow, "
    "N+1 queries, a payment, bulk work, a cache) and a table of the timings it claims. The "
    "`playbook` "
    "benchmark runs that table again: the playbook's sequential code, its parallel code as "
    "written, the parallelkit version from `examples/crm/`, and a lower bound computed "
    "without parallelkit."
)


# -- what a result says ------------------------------------------------------------------
def _result(entry: dict[str, Any]) -> dict[str, Any]:
    result = entry.get("result")
    return result if isinstance(result, dict) else {}


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The module's targets as a list of dicts (a ``{name: {...}}`` mapping is accepted too)."""
    raw = result.get("targets") or []
    if isinstance(raw, dict):
        items = []
        for key, value in raw.items():
            if isinstance(value, dict):
                measured = next(
                    (value[k] for k in ("measured", "ratio", "measured_ms") if k in value), None
                )
                limit = value.get("limit", value.get("target"))
                items.append(
                    {
                        "target": key,
                        "measured": measured,
                        "limit": limit,
                        "met": bool(value.get("met")),
                    }
                )
            else:
                items.append({"target": key, "measured": value, "limit": "", "met": bool(value)})
        return items
    if isinstance(raw, list):
        return [t if isinstance(t, dict) else {"target": str(t), "met": False} for t in raw]
    return []


def _status(entry: dict[str, Any]) -> str:
    result = _result(entry)
    if not entry.get("ok"):
        return f"FAILED: {entry.get('error', '')}"
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if result.get("wrong"):
        return "WRONG RESULTS: " + "; ".join(map(str, result["wrong"]))
    return "ok"


def _good(entry: dict[str, Any]) -> bool:
    return bool(entry.get("ok")) and not _result(entry).get("wrong")


# -- writing the results -----------------------------------------------------------------
def _merge(out: Path, entries: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """Add this run's entries to ``results.json`` of ``out`` (one section per benchmark)."""
    path = out / "results.json"
    merged: dict[str, Any] = {"benchmarks": {}}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            merged = json.loads(path.read_text())
            merged.setdefault("benchmarks", {})
    merged["environment"] = env
    for entry in entries:
        merged["benchmarks"][entry["name"]] = entry
    order = available()
    merged["benchmarks"] = dict(
        sorted(
            merged["benchmarks"].items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order),
        )
    )
    return merged


def write_results(out: Path, entries: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    """Merge this run's entries into ``results.json`` and write it and ``report.md``.

    Two runs writing to one ``--out`` at the same moment each keep the other's entries:
    the read-merge-write is done under an exclusive lock on ``out/.results.lock``
    (POSIX ``flock``; elsewhere unlocked), and each file is replaced whole (written
    beside it, then renamed), so a reader never sees half a file."""
    with _locked(out / ".results.lock"):
        merged = _merge(out, entries, env)
        _replace(out / "results.json", json.dumps(merged, indent=2, default=str) + "\n")
        _replace(out / "report.md", _report(merged, out))
    return merged


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: parallelkit's bars: one strong colour; every other series a shade of grey.
PK_COLOR, OTHER_COLORS = "#1f6fd1", ["#4d4d4d", "#8c8c8c", "#b8b8b8", "#d9d9d9", "#6b6b6b"]


def _chart(out: Path, name: str, chart: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return None
    groups: dict[str, dict[str, float]] = chart["groups"]
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    highlight = chart.get("highlight", "parallelkit")
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.95 * len(groups)))
    height = 0.8 / max(len(series), 1)
    labels = list(groups)
    greys = iter(OTHER_COLORS * 4)
    for i, serie in enumerate(series):
        ys = [j + i * height for j in range(len(labels))]
        values = [groups[g].get(serie, float("nan")) for g in labels]
        mine, bound = serie == highlight, serie == chart.get("bound")
        bars = ax.barh(
            ys,
            values,
            height=height * 0.92,
            label=serie,
            color=PK_COLOR if mine else "white" if bound else next(greys),
            edgecolor="black" if mine else "#555555" if bound else "none",
            hatch="////" if bound else None,
            linewidth=1.2 if mine else 0.8 if bound else 0,
            zorder=3,
        )
        for bar, value in zip(bars, values, strict=True):
            if value == value:  # not NaN
                ax.text(
                    bar.get_width(),
                    bar.get_y() + bar.get_height() / 2,
                    f" {value:.0f}",
                    va="center",
                    fontsize=8,
                    fontweight="bold" if mine else "normal",
                    color=PK_COLOR if mine else "#333333",
                )
    ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.grid(axis="x", color="#e6e6e6", zorder=0)
    ax.set_xlabel(f"{chart.get('unit', '')}  \u2014  shorter is better \u2190")
    ax.set_title(f"{chart.get('title', name)} (shorter is better)", loc="left", fontweight="bold")
    if chart.get("note"):
        fig.text(0.01, 0.005, chart["note"], fontsize=8, color="#555555", va="bottom")
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles, names, fontsize=8, loc="lower right", framealpha=0.95)
    xmax = max((v for g in groups.values() for v in g.values() if v == v), default=1.0)
    ax.set_xlim(0, xmax * 1.12)
    fig.tight_layout(rect=(0, 0.03 if chart.get("note") else 0, 1, 1))
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _targets_md(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | limit | met |", "| --- | ---: | --- | --- |"]
    for t in targets:
        met = "yes" if t.get("met") else "**NO**"
        lines.append(f"| {t.get('target')} | {t.get('measured')} | {t.get('limit')} | {met} |")
    return lines


def _sections(merged: dict[str, Any], image: Any) -> list[str]:
    """The per-benchmark tables and sections; ``image(name)`` is a chart's link or None."""
    env = merged["environment"]
    lines = [
        f"Run {env['generated']} on {env['machine']} ({env['cpu']}, {env['cpus']} CPUs; "
        f"{env['platform']}, Python {env['python']}). Database: {env['database']}; Redis: "
        f"{env['redis']}. Mode of the last run: "
        f"{'quick (the main job: small sizes)' if env['quick'] else 'full'}.",
        "",
        "| benchmark | what | mode | seconds | targets met | status |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for name, entry in merged["benchmarks"].items():
        targets = _targets(_result(entry))
        met = f"{sum(bool(t.get('met')) for t in targets)}/{len(targets)}" if targets else "-"
        status = _status(entry)
        status = status if status in ("ok",) else f"**{status[:100]}**"
        mode = "quick" if entry.get("quick") else "full"
        lines.append(
            f"| {name} | {entry.get('title', '')} | {mode} | {entry.get('seconds')} | {met} "
            f"| {status} |"
        )
    for name, entry in merged["benchmarks"].items():
        result = _result(entry)
        lines += ["", f"## {name}: {entry.get('title', '')}", ""]
        # an older run's entry (kept from results.json) says where it ran when the last
        # run's servers, in the heading above, are not the ones it used
        servers = "".join(
            f" {label}: {entry[key]}."
            for key, label in (("database", "Database"), ("redis", "Redis"))
            if entry.get(key) is not None and entry[key] != env.get(key)
        )
        lines.append(
            f"Run {entry.get('finished', '?')}, {'quick' if entry.get('quick') else 'full'} mode, "
            f"{entry.get('seconds')} s.{servers}"
        )
        lines.append("")
        if not entry.get("ok"):
            lines += [
                "**This benchmark failed:**",
                "",
                "```text",
                entry.get("traceback", ""),
                "```",
            ]
            continue
        if result.get("skipped"):
            lines += [f"Skipped: {result['skipped']}.", ""]
            continue
        if result.get("wrong"):
            lines += ["**Wrong results:**", ""] + [f"- {w}" for w in result["wrong"]] + [""]
        if result.get("markdown"):
            lines += [result["markdown"].rstrip(), ""]
        elif entry.get("output"):
            lines += ["```text", entry["output"].strip("\n"), "```", ""]
        if _targets(result):
            lines += ["Targets:", "", *_targets_md(_targets(result)), ""]
        link = image(name) if result.get("chart") else None
        if link:
            lines += [f"![{result['chart'].get('title', name)}]({link})", ""]
    return lines


def _report(merged: dict[str, Any], out: Path | None = None) -> str:
    def image(name: str) -> str | None:
        return f"{name}.png" if out is not None and (out / f"{name}.png").exists() else None

    lines = [
        "# parallelkit benchmark report",
        "",
        PLAYBOOK,
        "",
        "Every comparison inside one benchmark is measured in the same run, side by side and "
        "interleaved; timings are medians of repetitions, with the spread. Regenerate with "
        "`python -m benchmarks` (quick), `python -m benchmarks --full`, or "
        "`python -m benchmarks NAME`.",
        "",
        *_sections(merged, image),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _demoted(lines: list[str]) -> list[str]:
    """Every Markdown heading one level down (the page has its own), code blocks untouched."""
    fenced = False
    result = []
    for block in lines:
        for line in block.split("\n"):
            if line.startswith("```"):
                fenced = not fenced
            result.append(f"#{line}" if not fenced and re.match(r"#{1,5} ", line) else line)
    return result
