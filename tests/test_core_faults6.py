"""Core bad input: an Outcome is a value or an error, never both; ``retry=`` given an
integer of another type (a NumPy one) gets the hint a plain int gets."""

from __future__ import annotations

import pickle

import pytest

import parallelkit as pk


def test_an_outcome_with_both_a_value_and_an_error_is_refused() -> None:
    with pytest.raises(ValueError, match="value or an error, never both"):
        pk.Outcome(1, KeyError("x"))
    with pytest.raises(ValueError, match="never both"):
        pk.Outcome(value="v", error=RuntimeError())


def test_an_outcome_error_that_is_not_an_exception_is_refused() -> None:
    with pytest.raises(TypeError, match="error must be an exception or None, got 'boom'"):
        pk.Outcome(None, "boom")  # type: ignore[arg-type]


def test_outcomes_that_are_one_or_the_other_are_accepted() -> None:
    assert pk.Outcome(0, None).ok
    assert pk.Outcome(0, None).value == 0
    assert pk.Outcome(None, None).ok  # a step that returned None
    assert pk.Outcome(False).unwrap() is False
    failed = pk.Outcome(None, KeyError("k"))
    assert not failed.ok
    assert pk.Outcome.failure(KeyError("k")).error is not None
    assert pickle.loads(pickle.dumps(failed)).error.args == ("k",)


async def test_settle_mode_still_gives_outcomes(anyio_backend: str) -> None:
    async def item(x: int) -> int:
        if x == 2:
            raise KeyError(x)
        return x

    got = await pk.map(item, [1, 2, 3], settle=True)
    assert [o.ok for o in got] == [True, False, True]
    assert [o.value for o in got] == [1, None, 3]


async def test_retry_given_a_numpy_integer_gets_the_attempts_hint(anyio_backend: str) -> None:
    np = pytest.importorskip("numpy")

    async def fn(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"pass retry=parallelkit\.Retry\(attempts=3\)"):
        await pk.map(fn, [1], retry=np.int64(3))  # type: ignore[arg-type]


async def test_retry_given_an_int_still_gets_the_hint_and_a_bool_does_not(
    anyio_backend: str,
) -> None:
    async def fn(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"pass retry=parallelkit\.Retry\(attempts=2\)"):
        await pk.map(fn, [1], retry=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as caught:
        await pk.map(fn, [1], retry=True)  # type: ignore[arg-type]
    assert "attempts" not in str(caught.value)
