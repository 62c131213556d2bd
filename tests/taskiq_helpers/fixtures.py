"""The fixtures of the Taskiq test modules (``pytest_plugins``): two worker processes
per module, producer-side task handles per test. (Each module keeps its own
``anyio_backend`` fixture: the root conftest's would win over a plugin's.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .processes import Workers, drop_keys, new_queue
from .tasks import Tasks, build


@pytest.fixture(scope="module")
def workers(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """Two worker processes shared by the tests of this module."""
    queue = new_queue()
    try:
        with Workers(redis_url, queue, log_dir=tmp_path_factory.mktemp("taskiq")) as pool:
            pool.start("w1", "w2")
            yield pool
    finally:
        drop_keys(redis_url, queue)


@pytest.fixture
async def tasks(workers: Workers) -> AsyncIterator[Tasks]:
    """Producer-side handles on the workers' tasks, broker started."""
    handles = build(workers.url, workers.queue)
    await handles.broker.startup()
    try:
        yield handles
    finally:
        await handles.broker.shutdown()
