"""Exit with the code given, after printing to stdout and stderr; counts runs in a file."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    counter = Path(sys.argv[2])
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    print(f"run {runs} out")
    print(f"run {runs} err", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
