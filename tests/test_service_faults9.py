"""The reference service (examples/service) given input it must refuse, and stopped mid-request.

Input JSON cannot echo (NaN, 1e400, a lone surrogate), a boolean for an integer, a body
of megabytes, a retried payment while the webhook is down, SIGTERM with requests in
flight. In-process tests (httpx over ASGI, the lifespan run as a server would) check every
variant; the ``slow`` ones serve the parallelkit variant under uvicorn in a
subprocess, as ``python -m examples.service`` does, and talk to it over HTTP.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import anyio
import httpx
from examples.service import VARIANTS, Settings, create_app
from examples.service.shared import Clients, PaymentIn
from examples.service.testing import client
from fastapi import FastAPI

from tests.service_helpers import ServiceProcess, module_command

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # SQLAlchemy's asyncio extension: asyncio only


#: (name, method, path, raw JSON body, the field the 422 names, what it echoes as input).
#: Python's JSON parser takes NaN, Infinity, 1e400 and a lone surrogate; echoed back as
#: they are, the 422 could not be encoded and the client got a 500.
UNECHOABLE: list[tuple[str, str, str, str, list[Any], Any]] = [
    ("webhook-id-nan", "POST", "/webhooks/batch", '{"events": [{"conversation_id": NaN}]}',
     ["body", "events", 0, "conversation_id"], "nan"),
    ("webhook-id-surrogate", "POST", "/webhooks/batch",
     '{"events": [{"conversation_id": "\\ud800"}]}',
     ["body", "events", 0, "conversation_id"], "\\ud800"),
    ("enroll-days-1e400", "POST", "/companies/3/enrollments", '{"inactive_days": 1e400}',
     ["body", "inactive_days"], "inf"),
    ("amount-infinity", "POST", "/payments", '{"payment_id": "p-inf", "amount": Infinity}',
     ["body", "amount"], "inf"),
    ("amount-minus-infinity", "POST", "/payments",
     '{"payment_id": "p-inf", "amount": -Infinity}', ["body", "amount"], "-inf"),
    ("payment-id-surrogate", "POST", "/payments",
     '{"payment_id": "a\\ud800b", "amount": 5}', ["body", "payment_id"], "a\\ud800b"),
    ("payment-id-nan", "POST", "/payments", '{"payment_id": NaN, "amount": 5}',
     ["body", "payment_id"], "nan"),
]  # fmt: skip


async def unechoable_answers(settings: Settings) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    headers = {"content-type": "application/json"}
    async with client(create_app(settings)) as http:
        for name, method, path, body, _, _ in UNECHOABLE:
            response = await http.request(method, path, content=body.encode(), headers=headers)
            out[name] = (response.status_code, response.content)
        stats = (await http.get("/debug/stats")).json()
    assert stats["checked_out"] == 0
    return out


async def test_input_json_cannot_echo_is_a_422_naming_the_field_in_every_variant() -> None:
    by_variant = {
        v: await unechoable_answers(Settings(variant=v, name=f"t_echo_{v}")) for v in VARIANTS
    }
    first = by_variant["parallelkit"]
    for v, answers in by_variant.items():
        assert answers == first, v  # the same bytes from every variant
    for name, _, _, _, loc, echoed in UNECHOABLE:
        status, body = first[name]
        assert status == 422, (name, body)
        errors = json.loads(body)["detail"]
        assert [e["loc"] for e in errors] == [loc], name
        assert errors[0]["input"] == echoed, name


async def test_any_other_422_is_fastapis_own_byte_for_byte() -> None:
    plain = FastAPI()  # FastAPI's own handler

    @plain.post("/payments")
    async def pay(payment: PaymentIn) -> None:
        raise AssertionError("not reached")

    bodies = [
        '{"payment_id": "p", "amount": "one"}',
        '{"amount": 1}',
        "[]",
        "{",
        '{"payment_id": "a\\u0000b", "amount": 1.5}',
        '{"payment_id": "é", "amount": 0}',
    ]
    headers = {"content-type": "application/json"}
    async with client(plain) as fastapi_http, client(create_app(Settings(name="t_plain"))) as http:
        for body in bodies:
            expected = await fastapi_http.post("/payments", content=body.encode(), headers=headers)
            got = await http.post("/payments", content=body.encode(), headers=headers)
            assert expected.status_code == 422, body
            assert (got.status_code, got.content) == (422, expected.content), body


#: (name, path, body, the field the 422 names): pydantic's lax mode took ``true`` as 1
#: (a payment of 1 cent charged and recorded, conversation 1's actions) and ``false`` as 0.
BOOLEANS: list[tuple[str, str, dict[str, Any], list[Any]]] = [
    ("webhook-id-true", "/webhooks/batch", {"events": [{"conversation_id": True}]},
     ["body", "events", 0, "conversation_id"]),
    ("enroll-days-false", "/companies/3/enrollments", {"inactive_days": False},
     ["body", "inactive_days"]),
    ("amount-true", "/payments", {"payment_id": "p-bool", "amount": True}, ["body", "amount"]),
]  # fmt: skip


async def test_a_boolean_for_an_integer_is_a_422_in_every_variant() -> None:
    by_variant: dict[str, list[tuple[int, bytes]]] = {}
    for v in VARIANTS:
        async with client(create_app(Settings(variant=v, name=f"t_bool_{v}"))) as http:
            by_variant[v] = [
                ((r := await http.post(path, json=body)).status_code, r.content)
                for _, path, body, _ in BOOLEANS
            ]
    answers = by_variant["parallelkit"]
    for v, other in by_variant.items():
        assert other == answers, v  # the same bytes from every variant
    for (name, _, _, loc), (status, body) in zip(BOOLEANS, answers, strict=True):
        assert status == 422, (name, body)
        assert [(e["loc"], e["type"]) for e in json.loads(body)["detail"]] == [(loc, "int_type")]


#: 2 MiB of valid JSON for each endpoint with a body: an unbounded ``event`` name (or any
#: field the model ignores) used to be read, parsed and answered, however large the body.
PADDING = "x" * (2 << 20)
OVERSIZED: list[tuple[str, str, dict[str, Any]]] = [
    ("webhook", "/webhooks/batch", {"events": [{"conversation_id": 1, "event": PADDING}]}),
    ("enroll", "/companies/3/enrollments", {"inactive_days": 21, "note": PADDING}),
    ("payment", "/payments", {"payment_id": "p-big", "amount": 5, "note": PADDING}),
]


async def oversized_answers(settings: Settings) -> tuple[list[tuple[int, bytes]], Any]:
    """Each oversized body twice: with its length declared, then streamed (chunked)."""
    out: list[tuple[int, bytes]] = []
    headers = {"content-type": "application/json"}
    async with client(create_app(settings)) as http:
        for _, path, body in OVERSIZED:
            data = json.dumps(body).encode()
            declared = await http.post(path, content=data, headers=headers)

            async def chunks(data: bytes = data) -> Any:
                for start in range(0, len(data), 64 << 10):
                    yield data[start : start + (64 << 10)]

            streamed = await http.post(path, content=chunks(), headers=headers)
            out += [
                (declared.status_code, declared.content),
                (streamed.status_code, streamed.content),
            ]
        paid = await http.post("/payments", json={"payment_id": "p-big", "amount": 5})
        out.append((paid.status_code, paid.content))  # nothing was charged or recorded before
        stats = (await http.get("/debug/stats")).json()
    return out, stats


async def test_an_oversized_body_is_a_413_in_every_variant() -> None:
    by_variant = {
        v: await oversized_answers(Settings(variant=v, name=f"t_big_{v}")) for v in VARIANTS
    }
    answers, stats = by_variant["parallelkit"]
    for v, (other, _) in by_variant.items():
        assert other == answers, v  # the same bytes from every variant
    refused = (413, b'{"detail":"Content Too Large"}')
    assert answers[:-1] == [refused] * (2 * len(OVERSIZED))
    assert answers[-1][0] == 200
    assert stats["slots"] == {"running": 0, "waiting": 0}


class WebhookDown(ConnectionError):
    """The merchant's webhook receiver refused the notification."""


