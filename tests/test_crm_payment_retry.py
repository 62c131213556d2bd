"""The CRM example's payment: a charge retried after a lost reply charges once."""

from __future__ import annotations

from typing import Any

import pytest
from examples.crm.clients import Charge, StripeClient
from examples.crm.payment import charge, payment_flow

pytestmark = pytest.mark.anyio


class LostReply(StripeClient):
    """The first charge is made, then its reply is lost (a connection reset)."""

    lost = 1

    async def create_charge(self, **kwargs: Any) -> Charge:
        made = await super().create_charge(**kwargs)
        if self.lost:
            self.lost -= 1
            msg = "connection reset before the reply"
            raise ConnectionError(msg)
        return made


async def test_a_charge_retried_after_a_lost_reply_charges_the_card_once() -> None:
    stripe = LostReply(latency=0.0)
    result = await payment_flow.run(payment_id="p1", amount=1999, stripe=stripe, targets=charge)
    assert len(stripe.charges) == 1
    assert result.get(charge) == stripe.charges[0]


async def test_another_payment_is_another_charge() -> None:
    stripe = StripeClient(latency=0.0)
    one = await stripe.create_charge(amount=1, currency="usd", source="a", idempotency_key="a")
    again = await stripe.create_charge(amount=1, currency="usd", source="a", idempotency_key="a")
    other = await stripe.create_charge(amount=1, currency="usd", source="b", idempotency_key="b")
    assert one is again
    assert other.id != one.id
    assert len(stripe.charges) == 2
