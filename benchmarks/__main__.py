"""Run parallelkit's benchmarks and write a report.

With no option this is the main job: every benchmark at quick sizes, on embedded
SQLite, in under a minute; it never touches a PostgreSQL or Redis server
unless you name one (--database, --redis). The report goes to .benchmarks/ in the
checkout (ignored by git): report.md, results.json, one JSON file and one chart
per benchmark. A benchmark that fails, or whose results are wrong, is reported
and makes the exit status 1; the others still run.

The playbook benchmark runs again the table of timings claimed by the playbook
parallelkit started from (a CRM backend's TypeScript "parallel execution"
playbook): its sequential code, its parallel code as written, parallelkit, and a
lower bound computed without parallelkit, every result checked.

The maintainers' reference run (full sizes, every server) rewrites the results
section of docs/benchmarks.md and its charts:

    python -m benchmarks --full --database postgresql+asyncpg://... --redis redis://... --publish
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import json
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from . import _registry
from ._registry import (
    ALIASES,
    NEEDS,
    QUICK_BUDGET_S,
    ROOT,
    available,
    default,
    load,
    set_progress_hook,
)

DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
DOCS_ASSETS = ROOT / "docs" / "assets"
BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"
PLAYBOOK = (
    "The *playbook* is the TypeScript \u201cparallel execution\u201d playbook of a CRM "
    "backend that parallelkit started from: six patterns (parallel reads, dev workflow, "
    "N+1 queries, a payment, bulk work, a cache) and a table of the timings it claims. The "
    "`playbook` "
    "benchmark runs that table again: the playbook's sequential code, its parallel code as "
    "written, the parallelkit version from `examples/crm/`, and a lower bound computed "
    "without parallelkit."
)


class _Tee(io.TextIOBase):
    """Keep a copy of a module's output for the report; echo it only when asked."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self.out is not None:
            self.out.write(text)
        return len(text)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _describe_database(url: str | None) -> str:
    if not url:
        return "SQLite (embedded, a temporary file via aiosqlite)"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a description only
        return "(unparseable URL)"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": args.machine or platform.node(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "quick": not args.full,
        "database": _describe_database(args.database),
        "redis": "yes" if args.redis else "not asked (no --redis)",
    }


#: Where modules written before ``run(redis=...)`` read their Redis URL (set only for them,
#: only while they run, only when ``--redis`` was given).
LEGACY_REDIS_VARS = ("PARALLELKIT_BENCH_REDIS_URL", "PARALLELKIT_TEST_REDIS_URL")


@contextlib.contextmanager
def _legacy_redis(url: str | None) -> Iterator[None]:
    saved = {var: os.environ.get(var) for var in LEGACY_REDIS_VARS}
    if url:
        os.environ.update(dict.fromkeys(LEGACY_REDIS_VARS, url))
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _call(name: str, args: argparse.Namespace) -> tuple[str, Any]:
    """Import and run one module; the Redis URL goes to ``run(redis=...)`` or, for a
    module that does not take it yet, to the variables it reads."""
    takes_redis = False
    with _legacy_redis(args.redis if NEEDS.get(name) else None):
        module = load(name)
        takes_redis = "redis" in inspect.signature(module.run).parameters
        kwargs: dict[str, Any] = {"quick": not args.full, "database": args.database}
        if takes_redis:
            kwargs["redis"] = args.redis
        return module.TITLE, module.run(**kwargs)


def _run_one(name: str, args: argparse.Namespace, status: Any) -> dict[str, Any]:
    started = time.perf_counter()
    tee = _Tee(sys.stdout if args.verbose else None)
    entry: dict[str, Any] = {"name": name, "quick": not args.full}
    missing = [s for s in NEEDS.get(name, ()) if not getattr(args, s)]
    entry["title"] = load_title(name)
    try:
        if missing:
            why = " and ".join(f"--{s} URL" for s in missing)
            entry["result"] = {"skipped": f"not run: needs {why}"}
        else:
            status(f"{name}: {entry['title']}")
            print(f"\n=== {name}: {entry['title']} ===", file=tee, flush=True)
            with contextlib.redirect_stdout(tee):
                entry["title"], entry["result"] = _call(name, args)
        entry["ok"] = True
    except Exception as exc:  # reported, and the others still run
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()
        print(entry["traceback"], file=sys.stderr, flush=True)
    entry["seconds"] = round(time.perf_counter() - started, 2)
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
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(names), bench="benchmarks")

        def status(text: str) -> None:
            progress.update(task, description=text[:70])

        set_progress_hook(status)
        try:
            for name in names:
                progress.update(task, bench=name)
                entries.append(_run_one(name, args, status))
                progress.advance(task)
        finally:
            set_progress_hook(None)
    return entries


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


