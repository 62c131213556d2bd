"""Shared test configuration: every async test runs on asyncio and on trio."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """Run each ``@pytest.mark.anyio`` test on both backends."""
    backend: tuple[str, dict[str, object]] = request.param
    return backend


def need_service(what: str, reason: str) -> None:
    """Skip locally, fail under CI=true, when a real service is unreachable."""
    msg = f"{what} is not reachable: {reason}"
    if IN_CI:
        pytest.fail(f"{msg} (CI=true: service tests must run)")
    pytest.skip(msg)


PG_URL = os.environ.get(
    "PARALLELKIT_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("PARALLELKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _tcp_open(url: str, default_port: int) -> tuple[bool, str]:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url.replace("+asyncpg", ""))
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True, ""
    except OSError as exc:
        return False, f"{host}:{port}: {exc}"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The PostgreSQL URL for ``@pytest.mark.postgres`` tests (skip locally if down)."""
    ok, why = _tcp_open(PG_URL, 5432)
    if not ok:
        need_service("PostgreSQL", why)
    return PG_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis URL for ``@pytest.mark.redis`` tests (skip locally if down)."""
    ok, why = _tcp_open(REDIS_URL, 6379)
    if not ok:
        need_service("Redis", why)
    return REDIS_URL
