"""``NotServed`` (a torn-down service asked for by a request) is public and whole.

It was named in the docs but importable from no public module, and not a
``ParallelkitError``: its ``__init__`` takes three arguments, so ``pickle`` and
``copy`` failed on it (every error of the tree survives them).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import AsyncIterator

import pytest

import parallelkit as pk

pytestmark = pytest.mark.anyio


def test_not_served_is_public_and_in_the_tree() -> None:
    assert "NotServed" in pk.__all__
    assert issubclass(pk.NotServed, pk.ParallelkitError)
    assert issubclass(pk.NotServed, LookupError)  # ``except LookupError`` still catches it


def test_not_served_survives_pickle_and_copy() -> None:
    error = pk.NotServed("db", "crashed", RuntimeError("boom"))
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(again) is pk.NotServed
        assert str(again) == str(error) == "service 'db' crashed: RuntimeError('boom')"
        assert (again.name, again.state) == ("db", "crashed")


async def test_a_request_view_raises_the_public_not_served() -> None:
    orch = pk.Orchestrator()

    @orch.service
    async def db() -> AsyncIterator[str]:
        yield "engine"

    async with orch.start() as running:
        view = running._served()  # what parallelkit.asgi hands a request
        assert view["db"] == "engine"
    with pytest.raises(pk.NotServed) as caught:
        view.get("db")
    assert (caught.value.name, caught.value.state) == ("db", "stopped")
