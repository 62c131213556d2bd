"""The contract of DESIGN.md, checked name by name: import paths, signatures, errors.

Each test quotes the DESIGN.md line it holds the code to. These are quick checks of
the public surface (no I/O, no waiting on time); the behaviour behind each name has
its own test file.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from sqlalchemy.orm import sessionmaker

import parallelkit as pk
from parallelkit.sqlalchemy import count_queries, max_queries

from .test_public_api import CONTRACT_NAMES


# -- "every public import path stays parallelkit.X, parallelkit.sqlalchemy.X, ..." ------
@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("parallelkit", CONTRACT_NAMES),
        (
            "parallelkit.sqlalchemy",
            [
                "eager",
                "count_queries",
                "max_queries",
                "parallel",
                "fetch_peers",
                "load",
                "TooManyQueries",
            ],
        ),
        ("parallelkit.redis", ["RedisStore", "RedisLimiter", "RedisLock"]),
        ("parallelkit.asgi", ["lifespan"]),
        ("parallelkit.taskiq", ["map"]),
        ("parallelkit.otel", ["ParallelkitInstrumentor"]),
        ("parallelkit.probes", ["tcp"]),
    ],
)
def test_every_name_design_md_imports_is_public(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name}"
        assert name in mod.__all__, f"{module}.__all__ lacks {name}"


def test_the_error_tree_of_design_md() -> None:
    # "pk.ParallelkitError  # root of the library's own errors"
    # "pk.CycleError, pk.StartupError  # (and TooManyQueries in parallelkit.sqlalchemy)"
    from parallelkit.sqlalchemy import TooManyQueries

    for error in (pk.CycleError, pk.StartupError, TooManyQueries):
        assert issubclass(error, pk.ParallelkitError)


# -- "the callable and the items are positional, every option is keyword-only" ----------
def _kinds(fn: Callable[..., Any]) -> dict[str, inspect._ParameterKind]:
    return {name: p.kind for name, p in inspect.signature(fn).parameters.items()}


KW = inspect.Parameter.KEYWORD_ONLY
FANOUT_OPTIONS = {"limit": None, "rate": None, "timeout": None, "retry": None, "settle": False}


@pytest.mark.parametrize(
    ("fn", "positional", "options"),
    [
        (pk.map, ["fn", "items"], FANOUT_OPTIONS),
        (pk.imap, ["fn", "items"], {"limit": None, "ordered": False}),
        (pk.gather, ["aws"], FANOUT_OPTIONS),
        (pk.Flow.run, ["self"], {"limit": None, "settle": False}),
        (pk.Limiter, [], {"concurrency": None, "rate": None}),
        (pk.Retry, [], {"attempts": 3, "on": (Exception,)}),
        (pk.SWRCache, [], {"fresh": 30.0, "stale": 300.0, "maxsize": 10_000, "store": None}),
        (pk.BatchLoader, ["load_many"], {"max_batch": 500, "cache": False}),
    ],
    ids=["map", "imap", "gather", "Flow.run", "Limiter", "Retry", "SWRCache", "BatchLoader"],
)
def test_signatures_and_defaults_of_design_md(
    fn: Callable[..., Any], positional: list[str], options: dict[str, object]
) -> None:
    params = inspect.signature(fn).parameters
    kinds = _kinds(fn)
    for name in positional:
        assert kinds[name] is not KW, name
    for name, default in options.items():
        assert kinds[name] is KW, name
        assert params[name].default == default, name


def test_eager_raise_others_is_on_by_default() -> None:
    # "eager(..., raise_others=True)"
    from parallelkit.sqlalchemy import eager

    parameter = inspect.signature(eager).parameters["raise_others"]
    assert parameter.kind is KW
    assert parameter.default is True


# -- "Bad arguments: ... the message naming the argument" -------------------------------
async def _item() -> int:
    await anyio.lowlevel.checkpoint()
    return 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"limit": 0}, ValueError, "limit"),
        ({"rate": -1}, ValueError, "rate"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"limit": True}, TypeError, "limit"),
        ({"settle": 1}, TypeError, "settle"),
    ],
)
async def test_bad_options_of_map_and_gather_name_the_argument(
    options: dict[str, Any], error: type[Exception], named: str
) -> None:
    async def one(x: int) -> int:
        return x

    with pytest.raises(error, match=named):
        await pk.map(one, [1], **options)
    with pytest.raises(error, match=named):
        await pk.gather(_item, **options)


@pytest.mark.anyio
async def test_a_non_awaitable_gather_item_is_named_by_its_index() -> None:
    with pytest.raises(TypeError, match="item 1"):
        await pk.gather(_item, 5)  # type: ignore[call-overload]


# -- max_queries: a bad target is named as the user wrote the call ----------------------
@pytest.mark.parametrize(
    ("target", "says"),
    [
        (object(), "target must be an Engine"),
        (sessionmaker(), "has no bind"),
    ],
    ids=["not-an-engine", "unbound-sessionmaker"],
)
def test_a_bad_max_queries_target_names_max_queries(target: object, says: str) -> None:
    # the message named count_queries(), a function the caller never called
    with pytest.raises(TypeError, match=says) as info:
        max_queries(target, 1)
    assert str(info.value).startswith("max_queries() "), str(info.value)
    with pytest.raises(TypeError, match=says) as info:
        count_queries(target)
    assert str(info.value).startswith("count_queries() "), str(info.value)
