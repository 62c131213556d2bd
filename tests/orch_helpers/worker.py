"""A process service: starts a grandchild, reports both pids, then waits for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(f"worker {os.getpid()} started grandchild {grandchild.pid}", flush=True)
    log = Path(os.environ["PK_TEST_LOG"])
    with log.open("a") as f:
        f.write(f"worker pids {os.getpid()} {grandchild.pid}\n")
    ignore_term = len(sys.argv) > 1 and sys.argv[1] == "--ignore-term"
    if ignore_term:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
