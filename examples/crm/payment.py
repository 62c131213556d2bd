"""Scenario 4 - the payment: charge, then (record the payment ∥ notify the webhook).

The playbook "parallelises" its payment with one ``Promise.all`` over the
charge, the database insert and the webhook. But the insert stores
``charge.id``, which does not exist until the charge returns, and the webhook
announces a payment that may yet fail. Run together, the insert records a
payment with no charge id, and a failed charge still leaves a row and a sent
webhook behind: a data race, not an optimisation.
(:func:`process_payment_seed_gather` reproduces it, for the tests and the
benchmark.)

With :class:`parallelkit.Flow` each step names what it needs: ``record`` and
``notify`` take ``charge``, so they start the moment it exists and overlap each
other. The makespan is ``charge + max(insert, webhook)`` (700 ms with the
playbook's 500/100/200 ms), the correct ideal, not the playbook's claimed 500 ms.
The flow runs settled: a webhook that fails at once does not cancel the ``INSERT``
of a charged card (:func:`process_payment`).

Example:
    ```python
    result = await process_payment("pay_1", 1999, stripe=stripe, webhooks=hooks,
                                    sessions=db.sessions)
    row, charged = result.get(record).unwrap(), result.get(charge).unwrap()
    row.stripe_charge_id == charged.id   # True
    print(result.timeline.to_text())
    ```
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import parallelkit as pk

from .clients import Charge, StripeClient, WebhookClient

__all__ = [
    "WEBHOOK_URL",
    "Payment",
    "PaymentBase",
    "payment_flow",
    "process_payment",
    "process_payment_seed_gather",
    "process_payment_sequential",
]

WEBHOOK_URL = "https://webhook.example.com/payments"
Sessions = Callable[[], AsyncSession]


class PaymentBase(DeclarativeBase):
    """The payments table lives beside the CRM schema (``db.create_schema`` makes both)."""


class Payment(PaymentBase):
    """A recorded payment. ``stripe_charge_id`` is nullable only so the playbook's race shows."""

    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[int]
    stripe_charge_id: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"Payment(payment_id={self.payment_id!r}, charge={self.stripe_charge_id!r})"


async def _insert(
    sessions: Sessions, payment_id: str, amount: int, charge_id: str | None
) -> Payment:
    async with sessions() as session:
        payment = Payment(payment_id=payment_id, amount=amount, stripe_charge_id=charge_id)
        session.add(payment)
        await session.commit()
        return payment


def _payload(payment_id: str, charge_id: str | None) -> dict[str, Any]:
    return {"event": "payment.succeeded", "payment_id": payment_id, "charge_id": charge_id}


# -- the playbook's "before": one thing after another ---------------------------------------
async def process_payment_sequential(
    payment_id: str,
    amount: int,
    *,
    stripe: StripeClient,
    webhooks: WebhookClient,
    sessions: Sessions,
) -> Payment:
    """Charge, then insert, then notify: correct, and charge + insert + webhook long."""
    charge = await stripe.create_charge(amount=amount, currency="usd", source=payment_id)
    payment = await _insert(sessions, payment_id, amount, charge.id)
    await webhooks.post(WEBHOOK_URL, _payload(payment_id, charge.id))
    return payment


# -- the playbook's "after", as written: a race ------------------------------------------------
async def process_payment_seed_gather(
    payment_id: str,
    amount: int,
    *,
    stripe: StripeClient,
    webhooks: WebhookClient,
    sessions: Sessions,
) -> tuple[Charge, Payment, Any]:
    """The playbook's ``Promise.all([charge, insert, webhook])``, translated faithfully. DON'T.

    The insert cannot have ``charge.id`` (it is not known yet), so it records
    ``None``; the webhook announces a charge that may still fail. Kept only to
    show the race in tests and benchmarks.
    """
    charge, payment, delivery = await asyncio.gather(
        stripe.create_charge(amount=amount, currency="usd", source=payment_id),
        _insert(sessions, payment_id, amount, None),  # charge.id does not exist yet
        webhooks.post(WEBHOOK_URL, _payload(payment_id, None)),
    )
    return charge, payment, delivery


# -- parallelkit: steps wired by what they need --------------------------------------------
payment_flow = pk.Flow(name="payment")


@payment_flow.step(retry=pk.Retry(attempts=3, on=(ConnectionError,)))
async def charge(payment_id: str, amount: int, stripe: StripeClient) -> Charge:
    """Charge the card (retried on a transient connection error; the idempotency key
    makes a retry after a lost reply return that charge instead of charging again)."""
    return await stripe.create_charge(
        amount=amount, currency="usd", source=payment_id, idempotency_key=payment_id
    )


@payment_flow.step
async def record(charge: Charge, payment_id: str, sessions: Sessions) -> Payment:
    """Insert the payment with its charge id: waits for ``charge``."""
    return await _insert(sessions, payment_id, charge.amount, charge.id)


@payment_flow.step
async def notify(charge: Charge, payment_id: str, webhooks: WebhookClient) -> Any:
    """Tell the webhook receiver: waits for ``charge``, overlaps ``record``."""
    return await webhooks.post(WEBHOOK_URL, _payload(payment_id, charge.id))


async def process_payment(
    payment_id: str,
    amount: int,
    *,
    stripe: StripeClient,
    webhooks: WebhookClient,
    sessions: Sessions,
) -> pk.FlowOutcomes:
    """Run :data:`payment_flow`: charge → (record ∥ notify). ``result.timeline`` shows it.

    Settled (``settle=True``), as the payment recipe teaches: once the card is
    charged, a webhook that fails does not cancel the ``INSERT`` still running (a
    charged card with no row). Every step runs to its end, then the first error is
    raised as itself, in the order that matters: the charge's (nothing else ran),
    then the row's, then the webhook's. Returns the outcomes:
    ``result.get(record).unwrap()`` is the stored :class:`Payment`.
    """
    outcomes = await payment_flow.run(
        payment_id=payment_id,
        amount=amount,
        stripe=stripe,
        webhooks=webhooks,
        sessions=sessions,
        settle=True,
    )
    outcomes["charge"].unwrap()  # declined: nothing else ran
    outcomes["record"].unwrap()
    outcomes["notify"].unwrap()
    return outcomes
