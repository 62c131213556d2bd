"""Outcome: the result of one item in settle mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from typing_extensions import final

T = TypeVar("T")

__all__ = ["Outcome"]


@final
@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What happened to one item: a value or an exception, never both.

    Settle mode (``settle=True`` in :func:`~parallelkit.gather`,
    :func:`~parallelkit.map`, :meth:`Flow.run <parallelkit.Flow.run>`) returns
    outcomes instead of raising the first failure, so one bad item never loses the
    others' results.

    Example:
        >>> ok, bad = Outcome.success(1), Outcome.failure(KeyError("x"))
        >>> ok.ok, ok.unwrap(), bad.ok, type(bad.error).__name__
        (True, 1, False, 'KeyError')

    Built by hand, an outcome with both a value (not ``None``) and an error is a
    ``ValueError``, and an error that is not an exception a ``TypeError``.

    Attributes:
        value: the item's result when :attr:`ok`, else ``None``.
        error: the exception the item raised, else ``None``.
    """

    value: T | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        error: object = self.error  # typed, but a user's call is checked
        if error is not None:  # one test on the success path
            if not isinstance(error, BaseException):
                msg = f"Outcome error must be an exception or None, got {error!r}"
                raise TypeError(msg)
            if self.value is not None:
                msg = (
                    f"an Outcome holds a value or an error, never both: got "
                    f"value={self.value!r} and error={error!r}"
                )
                raise ValueError(msg)

    @property
    def ok(self) -> bool:
        """``True`` when the item produced a value."""
        return self.error is None

    def unwrap(self) -> T:
        """Return the value, or raise the item's original exception."""
        if self.error is None:
            return self.value  # type: ignore[return-value]
        error = self.error
        try:
            raise error
        finally:
            # the traceback keeps this frame, whose locals would keep the exception:
            # a reference cycle, freed only by the cycle collector
            del error, self

    @staticmethod
    def success(value: T) -> Outcome[T]:
        """An outcome holding ``value``."""
        return Outcome(value, None)

    @staticmethod
    def failure(error: BaseException) -> Outcome[T]:
        """An outcome holding ``error``."""
        return Outcome(None, error)

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Outcome(error={self.error!r})"
        return f"Outcome(value={self.value!r})"
