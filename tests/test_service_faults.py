"""The reference service (examples/service) under faults: every variant ends in the same state.

In-process (httpx over ASGI, the lifespan run as a server would), SQLite; faults are
injected into the simulated external clients (:class:`examples.service.shared.Clients`).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")

import anyio
from examples.crm.payment import Payment
from examples.service import VARIANTS, Settings, create_app
from examples.service.shared import Clients
from examples.service.testing import client
from sqlalchemy import select

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension: asyncio only


class WebhookDown(ConnectionError):
    """The merchant's webhook receiver refused the notification."""


def sessions_of(app: Any, state: dict[str, Any]) -> Any:
    """The session factory of a running app of any variant."""
    if "db" in state:  # parallelkit: the lifespan state holds the services
        return state["db"].sessions
    if hasattr(app.state, "s"):  # expert
        return app.state.s.db.sessions
    return app.state.db.sessions  # ordinary


async def recorded(sessions: Any) -> list[tuple[str, str]]:
    async with sessions() as session:
        rows = (await session.scalars(select(Payment))).all()
    return [(p.payment_id, p.stripe_charge_id) for p in rows]


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_failed_webhook_after_the_charge_still_records_the_payment(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card is charged; the merchant's webhook is down. The request fails (a 500:
    the error escapes as itself), but the charge is recorded, so a client's retry is a
    409 ("already recorded"), never a second charge recorded as a new payment. The
    parallelkit variant's fail-fast flow used to cancel ``record`` when ``notify``
    failed: a charged card with no payment row."""

    async def webhook_down(self: Clients, payment_id: str, charge_id: str) -> None:
        raise WebhookDown(payment_id)

    state: dict[str, Any] = {}
    app = create_app(Settings(variant=variant, name=f"t_fault_notify_{variant}"))
    async with client(app, state=state) as http:
        sessions = sessions_of(app, state)
        with monkeypatch.context() as patch:
            patch.setattr(Clients, "notify", webhook_down)
            with pytest.raises(WebhookDown):
                await http.post("/payments", json={"payment_id": "p-1", "amount": 5})
        with anyio.fail_after(10):  # hang guard: the expert's insert may finish after the 500
            while not await recorded(sessions):
                await anyio.sleep(0.01)
        assert await recorded(sessions) == [("p-1", "ch_p-1")]
        retry = await http.post("/payments", json={"payment_id": "p-1", "amount": 5})
        assert retry.status_code == 409, retry.text
        stats = (await http.get("/debug/stats")).json()
    assert stats["checked_out"] == 0
    if variant == "parallelkit":
        assert stats["slots"] == {"running": 0, "waiting": 0}


@pytest.mark.parametrize("variant", ["expert", "parallelkit"])
async def test_a_failed_item_of_an_enrollment_is_listed_and_logged_once(
    variant: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fan-out keeps every item's outcome: the contact whose e-mail failed is listed
    in ``failed`` (a 200: the others stand). Nothing raises, so no server logs it: the
    handler does, once per request, with the error (it used to vanish: an outage of the
    mailer or the database answered 200s with no trace in the log)."""
    mail = Clients.mail

    async def mailer_refuses_one(self: Clients, email: str, template: str) -> None:
        if email.startswith("person0001@"):
            raise ConnectionError(f"mailer refused {email}")
        await mail(self, email, template)

    monkeypatch.setattr(Clients, "mail", mailer_refuses_one)
    app = create_app(Settings(variant=variant, name=f"t_fault_mail_{variant}"))
    async with client(app) as http:
        with caplog.at_level("WARNING", logger="examples.service"):
            response = await http.post("/companies/1/enrollments", json={"inactive_days": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["failed"] == [2]  # person0001 of company 1
    assert 2 not in body["enrolled"]
    assert body["enrolled"]
    logged = [r for r in caplog.records if r.name == "examples.service"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert "company 1: 1 of" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert isinstance(logged[0].exc_info[1], ConnectionError)
