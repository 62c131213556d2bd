"""What every variant answers to input it refuses: a 422 naming the field, a 413 for a huge body.

FastAPI's own handler echoes each error's ``input`` in the JSON body. Python's
JSON parser accepts what JSON cannot carry back: ``NaN``, ``Infinity`` and
``1e400`` (a float out of range), and a lone surrogate (``"\\ud800"``). Echoed,
they made the response itself fail (``Out of range float values are not JSON
compliant``, ``surrogates not allowed``): a 500 with a traceback in the log for
a client's bad input, after validation had already refused it.

:func:`refuse_bad_input` installs the same handler with those values spelled
out (``"inf"``, ``"nan"``, ``"\\\\ud800"``); every other 422 is byte for byte
FastAPI's.

:class:`LimitBody` bounds the request body (:data:`MAX_BODY`): uvicorn and FastAPI
read and parse a body of any size (100 MB of ``event`` name was answered 200), so a
client could make a server hold gigabytes. Nothing here imports parallelkit (the
ordinary and expert servers use it).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_BODY", "JsonInt", "LimitBody", "json_safe", "refuse_bad_input"]

#: The largest request body accepted: a full webhook batch (500 events) is under 50 KB.
MAX_BODY = 1 << 20
TOO_LARGE = "Content Too Large"


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


#: An integer field of a JSON body: ``true`` is refused (pydantic's lax mode takes it as 1:
#: a payment of 1 cent, conversation 1), the rest as ``int`` validates it.
JsonInt = Annotated[int, BeforeValidator(_not_a_boolean)]


def json_safe(value: Any) -> Any:
    """``value`` (JSON types) with a non-finite float as its name and a string that is not
    valid Unicode (a lone surrogate) with that code point escaped; the rest unchanged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))}
    )


class LimitBody:
    """A pure ASGI middleware: a body over ``max_body`` bytes is a 413, read no further.

    A declared ``content-length`` over the limit is refused before anything is read;
    a streamed (chunked) body when its bytes pass the limit: the endpoint's read of
    the body raises an ``HTTPException(413)``, answered like any other, before the
    handler ran (nothing charged, nothing recorded).
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            # (a length of thousands of digits is too large too: int() would refuse it)
            declared = value.isdigit() and (len(value) > 18 or int(value) > self.max_body)
            if name == b"content-length" and declared:
                await JSONResponse({"detail": TOO_LARGE}, 413)(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, TOO_LARGE)
            return message

        await self.app(scope, limited, send)


def refuse_bad_input(app: FastAPI) -> None:
    """Answer a request that fails validation with a 422 naming the field, never a 500,
    and a body over :data:`MAX_BODY` with a 413."""
    app.add_exception_handler(RequestValidationError, _unprocessable)
    app.add_middleware(LimitBody)
