"""Whether the parallelkit pytest plugin is running the user's tests.

Set by :mod:`parallelkit.pytest_plugin` for the duration of a test session (never
at import); :class:`~parallelkit.sqlalchemy.RequestGuard` with ``enforce=None``
enforces its budget while it is ``True``.
"""

from __future__ import annotations

__all__ = ["active"]

active = False