def _publish(merged: dict[str, Any], out: Path) -> Path:
    """Rewrite the results section of docs/benchmarks.md and copy the charts to docs/assets."""
    import shutil

    def image(name: str) -> str | None:
        chart = out / f"{name}.png"
        if not chart.exists():
            return None
        DOCS_ASSETS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, DOCS_ASSETS / f"bench-{name}.png")
        return f"assets/bench-{name}.png"

    body = "\n".join(_demoted(_sections(merged, image)))
    page = DOCS_PAGE.read_text()
    head, sep, rest = page.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        msg = f"{DOCS_PAGE} has no {BEGIN} ... {END} section to rewrite"
        raise SystemExit(msg)
    DOCS_PAGE.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}")
    return DOCS_PAGE


def _summary(entries: list[dict[str, Any]], total: float, quick: bool) -> list[str]:
    lines = [f"{len(entries)} benchmark(s) in {total:.0f} s:"]
    for entry in entries:
        targets = _targets(_result(entry))
        met = f"targets {sum(bool(t.get('met')) for t in targets)}/{len(targets)} met"
        budget = QUICK_BUDGET_S.get(entry["name"])
        over = (
            f" (over its {budget:.0f} s quick budget)"
            if quick and budget and entry["seconds"] > budget and entry.get("ok")
            else ""
        )
        status = _status(entry)
        shown = f"{met}{over}" if status == "ok" and targets else status
        lines.append(f"  {entry['name']:<12} {entry['seconds']:>6.1f} s  {shown}")
        for extra in _result(entry).get("summary") or ():
            lines.append(f"      {extra}")
    return lines


def _parser(names: list[str]) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {n:<12} {load_title(n)}" for n in names)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=f"benchmarks:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument(
        "--full", action="store_true", help="full sizes and repetitions (minutes; maintainers)"
    )
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default
    parser.add_argument(
        "--database",
        metavar="URL",
        default=None,
        help="a database server for the database rows, e.g. "
        "postgresql+asyncpg://postgres@127.0.0.1/test (default: embedded SQLite only)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="run the benchmarks that need Redis, e.g. redis://127.0.0.1:6379/0 "
        "(default: they are not run)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help=f"where to write the report (default: {_rel(_registry.RESULTS)})",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="with --full: rewrite the results in docs/benchmarks.md and its charts",
    )
    parser.add_argument("--machine", default=None, help="the machine's name in the report")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each table as it runs")
    return parser


def load_title(name: str) -> str:
    """A module's ``TITLE``, read from its source: ``--help`` imports no benchmark."""
    source = (_registry.HERE / f"bench_{name}.py").read_text(encoding="utf-8")
    found = re.search(r"^TITLE\s*=\s*(\(.*?\)|\"[^\n]*\")\s*$", source, re.MULTILINE | re.DOTALL)
    try:
        return str(ast.literal_eval(found.group(1))) if found else ""
    except (SyntaxError, ValueError):
        return ""


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    return str(path)


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = _parser(names)
    args = parser.parse_args(argv)
    chosen = [ALIASES.get(n, n) for n in args.names]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    if args.publish and (not args.full or chosen):
        parser.error("--publish writes the reference results: it needs --full and every benchmark")
    out: Path = args.out or _registry.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    env = _environment(args)
    mode = "full sizes" if args.full else "quick sizes"
    print(f"parallelkit benchmarks ({mode}; database: {env['database']}; redis: {env['redis']})")
    started = time.perf_counter()
    entries = _run_all(chosen or default(), args)
    for entry in entries:
        result = _result(entry)
        if entry.get("ok"):
            (out / f"{entry['name']}.json").write_text(
                json.dumps(entry["result"], indent=2, default=str) + "\n"
            )
            if result.get("chart"):
                _chart(out, entry["name"], result["chart"])
    merged = _merge(out, entries, env)
    (out / "results.json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(_report(merged, out))
    print("\n".join(_summary(entries, time.perf_counter() - started, not args.full)))
    print(f"report: {_rel(report)}")
    if args.publish:  # this run only, never an older result left in the output directory
        this_run = {"environment": env, "benchmarks": {e["name"]: e for e in entries}}
        print(f"published: {_rel(_publish(this_run, out))}")
    return 0 if all(_good(e) for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
