"""The one argument check for numbers: type errors, value errors, one wording.

Every public option that takes seconds or a rate goes through ``_check``; the
public-API tests below prove the wiring for a few of them, the unit tests prove
the rule itself.
"""

from __future__ import annotations

import decimal
import fractions
import math

import pytest

import parallelkit as pk
from parallelkit import probes
from parallelkit._core.check import number, number_or_none


@pytest.mark.parametrize("value", ["1", b"1", [1], True, False, object()])
def test_a_non_number_is_a_type_error_naming_the_argument(value: object) -> None:
    with pytest.raises(TypeError, match=r"^timeout must be a number \(seconds\), got "):
        number("timeout", value)
    with pytest.raises(TypeError, match=r"^timeout must be a number \(seconds\) or None, got "):
        number_or_none("timeout", value)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, -math.inf])
def test_zero_negative_and_nan_are_value_errors(value: float) -> None:
    with pytest.raises(ValueError, match=r"^ttl must be > 0 \(seconds\), got "):
        number("ttl", value)


def test_zero_is_allowed_only_when_asked() -> None:
    assert number("delay", 0, zero=True) == 0.0
    with pytest.raises(ValueError, match=r"^delay must be >= 0 \(seconds\), got -1$"):
        number("delay", -1, zero=True)
    with pytest.raises(ValueError, match=r"must be >= 0"):
        number("delay", math.nan, zero=True)


def test_infinity_is_refused_unless_the_option_allows_it() -> None:
    assert number("stop_timeout", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"^rate must be finite \(starts per second\), got inf$"):
        number("rate", math.inf, unit="starts per second")


def test_valid_values_come_back_as_floats_and_none_passes_through() -> None:
    assert number("timeout", 2) == 2.0
    assert type(number("timeout", 2)) is float
    assert number_or_none("timeout", 0.25) == 0.25
    assert number_or_none("timeout", None) is None


def test_any_real_number_is_accepted_and_comes_back_as_a_float() -> None:
    # DESIGN.md: durations and rates are *real*: a Fraction is one, a Decimal is not
    half = fractions.Fraction(1, 2)
    assert number("timeout", half) == 0.5
    assert type(number("timeout", half)) is float
    assert type(number("timeout", 3)) is float
    zero = r"^timeout must be > 0 \(seconds\), got Fraction\(0, 1\)$"
    with pytest.raises(ValueError, match=zero):
        number("timeout", fractions.Fraction(0))
    with pytest.raises(TypeError, match=r"^timeout must be a number \(seconds\), got Decimal"):
        number("timeout", decimal.Decimal("0.5"))


def test_an_int_beyond_a_floats_range_is_infinite_not_an_overflow() -> None:
    with pytest.raises(ValueError, match=r"^timeout must be finite \(seconds\)"):
        number("timeout", 10**400)
    with pytest.raises(ValueError, match=r"^timeout must be > 0 \(seconds\)"):
        number("timeout", -(10**400))
    assert number("stop_timeout", 10**400, finite=False) == math.inf


@pytest.mark.anyio
async def test_public_options_take_a_fraction() -> None:
    third = fractions.Fraction(1, 3)
    assert await pk.map(_one, range(3), timeout=third, rate=fractions.Fraction(1000)) == [0, 1, 2]
    retry = pk.Retry(backoff=fractions.Fraction(1, 100))
    assert type(retry.backoff) is float
    assert retry.backoff == 0.01
    async with pk.Limiter(concurrency=1, rate=fractions.Fraction(1000)):
        pass


async def _one(x: int) -> int:
    return x


async def _ready(_value: object) -> str | None:
    return None


@pytest.mark.anyio
async def test_public_options_use_the_same_wording() -> None:
    with pytest.raises(TypeError, match=r"^timeout must be a number \(seconds\) or None"):
        await pk.gather(lambda: _one(1), timeout="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^rate must be finite \(starts per second\)"):
        await pk.map(_one, [1], rate=math.inf)
    with pytest.raises(ValueError, match=r"^initial must be > 0 \(seconds\), got 0$"):
        probes.Probe("p", _ready, initial=0)
