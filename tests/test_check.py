"""The one argument check for numbers: type errors, value errors, one wording.

Every public option that takes seconds or a rate goes through ``_check``; the
public-API tests below prove the wiring for a few of them, the unit tests prove
the rule itself.
"""

from __future__ import annotations

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
