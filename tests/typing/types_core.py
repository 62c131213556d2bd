"""Inferred types of the core's public names: Outcome, Retry, the error tree (checked
by ``mypy --strict tests/typing``; never run)."""

from __future__ import annotations

import pickle

import tenacity
from typing_extensions import assert_type

import parallelkit as pk


async def _fetch(i: int) -> str:
    return str(i)


def outcomes(ok: pk.Outcome[int]) -> None:
    assert_type(ok.ok, bool)
    assert_type(ok.value, int | None)
    assert_type(ok.error, BaseException | None)
    assert_type(ok.unwrap(), int)
    assert_type(pk.Outcome.success(1), pk.Outcome[int])
    failed: pk.Outcome[int] = pk.Outcome.failure(KeyError("x"))  # any T: it has no value
    assert_type(failed.unwrap(), int)
    match ok:
        case pk.Outcome(value=value, error=None):
            assert_type(value, int | None)
        case pk.Outcome(error=error):
            assert_type(error, BaseException | None)


async def retries() -> None:
    policy = pk.Retry(attempts=3, backoff=0.1, on=(ConnectionError, TimeoutError))
    assert_type(policy.to_tenacity(), tenacity.AsyncRetrying)
    assert_type(await pk.map(_fetch, [1], retry=policy), list[str])
    custom = tenacity.AsyncRetrying(stop=tenacity.stop_after_delay(5), reraise=True)
    assert_type(await pk.gather(_fetch(1), retry=custom), list[str])
    pk.Retry(on=lambda exc: isinstance(exc, OSError))


def errors(exc: pk.ParallelkitError) -> None:
    if isinstance(exc, pk.CycleError):
        assert_type(exc.cycle, tuple[str, ...])
    if isinstance(exc, pk.StartupError):
        assert_type(exc.service, str)
        assert_type(exc.teardown_errors, tuple[tuple[str, BaseException], ...])
    if isinstance(exc, pk.DependencyFailed):
        assert_type(exc.dependency, str)
    if isinstance(exc, pk.ProcessError):
        assert_type(exc.tail, tuple[str, ...])
        assert_type(exc.returncode, int)
    again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, pk.ParallelkitError)
