"""The SQL every variant runs identically (per item, per write)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import HTTPException
from sqlalchemy import Executable, Row, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from examples.crm.models import Cadence, Contact, Conversation, Enrollment
from examples.crm.payment import Payment
from examples.crm.seed import EPOCH

from .answers import inactive_cutoff
from .bodies import ConversationIn, PaymentIn

__all__ = [
    "find_inactive",
    "open_conversations",
    "record_enrollments",
    "record_payment",
    "update_conversation",
]


async def find_inactive(
    session: AsyncSession, company_id: int, inactive_days: int
) -> tuple[int | None, Sequence[Row[int, str]]]:
    """The company's first cadence and its inactive contacts ``(id, email)``: 2 statements."""
    cutoff = inactive_cutoff(inactive_days)
    cadence_id = await session.scalar(
        select(Cadence.id).where(Cadence.company_id == company_id).order_by(Cadence.id).limit(1)
    )
    inactive = (
        await session.execute(
            select(Contact.id, Contact.email)
            .where(Contact.company_id == company_id)
            .where(or_(Contact.last_contacted_at.is_(None), Contact.last_contacted_at < cutoff))
            .order_by(Contact.id)
        )
    ).all()
    return cadence_id, inactive


async def open_conversations(session: AsyncSession, contact_id: int) -> int:
    """What the cadence's first e-mail needs to know: the contact's open conversations."""
    count = await session.scalar(
        select(func.count())
        .select_from(Conversation)
        .where(Conversation.contact_id == contact_id, Conversation.status == "open")
    )
    return int(count or 0)


async def record_enrollments(
    session: AsyncSession, cadence_id: int, contact_ids: Sequence[int]
) -> None:
    """Enroll (or re-enroll) the contacts: one ``INSERT .. ON CONFLICT DO UPDATE``, a commit.

    Idempotent, and a write every time, so a long benchmark keeps writing.
    """
    if not contact_ids:
        return
    rows = [{"cadence_id": cadence_id, "contact_id": c, "enrolled_at": EPOCH} for c in contact_ids]
    await session.execute(_upsert(session.get_bind().dialect.name, rows))
    await session.commit()


def _upsert(dialect: str, rows: list[dict[str, object]]) -> Executable:
    """``INSERT .. ON CONFLICT (contact, cadence) DO UPDATE`` in the dialect's own form."""
    key = [Enrollment.contact_id, Enrollment.cadence_id]
    if dialect == "postgresql":
        pg = postgresql_insert(Enrollment).values(rows)
        return pg.on_conflict_do_update(
            index_elements=key, set_={"enrolled_at": pg.excluded.enrolled_at}
        )
    lite = sqlite_insert(Enrollment).values(rows)
    return lite.on_conflict_do_update(
        index_elements=key, set_={"enrolled_at": lite.excluded.enrolled_at}
    )


async def record_payment(session: AsyncSession, payment: PaymentIn, charge_id: str) -> None:
    """Insert the payment row with its charge id, and commit.

    Raises:
        HTTPException: 409, the payment id is recorded already (a client's retry).
    """
    session.add(
        Payment(payment_id=payment.payment_id, amount=payment.amount, stripe_charge_id=charge_id)
    )
    try:
        await session.commit()
    except IntegrityError as exc:  # payment_id is unique: the only constraint an insert can break
        msg = f"payment {payment.payment_id!r} is already recorded"
        raise HTTPException(409, msg) from exc


async def update_conversation(
    session: AsyncSession, conversation_id: int, change: ConversationIn
) -> bool:
    """Set the conversation's subject, and commit: one ``UPDATE``. ``False``: no such row.

    The caller invalidates its cache entry afterwards (once the row is committed), so
    no read that starts after the update is answered from before it.
    """
    result = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(subject=change.subject)
        .returning(Conversation.id)
    )
    found = result.scalar_one_or_none() is not None
    await session.commit()
    return found
