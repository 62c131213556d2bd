"""What the endpoints accept: path ids and request bodies, refused with a 422 naming the
field when out of range."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, Field

from .errors import JsonInt

__all__ = [
    "MAX_INT",
    "ConversationIn",
    "EnrollmentIn",
    "PaymentIn",
    "RowId",
    "WebhookBatch",
    "WebhookEvent",
]

#: The largest value of an ``integer`` column (ids, amounts): a larger one in a request is
#: a 422 naming the field, not a driver error (``value out of int32 range``) and a 500.
MAX_INT = 2**31 - 1
#: A row id in a path (``/conversations/{conversation_id}``): a positive ``integer``.
RowId = Annotated[int, Path(ge=1, le=MAX_INT)]


class WebhookEvent(BaseModel):
    conversation_id: JsonInt = Field(ge=1, le=MAX_INT)
    event: str = "message.received"


class WebhookBatch(BaseModel):
    events: list[WebhookEvent] = Field(max_length=500)


class EnrollmentIn(BaseModel):
    inactive_days: JsonInt = Field(default=21, ge=0, le=3650)


class PaymentIn(BaseModel):
    # no control characters: PostgreSQL refuses a NUL in text (a 500 after the charge)
    payment_id: str = Field(min_length=1, max_length=60, pattern=r"^[^\x00-\x1f\x7f]+$")
    amount: JsonInt = Field(gt=0, le=MAX_INT)


class ConversationIn(BaseModel):
    # the column is String(300); no control characters (PostgreSQL refuses a NUL in text)
    subject: str = Field(min_length=1, max_length=300, pattern=r"^[^\x00-\x1f\x7f]+$")
