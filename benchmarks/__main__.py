"""Run benchmarks: ``python -m benchmarks [NAME ...] [--quick] [--database URL]``.

Runs every ``bench_*.py`` module (or the named ones) with a progress display,
then writes ``benchmarks/results/``: ``<name>.json`` per module, ``results.json``
(every module's latest result), ``report.md`` (tables, targets, verdicts) and a
PNG chart per module that provides one. A module that fails is reported (and the
exit status is 1); the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from ._registry import RESULTS, available, default, load, set_progress_hook


class _Tee(io.TextIOBase):
    """Write to the terminal (or rich's live proxy) and keep a copy for the report."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def _describe_database(url: str | None) -> str:
    if not url:
        return "SQLite (embedded, a temporary file via aiosqlite)"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a description only
        return "(unparseable URL)"


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "database": _describe_database(args.database),
    }


def _run_one(name: str, args: argparse.Namespace, status: Any) -> dict[str, Any]:
    started = time.perf_counter()
    tee = _Tee(sys.stdout)
    entry: dict[str, Any] = {"name": name}
    try:
        module = load(name)
        entry["title"] = module.TITLE
        status(f"{name}: {module.TITLE}")
        print(f"\n=== {name}: {module.TITLE} ===", flush=True)
        with contextlib.redirect_stdout(tee):
            result = module.run(quick=args.quick, database=args.database)
        entry["result"] = result
        entry["ok"] = True
    except Exception as exc:  # reported, and the others still run
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()
        print(entry["traceback"], file=sys.stderr, flush=True)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    entry["quick"] = args.quick
    entry["output"] = tee.copy.getvalue()
    entry["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return entry


def _run_all(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    try:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
    except ImportError:  # the `bench` extra is not installed: plain output
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name}", flush=True)
            entries.append(_run_one(name, args, lambda _text: None))
        return entries

    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[bench]}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        transient=False,
    ) as progress:
        task = progress.add_task("", total=len(names), bench="benchmarks")

        def status(text: str) -> None:
            progress.update(task, description=text[:90])

        set_progress_hook(status)
        try:
            for name in names:
                progress.update(task, bench=name)
                entries.append(_run_one(name, args, status))
                progress.advance(task)
            progress.update(task, bench="done", description="")
        finally:
            set_progress_hook(None)
    return entries


# -- writing the results -----------------------------------------------------------------
def _merge(entries: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    path = RESULTS / "results.json"
    merged: dict[str, Any] = {"benchmarks": {}}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            merged = json.loads(path.read_text())
            merged.setdefault("benchmarks", {})
    merged["environment"] = env
    for entry in entries:
        merged["benchmarks"][entry["name"]] = {k: v for k, v in entry.items() if k != "output"}
        merged["benchmarks"][entry["name"]]["output"] = entry["output"]
    order = available()
    merged["benchmarks"] = dict(
        sorted(
            merged["benchmarks"].items(),
            key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order),
        )
    )
    return merged


def _chart(name: str, chart: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return None
    groups: dict[str, dict[str, float]] = chart["groups"]
    series = list(dict.fromkeys(s for g in groups.values() for s in g))
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.75 * len(groups)))
    height = 0.8 / max(len(series), 1)
    labels = list(groups)
    for i, serie in enumerate(series):
        ys = [j + i * height for j in range(len(labels))]
        values = [groups[g].get(serie, float("nan")) for g in labels]
        bars = ax.barh(ys, values, height=height, label=serie)
        for bar, value in zip(bars, values, strict=True):
            if value == value:  # not NaN
                ax.text(
                    bar.get_width(),
                    bar.get_y() + bar.get_height() / 2,
                    f" {value:.0f}",
                    va="center",
                    fontsize=7,
                )
    ax.set_yticks([j + height * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel(chart.get("unit", ""))
    ax.set_title(chart.get("title", name))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = RESULTS / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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


def _targets_md(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | measured | limit | met |", "| --- | ---: | --- | --- |"]
    for t in targets:
        met = "yes" if t.get("met") else "**NO**"
        lines.append(f"| {t.get('target')} | {t.get('measured')} | {t.get('limit')} | {met} |")
    return lines


def _report(merged: dict[str, Any]) -> str:
    env = merged["environment"]
    lines = [
        "# parallelkit benchmark report",
        "",
        f"Generated {env['generated']} on {env['platform']}, Python {env['python']}, "
        f"{env['cpus']} CPUs. Database: {env['database']}. "
        f"Mode of the last run: {'quick (smoke sizes)' if env['quick'] else 'full'}.",
        "",
        "Regenerate with `python -m benchmarks` (all, full sizes), `python -m benchmarks --quick`, "
        "or `python -m benchmarks NAME`. Every comparison inside one benchmark is measured in "
        "the same run, side by side; timings are medians of repetitions, with the spread.",
        "",
        "| benchmark | what | mode | seconds | targets met | status |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for name, entry in merged["benchmarks"].items():
        result = entry.get("result") or {}
        targets = _targets(result)
        met = f"{sum(bool(t.get('met')) for t in targets)}/{len(targets)}" if targets else "-"
        status = "ok" if entry.get("ok") else f"**failed**: {entry.get('error', '')[:80]}"
        if entry.get("ok") and result.get("skipped"):
            status = f"skipped: {str(result['skipped'])[:80]}"
        mode = "quick" if entry.get("quick") else "full"
        title = entry.get("title", "")
        lines.append(f"| {name} | {title} | {mode} | {entry.get('seconds')} | {met} | {status} |")
    for name, entry in merged["benchmarks"].items():
        result = entry.get("result") or {}
        lines += ["", f"## {name}: {entry.get('title', '')}", ""]
        lines.append(
            f"Run {entry.get('finished', '?')}, {'quick' if entry.get('quick') else 'full'} mode, "
            f"{entry.get('seconds')} s."
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
        if result.get("markdown"):
            lines += [result["markdown"].rstrip(), ""]
        elif entry.get("output"):
            lines += ["```text", entry["output"].strip("\n"), "```", ""]
        if _targets(result):
            lines += ["Targets:", "", *_targets_md(_targets(result)), ""]
        if result.get("chart") and (RESULTS / f"{name}.png").exists():
            lines += [f"![{name}]({name}.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"one of {names} (default: all but service)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--database",
        default=None,
        help="SQLAlchemy URL, e.g. postgresql://postgres@127.0.0.1/test (default: SQLite)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = _environment(args)
    started = time.perf_counter()
    entries = _run_all(args.names or default(), args)
    for entry in entries:
        if entry.get("ok"):
            out = RESULTS / f"{entry['name']}.json"
            out.write_text(json.dumps(entry["result"], indent=2, default=str) + "\n")
            chart = entry["result"].get("chart") if isinstance(entry["result"], dict) else None
            if chart:
                _chart(entry["name"], chart)
    merged = _merge(entries, env)
    (RESULTS / "results.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    (RESULTS / "report.md").write_text(_report(merged))
    total = time.perf_counter() - started
    print(f"\n{len(entries)} benchmark(s) in {total:.1f} s:")
    for entry in entries:
        flag = "ok" if entry.get("ok") else f"FAILED ({entry.get('error')})"
        skipped = entry.get("ok") and isinstance(entry.get("result"), dict)
        if skipped and entry["result"].get("skipped"):
            flag = f"skipped ({entry['result']['skipped']})"
        print(f"  {entry['name']:<12} {entry['seconds']:>7.1f} s  {flag}")
    print(f"-> {RESULTS / 'report.md'}, {RESULTS / 'results.json'}")
    return 0 if all(e.get("ok") for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