@pytest.mark.parametrize("variant", VARIANTS)
async def test_a_retried_payment_is_a_409_also_while_the_webhook_is_down(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row's 409 comes before the webhook's error, in every variant: a client retrying
    a recorded payment learns it is recorded. The expert's ``gather`` of the insert and
    the webhook raised whichever failed first (the webhook, at once): a 500, so the
    client retried again, while the other variants answered 409."""

    async def webhook_down(self: Clients, payment_id: str, charge_id: str) -> None:
        raise WebhookDown(payment_id)

    body = {"payment_id": "p-retry", "amount": 5}
    async with client(create_app(Settings(variant=variant, name=f"t_retry_{variant}"))) as http:
        assert (await http.post("/payments", json=body)).status_code == 200
        with monkeypatch.context() as patch:
            patch.setattr(Clients, "notify", webhook_down)
            retry = await http.post("/payments", json=body)
        stats = (await http.get("/debug/stats")).json()
    assert (retry.status_code, retry.json()) == (
        409,
        {"detail": "payment 'p-retry' is already recorded"},
    )
    assert stats["checked_out"] == 0


# -- served for real ---------------------------------------------------------------------------
SERVE = """
import json, sys
import uvicorn
from examples.service import Settings, create_app
settings = Settings(**json.loads(sys.argv[2]))
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="info", access_log=False)
"""


class Server(ServiceProcess):
    """A variant served by uvicorn in a subprocess (its output in ``log``): the app of
    ``Settings(**settings)``, or ``python -m examples.service`` given ``cli`` options."""

    def __init__(self, log: Path, cli: list[str] | None = None, **settings: Any) -> None:
        def command(port: int) -> list[str]:
            if cli is not None:
                return module_command(port, cli)
            return [sys.executable, "-c", SERVE, str(port), json.dumps(settings)]

        super().__init__(log, command)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(cli: list[str] | None = None, **settings: Any) -> Server:
        server = Server(tmp_path / f"server{len(servers)}.log", cli, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.mark.slow
async def test_under_uvicorn_refused_input_is_a_4xx_and_nothing_is_logged(serve: Any) -> None:
    """Over real HTTP: input JSON cannot echo is a 422 (it was a 500 and a traceback), a
    huge body a 413 (it was read and answered), declared or streamed, and the server
    stops cleanly on SIGTERM with nothing held."""
    server = serve(variant="parallelkit", name="t_refuse_uvicorn")
    await server.started()
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for name, method, path, body, loc, _ in UNECHOABLE:
            response = await http.request(method, path, content=body.encode(), headers=headers)
            assert response.status_code == 422, (name, response.text)
            assert [e["loc"] for e in response.json()["detail"]] == [loc], name
        for name, path, data in OVERSIZED:
            raw = json.dumps(data).encode()

            async def chunks(raw: bytes = raw) -> Any:
                yield raw[: len(raw) // 2]
                yield raw[len(raw) // 2 :]

            for content in (raw, chunks()):
                response = await http.post(path, content=content, headers=headers)
                assert response.status_code == 413, (name, response.text)
        stats = (await http.get("/debug/stats")).json()
    assert stats["slots"] == {"running": 0, "waiting": 0}
    assert stats["checked_out"] == 0
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert "Exception in ASGI application" not in server.output()
    assert "Traceback" not in server.output()


@pytest.mark.slow
async def test_under_uvicorn_sigterm_answers_the_payments_in_flight(serve: Any) -> None:
    """SIGTERM while payments wait on a slow provider: each is answered 200 (charged and
    recorded), then the server stops, the services torn down, and nothing is left running."""
    server = serve(variant="parallelkit", name="t_term_uvicorn", charge_latency=1.0)
    await server.started()
    answers: list[int] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

        async def pay(i: int) -> None:
            body = {"payment_id": f"p-term-{i}", "amount": 5}
            answers.append((await http.post("/payments", json=body)).status_code)

        with anyio.fail_after(60):  # hang guard
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(pay, i)
                async with httpx.AsyncClient(base_url=server.url) as probe:
                    while (await probe.get("/debug/stats")).json()["active"] < 4:
                        await anyio.sleep(0.02)
                server.process.send_signal(signal.SIGTERM)
    assert answers == [200] * 4
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    out = server.output()
    assert "Application shutdown complete" in out, out
    assert "Traceback" not in out, out


@pytest.mark.slow
async def test_sigterm_stops_the_server_with_a_request_stuck_in_flight(serve: Any) -> None:
    """A client that sent half a request and went quiet (or a provider that never answers)
    kept ``python -m examples.service`` running after SIGTERM for as long as it stayed
    (uvicorn waits for every request by default): ``--graceful-timeout`` bounds the wait,
    then the request is cancelled and the services are torn down as on any stop."""
    name = "t_term_stuck"
    server = serve(["--variant", "parallelkit", "--name", name, "--graceful-timeout", "0.5"])
    await server.started()
    with socket.create_connection(("127.0.0.1", server.port)) as stuck:
        head = b"POST /payments HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        stuck.sendall(head + b'content-length: 100\r\n\r\n{"payment_id"')
        async with httpx.AsyncClient(base_url=server.url) as probe:
            with anyio.fail_after(30):  # hang guard
                while (await probe.get("/debug/stats")).json()["active"] < 1:
                    await anyio.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):  # hang guard: it used to wait as long as the client did
            while server.process.poll() is None:
                await anyio.sleep(0.05)
    out = server.output()
    assert server.process.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises it
    assert "timeout graceful shutdown exceeded" in out, out  # the stuck request, cancelled
    assert "shutdown failed" not in out, out  # then the services stopped as on any stop
