"""Run benchmarks: ``python -m benchmarks [NAME ...] [--quick] [--database URL]``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._registry import RESULTS, available, load


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {names} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--database", default=None, help="SQLAlchemy URL (default: SQLite)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    RESULTS.mkdir(exist_ok=True)
    for name in args.names or names:
        module = load(name)
        print(f"\n=== {name}: {module.TITLE} ===", flush=True)
        started = time.perf_counter()
        result = module.run(quick=args.quick, database=args.database)
        result.setdefault("quick", args.quick)
        result.setdefault("seconds", round(time.perf_counter() - started, 2))
        out = RESULTS / f"{name}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"-> {out.relative_to(RESULTS.parent.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
