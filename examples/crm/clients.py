"""Simulated external services: a Stripe-like payments API and a webhook receiver.

They behave like the real clients a service would call (an ``await`` that takes
a configurable time, an id minted by the provider, a record of every call) with
no network, so the scenarios, tests and benchmarks run anywhere. Swap in
``stripe`` / ``httpx`` calls with the same shape in production.

Example:
    ```python
    stripe = StripeClient(latency=0.5)
    charge = await stripe.create_charge(amount=1999, currency="usd", source="tok_visa")
    charge.id            # "ch_000001"
    ```
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["Charge", "StripeClient", "WebhookClient", "WebhookDelivery"]


@dataclass(frozen=True, slots=True)
class Charge:
    """A successful charge, as the provider returns it: the ``id`` exists only afterwards."""

    id: str
    amount: int
    currency: str
    started_at: float
    finished_at: float


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One webhook POST the receiver accepted."""

    url: str
    payload: dict[str, Any]
    started_at: float
    finished_at: float


@dataclass(slots=True)
class StripeClient:
    """A simulated payments API: ``create_charge`` takes ``latency`` seconds.

    Attributes:
        charges: every charge made, in order.
        fail_next: make the next ``n`` calls raise :class:`ConnectionError`
            (a transient error to retry).
    """

    latency: float = 0.5
    charges: list[Charge] = field(default_factory=list)
    fail_next: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _by_key: dict[str, Charge] = field(default_factory=dict)

    async def create_charge(
        self, *, amount: int, currency: str, source: str, idempotency_key: str | None = None
    ) -> Charge:
        """Charge ``amount`` (minor units); the returned ``Charge.id`` is new.

        With ``idempotency_key`` (as real payment APIs take it), a second call with
        the same key returns the first call's charge instead of charging again: a
        retry after a reply that was lost charges the card once.
        """
        if amount <= 0:
            msg = f"amount must be > 0, got {amount!r}"
            raise ValueError(msg)
        if idempotency_key is not None and idempotency_key in self._by_key:
            await anyio.sleep(self.latency)
            return self._by_key[idempotency_key]
        started = anyio.current_time()
        await anyio.sleep(self.latency)
        if self.fail_next:
            self.fail_next -= 1
            msg = f"payments API unreachable (charging {source!r})"
            raise ConnectionError(msg)
        charge = Charge(
            f"ch_{next(self._ids):06d}", amount, currency, started, anyio.current_time()
        )
        self.charges.append(charge)
        if idempotency_key is not None:
            self._by_key[idempotency_key] = charge
        return charge


@dataclass(slots=True)
class WebhookClient:
    """A simulated webhook receiver: ``post`` takes ``latency`` seconds.

    Attributes:
        deliveries: every accepted POST, in order.
    """

    latency: float = 0.2
    deliveries: list[WebhookDelivery] = field(default_factory=list)

    async def post(self, url: str, payload: dict[str, Any]) -> WebhookDelivery:
        """Deliver ``payload`` to ``url``."""
        started = anyio.current_time()
        await anyio.sleep(self.latency)
        delivery = WebhookDelivery(url, dict(payload), started, anyio.current_time())
        self.deliveries.append(delivery)
        return delivery
