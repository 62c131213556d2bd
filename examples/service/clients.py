"""The simulated outside world: a payment provider, a webhook receiver, a mailer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .settings import Settings

__all__ = ["WEBHOOK_URL", "Clients"]

WEBHOOK_URL = "https://hooks.example.com/payments"


@dataclass(slots=True)
class Clients:
    """The external APIs: a payment provider, a webhook receiver, a mailer (all simulated).

    Each call is one ``await`` of the configured latency, like a network call;
    the charge id is derived from the payment id so every variant answers the same.
    """

    charge_latency: float = 0.005
    notify_latency: float = 0.002
    mail_latency: float = 0.001
    sent: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, settings: Settings) -> Clients:
        return cls(settings.charge_latency, settings.notify_latency, settings.mail_latency)

    async def charge(self, payment_id: str, amount: int) -> str:
        """Charge the card; returns the provider's charge id."""
        await asyncio.sleep(self.charge_latency)
        return f"ch_{payment_id}"

    async def notify(self, payment_id: str, charge_id: str) -> None:
        """POST ``payment.succeeded`` to the merchant's webhook."""
        await asyncio.sleep(self.notify_latency)

    async def mail(self, email: str, template: str) -> None:
        """Send one e-mail (the cadence's first message)."""
        await asyncio.sleep(self.mail_latency)
