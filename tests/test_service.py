"""The reference service (examples/service): every variant answers every request the same.

In-process (httpx over ASGI, the lifespan run as a server would), SQLite by
default; the PostgreSQL + Redis variant carries the ``postgres`` and ``redis``
markers. Statement counts come from the server's own counter (``/debug/stats``)
with one request at a time, so they are exact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")

from examples.service import VARIANTS, Settings, create_app
from examples.service.testing import client

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension and redis.asyncio: asyncio only


WEBHOOK = {
    "events": [
        {"conversation_id": 1, "event": "message.received"},
        {"conversation_id": 7, "event": "conversation.created"},
        {"conversation_id": 1500, "event": "contact.idle"},
        {"conversation_id": 33, "event": "conversation.closed"},
        {"conversation_id": 1999, "event": "message.received"},
        {"conversation_id": 1, "event": "contact.idle"},
    ]
}
#: (name, method, path, body)
REQUESTS: list[tuple[str, str, str, Any]] = [
    ("webhook", "POST", "/webhooks/batch", WEBHOOK),
    ("webhook-missing", "POST", "/webhooks/batch", {"events": [{"conversation_id": 99999}]}),
    ("read-miss", "GET", "/conversations/42", None),
    ("read-hit", "GET", "/conversations/42", None),
    ("read-missing", "GET", "/conversations/999999", None),
    ("enroll", "POST", "/companies/3/enrollments", {"inactive_days": 21}),
    ("enroll-again", "POST", "/companies/3/enrollments", {"inactive_days": 21}),
    ("enroll-missing", "POST", "/companies/999/enrollments", {}),
    ("payment", "POST", "/payments", {"payment_id": "pay-1", "amount": 1999}),
]


async def answers(settings: Settings) -> dict[str, tuple[int, bytes, int]]:
    """Send :data:`REQUESTS` one at a time: ``{name: (status, body, statements)}``."""
    out: dict[str, tuple[int, bytes, int]] = {}
    async with client(create_app(settings)) as http:

        async def statements() -> int:
            count: int = (await http.get("/debug/stats")).json()["statements"]
            return count

        for name, method, path, body in REQUESTS:
            before = await statements()
            response = await http.request(method, path, json=body)
            out[name] = (response.status_code, response.content, await statements() - before)
    return out


def assert_identical(by_variant: dict[str, dict[str, tuple[int, bytes, int]]]) -> None:
    first = next(iter(by_variant.values()))
    for name in first:
        seen = {v: a[name][:2] for v, a in by_variant.items()}
        assert len(set(seen.values())) == 1, (name, seen)


async def test_every_variant_answers_the_same_and_parallelkit_sends_the_fewest_statements() -> None:
    by_variant = {v: await answers(Settings(variant=v, name=f"t_{v}")) for v in VARIANTS}
    assert_identical(by_variant)
    pk = by_variant["parallelkit"]
    status = {name: a[0] for name, a in pk.items()}
    assert status == {
        "webhook": 200,
        "webhook-missing": 404,
        "read-miss": 200,
        "read-hit": 200,
        "read-missing": 404,
        "enroll": 200,
        "enroll-again": 200,
        "enroll-missing": 404,
        "payment": 200,
    }
    enrolled = json.loads(pk["enroll"][1])["enrolled"]
    assert len(enrolled) > 5
    assert json.loads(pk["enroll"][1])["failed"] == []
    statements = {name: a[2] for name, a in pk.items()}
    assert statements == {
        "webhook": 2,  # eager(...): one joined SELECT + one selectin for the rules
        "webhook-missing": 1,  # nothing found: no rules to load
        "read-miss": 1,  # conversation + contact + company joined
        "read-hit": 0,  # fresh in the SWRCache
        "read-missing": 1,
        # cadence + contacts, a SELECT per contact (its own session), one multi-row upsert
        "enroll": 2 + len(enrolled) + 1,
        "enroll-again": 2 + len(enrolled) + 1,
        "enroll-missing": 2,
        "payment": 1,
    }
    # the N+1 the ordinary variant pays, and what the expert wrote by hand
    assert by_variant["ordinary"]["webhook"][2] > 10
    assert by_variant["expert"]["webhook"][2] == 2
    assert by_variant["ordinary"]["read-hit"][2] == 0


async def test_payment_records_the_charge_id() -> None:
    from examples.crm.payment import Payment
    from sqlalchemy import select

    state: dict[str, Any] = {}
    async with client(create_app(Settings(name="t_pay")), state=state) as http:
        response = await http.post("/payments", json={"payment_id": "p-7", "amount": 500})
        async with state["db"].sessions() as session:
            row = (await session.scalars(select(Payment))).one()
    assert response.json() == {
        "payment_id": "p-7",
        "amount": 500,
        "charge_id": "ch_p-7",
        "status": "succeeded",
    }
    assert (row.payment_id, row.amount, row.stripe_charge_id) == ("p-7", 500, "ch_p-7")


async def test_a_payment_waits_for_the_pool_before_it_builds_its_unit_of_work() -> None:
    """``async with db.slots, db.sessions()``: a request queued behind a busy pool keeps
    no session, and no row it is about to add, alive while it waits (the hand-written
    semaphore's order; measured: under half the collector's passes under load)."""
    import anyio
    from examples.crm.payment import Payment
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    added: list[object] = []

    def on_add(session: Session, instance: object) -> None:
        if isinstance(instance, Payment):
            added.append(instance)

    state: dict[str, Any] = {}
    settings = Settings(name="t_wait", pool_size=1, charge_latency=0, notify_latency=0)
    event.listen(Session, "transient_to_pending", on_add)
    try:
        async with client(create_app(settings), state=state) as http:
            slots = state["db"].slots
            assert slots.concurrency == 1
            responses = []

            async def pay() -> None:
                body = {"payment_id": "p-wait", "amount": 5}
                responses.append(await http.post("/payments", json=body))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg, slots:  # the pool is busy
                    tg.start_soon(pay)
                    while slots.statistics().waiting < 1:
                        await anyio.lowlevel.checkpoint()
                    built_while_queued = list(added)
            assert built_while_queued == []  # it waited before building anything
            assert [r.status_code for r in responses] == [200]
            assert len(added) == 1
    finally:
        event.remove(Session, "transient_to_pending", on_add)


@pytest.mark.postgres
@pytest.mark.redis
async def test_postgres_and_redis_answer_the_same(pg_url: str, redis_url: str) -> None:
    variants = {
        "expert": Settings(variant="expert", name="t_pg_expert", database=pg_url),
        "parallelkit": Settings(
            variant="parallelkit", name="t_pg_pk", database=pg_url, redis=redis_url, store="redis"
        ),
    }
    by_variant = {v: await answers(s) for v, s in variants.items()}
    assert_identical(by_variant)
    pk = {name: a[2] for name, a in by_variant["parallelkit"].items()}
    assert pk["webhook"] == 2
    assert pk["read-miss"] == 1
    assert pk["read-hit"] == 0  # served from Redis
    assert pk["payment"] == 1


#: (name, method, path, body, status): input the service must refuse with a 4xx naming
#: what is wrong, never a 500 (PostgreSQL's ``integer`` overflows at 2**31; it refuses a
#: NUL in text; a payment id is unique)
BAD_INPUT: list[tuple[str, str, str, Any, int]] = [
    ("read-id-too-large", "GET", "/conversations/2147483648", None, 422),
    ("read-id-huge", "GET", "/conversations/99999999999999999999", None, 422),
    ("read-id-zero", "GET", "/conversations/0", None, 422),
    ("read-id-negative", "GET", "/conversations/-3000000000", None, 422),
    ("webhook-id-too-large", "POST", "/webhooks/batch",
     {"events": [{"conversation_id": 2147483648}]}, 422),
    ("webhook-id-negative", "POST", "/webhooks/batch", {"events": [{"conversation_id": -5}]}, 422),
    ("enroll-id-too-large", "POST", "/companies/2147483648/enrollments", {}, 422),
    ("amount-too-large", "POST", "/payments", {"payment_id": "big", "amount": 2**31}, 422),
    ("payment-id-nul", "POST", "/payments", {"payment_id": "a\x00b", "amount": 5}, 422),
    ("payment", "POST", "/payments", {"payment_id": "dup", "amount": 5}, 200),
    ("payment-again", "POST", "/payments", {"payment_id": "dup", "amount": 5}, 409),
    ("read-after", "GET", "/conversations/42", None, 200),
]  # fmt: skip
BAD_FIELD = {
    "read-id-too-large": ["path", "conversation_id"],
    "webhook-id-too-large": ["body", "events", 0, "conversation_id"],
    "enroll-id-too-large": ["path", "company_id"],
    "amount-too-large": ["body", "amount"],
    "payment-id-nul": ["body", "payment_id"],
}


async def bad_input_answers(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send :data:`BAD_INPUT`: ``({name: (status, detail)}, /debug/stats at rest)``."""
    out: dict[str, Any] = {}
    async with client(create_app(settings)) as http:
        for name, method, path, body, _ in BAD_INPUT:
            response = await http.request(method, path, json=body)
            out[name] = (response.status_code, response.json().get("detail"))
        stats = (await http.get("/debug/stats")).json()
    return out, stats


