"""Fail with a clear message when SQLAlchemy is missing: it is an extra, not a core dependency."""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:
    msg = (
        "parallelkit.sqlalchemy needs SQLAlchemy: install the extra, "
        "`pip install 'parallelkit[sqlalchemy]'`"
    )
    raise ImportError(msg, name=exc.name) from exc

__all__: list[str] = []
