"""A Ctrl-C that lands while the CRM demo's database is being closed.

``python -m examples.crm`` turns SIGINT into one ``Task.cancel()`` of the demo's task
(``examples/crm/__main__.py``). The cache scenario is short, so a Ctrl-C pressed
during it often lands after it, in :func:`examples.crm.db.open_database`'s clean-up:
in ``engine.dispose()``, in the middle of closing a pooled aiosqlite connection.
SQLAlchemy then logged "Exception closing connection" with a ``CancelledError``
traceback, and the temporary SQLite directory was left behind.

Here the cancellation is delivered at that exact moment (from the pool's ``close``
event, as the connection is about to be closed), not by timing luck.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from examples.crm.db import open_database
from sqlalchemy import event, text

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """SQLAlchemy's asyncio extension (aiosqlite) runs on asyncio only."""
    return "asyncio"


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``open_database`` makes its temporary SQLite directory (``TMPDIR``)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


async def _use_then_cancel_at_close(closes: int, seen: list[Any]) -> None:
    """Open the database, use two connections, leave; the task is cancelled as the pool
    closes its ``closes``-th connection (what the demo's SIGINT handler does:
    ``task.cancel()``). ``seen`` gets every connection the pool closes."""
    task = asyncio.current_task()
    assert task is not None

    def cancel_here(dbapi_connection: Any, _record: Any) -> None:
        seen.append(dbapi_connection)
        if len(seen) == closes:
            task.cancel()  # lands at the next await: inside this connection's close

    async with open_database() as db:
        async with db.sessions() as first, db.sessions() as second:  # two pooled connections
            assert await first.scalar(text("select 1")) == 1
            assert await second.scalar(text("select 2")) == 2
        event.listen(db.engine.sync_engine.pool, "close", cancel_here)


@pytest.mark.parametrize("closes", [1, 2], ids=["first connection", "last connection"])
async def test_a_cancel_inside_dispose_closes_everything_quietly_then_goes_on(
    scratch: Path, caplog: pytest.LogCaptureFixture, closes: int
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy")
    seen: list[Any] = []
    with anyio.fail_after(30):  # a hang guard
        task = asyncio.ensure_future(_use_then_cancel_at_close(closes, seen))
        await asyncio.wait([task])
    assert task.cancelled()  # the cancellation is not swallowed: delivered after the clean-up
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []  # was: "Exception closing connection ..." with a traceback
    assert len(seen) == 2  # both pooled connections closed (was: the rest skipped)
    assert os.listdir(scratch) == []  # was: the SQLite directory left behind
