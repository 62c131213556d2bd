"""The CRM seeding function: deterministic, and safe with empty collections."""

from __future__ import annotations

import pytest
from examples.crm.models import Base
from examples.crm.seed import seed
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension does not run on trio


async def _seed(**counts: int) -> object:
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            return await seed(session, **counts)
    finally:
        await engine.dispose()


async def test_seed_with_no_conversations_needs_no_lazy_load() -> None:
    summary = await _seed(companies=2, conversations_per_contact=0)
    assert summary.conversation_ids == []  # type: ignore[attr-defined]
    assert len(summary.company_ids) == 2  # type: ignore[attr-defined]


async def test_seed_is_deterministic() -> None:
    assert await _seed(companies=3) == await _seed(companies=3)
