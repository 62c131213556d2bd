"""What the three variants share: settings, the database, the fakes, the JSON they answer.

Everything here is identical for every variant on purpose: the same schema and
seed data (:mod:`examples.crm`), the same per-item SQL, the same simulated
external calls and the same response bodies. The variants differ only in how
they load (N+1 vs hand-written vs :func:`parallelkit.sqlalchemy.eager`), cache
(naive dict vs ``TTLCache`` + single flight vs :class:`parallelkit.SWRCache`)
and fan out (unbounded ``gather`` vs ``gather`` + a process-wide semaphore vs
:func:`parallelkit.map`).

Each idea has a module, named for what it holds, and this one gathers their names
(the variants, the tests and the benchmarks import them from here):
:mod:`.settings` (:class:`Settings`), :mod:`.database` (the schema: private or
shared by replicas), :mod:`.stats` (``/health``, ``/debug/stats``), :mod:`.clients`
(the simulated external APIs), :mod:`.bodies` (what the endpoints accept),
:mod:`.answers` (what they answer) and :mod:`.queries` (the SQL they share).

Nothing in these modules imports parallelkit: the ordinary and expert servers run
without it (importing :mod:`parallelkit.sqlalchemy` changes no global state; its
session guard is opt-in and stays off in every server here).
"""

from __future__ import annotations

from .answers import (
    NO_CADENCE,
    as_utc,
    conversation_view,
    enrollment_response,
    inactive_cutoff,
    is_inactive,
    log_failed_items,
    payment_response,
    webhook_result,
    webhook_results,
)
from .bodies import (
    MAX_INT,
    ConversationIn,
    EnrollmentIn,
    PaymentIn,
    RowId,
    WebhookBatch,
    WebhookEvent,
)
from .clients import WEBHOOK_URL, Clients
from .database import ServiceDatabase, open_database
from .queries import (
    find_inactive,
    open_conversations,
    record_enrollments,
    record_payment,
    update_conversation,
)
from .settings import SEED_SIZES, VARIANTS, Settings
from .stats import COLLECTOR, CollectorTime, CountRequests, StatementCounter, add_debug_routes

__all__ = [
    "COLLECTOR",
    "MAX_INT",
    "NO_CADENCE",
    "SEED_SIZES",
    "VARIANTS",
    "WEBHOOK_URL",
    "Clients",
    "CollectorTime",
    "ConversationIn",
    "CountRequests",
    "EnrollmentIn",
    "PaymentIn",
    "RowId",
    "ServiceDatabase",
    "Settings",
    "StatementCounter",
    "WebhookBatch",
    "WebhookEvent",
    "add_debug_routes",
    "as_utc",
    "conversation_view",
    "enrollment_response",
    "find_inactive",
    "inactive_cutoff",
    "is_inactive",
    "log_failed_items",
    "open_conversations",
    "open_database",
    "payment_response",
    "record_enrollments",
    "record_payment",
    "update_conversation",
    "webhook_result",
    "webhook_results",
]
