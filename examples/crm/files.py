"""Scenario 1 - parallel reads of many files, bounded.

The playbook reads three files with ``Promise.all`` and calls it a pattern. For
three files it is fine; for 10,000 it opens 10,000 files at once and the
process runs out of file descriptors (``OSError: [Errno 24] Too many open
files`` under the common ``ulimit -n 1024``): every task opens its file, then
waits for a worker thread to read it, holding the descriptor meanwhile.

``pk.map(read, paths, limit=64)`` pulls paths from the iterable only as slots
free up, so at most ``limit`` files are open at any moment, whatever the number
of paths, and results come back in order.

Example:
    ```python
    paths = make_files(tmp_dir, 10_000)
    report = await read_files(paths, limit=64)
    report.files, report.peak_open        # (10000, <= 64)
    ```
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

import parallelkit as pk

__all__ = ["FilesReport", "make_files", "read_files", "read_files_unbounded"]


@dataclass(frozen=True, slots=True)
class FilesReport:
    """What a read run did: files and bytes read, and the most files open at once."""

    files: int
    bytes: int
    peak_open: int


class _OpenFiles:
    """Counts files open right now, and the peak."""

    __slots__ = ("now", "peak")

    def __init__(self) -> None:
        self.now = self.peak = 0

    async def read(self, path: Path) -> bytes:
        async with await anyio.open_file(path, "rb") as f:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                return await f.read()
            finally:
                self.now -= 1


def make_files(directory: str | os.PathLike[str], n: int = 10_000, size: int = 64) -> list[Path]:
    """Write ``n`` small files (``size`` bytes each) into ``directory``; return their paths."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"file_{i:05d}.txt"
        path.write_bytes(f"{i:05d}".encode().ljust(size, b"."))
        paths.append(path)
    return paths


async def read_files(paths: Sequence[Path], *, limit: int = 64) -> FilesReport:
    """Read every file, at most ``limit`` open at once (``pk.map``)."""
    counter = _OpenFiles()
    contents = await pk.map(counter.read, paths, limit=limit)
    return FilesReport(len(contents), sum(map(len, contents)), counter.peak)


async def read_files_unbounded(paths: Sequence[Path]) -> FilesReport:
    """The playbook's ``Promise.all`` over every path: one task per file, all at once. DON'T."""
    counter = _OpenFiles()
    contents: list[bytes] = [b""] * len(paths)

    async def one(i: int, path: Path) -> None:
        contents[i] = await counter.read(path)

    async with anyio.create_task_group() as tg:
        for i, path in enumerate(paths):
            tg.start_soon(one, i, path)
    return FilesReport(len(contents), sum(map(len, contents)), counter.peak)