def assert_refused_clearly(answers: dict[str, Any], stats: dict[str, Any], variant: str) -> None:
    assert {name: a[0] for name, a in answers.items()} == {b[0]: b[4] for b in BAD_INPUT}
    for name, loc in BAD_FIELD.items():
        assert [e["loc"] for e in answers[name][1]] == [loc], name
    assert answers["payment-again"][1] == "payment 'dup' is already recorded"
    # nothing held after the failed requests
    assert stats["checked_out"] == 0
    if variant == "parallelkit":
        assert stats["slots"] == {"running": 0, "waiting": 0}


@pytest.mark.parametrize("variant", VARIANTS)
async def test_bad_input_is_a_4xx_naming_the_field_and_nothing_is_held(variant: str) -> None:
    answers, stats = await bad_input_answers(Settings(variant=variant, name=f"t_bad_{variant}"))
    assert_refused_clearly(answers, stats, variant)


@pytest.mark.postgres
@pytest.mark.parametrize("variant", ["expert", "parallelkit"])
async def test_bad_input_on_postgres_is_a_4xx_not_a_driver_error(variant: str, pg_url: str) -> None:
    settings = Settings(variant=variant, name=f"t_pg_bad_{variant}", database=pg_url)
    answers, stats = await bad_input_answers(settings)
    assert_refused_clearly(answers, stats, variant)


def test_a_server_name_must_be_a_lowercase_schema_name() -> None:
    # "svc_repA" was created quoted but searched unquoted (svc_repa): start-up failed with
    # PostgreSQL's "no schema has been selected to create in"
    with pytest.raises(ValueError, match="name must be lowercase letters, digits"):
        Settings(name="repA")
    with pytest.raises(ValueError, match="name must be lowercase"):
        Settings(name="a b")
    assert Settings(name="t_pg-1").server == "t_pg-1"
