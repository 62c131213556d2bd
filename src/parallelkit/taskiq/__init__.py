"""Distributed ``map`` over Taskiq workers, with the contract of :func:`parallelkit.map`.

When one process is not enough (50 companies became 50,000), keep the code you
wrote for :func:`parallelkit.map` and move the work to a pool of Taskiq worker
processes on any number of machines::

    outcomes = await parallelkit.taskiq.map(detect, company_ids, limit=200, settle=True)

Each item is *kicked* as one Taskiq message and its result is read back from the
result backend. The bound, the lazy pull of items, the input order, fail-fast and
settle mode are :func:`parallelkit.map`'s own (this module runs its engine over
"kick, then wait for the result"), so the semantics are the same:

* at most ``limit`` items are in flight (kicked and not yet back); the next item
  is pulled from your iterable only when one comes back;
* results come back in input order (:func:`imap` streams them);
* fail-fast stops kicking and raises the worker's exception as its **original
  type**, with the worker's traceback text as its ``__cause__``
  (:class:`RemoteTraceback`); the messages of the others that no worker has
  taken yet are taken back, the taken ones run to their end (at most ``limit``),
  and the workers send no retry of them;
* ``settle=True`` returns one :class:`~parallelkit.Outcome` per item.

Delivery is **at least once**: with :func:`redis_broker` (Redis streams with
acknowledgements) a message is acknowledged only after its result is saved, so a
worker that dies mid-task has its messages redelivered to another worker after
``idle_timeout``. A task may therefore run more than once: make it idempotent
(see the distributed recipe in the docs). Retries happen worker-side through
Taskiq's retry middleware, built from a :class:`parallelkit.Retry` by
:func:`retry_middleware`.

The Taskiq client and redis-py are asyncio libraries: this module runs on the
asyncio backend of anyio only.

.. versionadded:: 0.1
"""

from __future__ import annotations

from .._core.public import export
from ._broker import RedeliveringStreamBroker as RedeliveringStreamBroker
from ._broker import redis_broker as redis_broker
from ._map import SupportsRate as SupportsRate
from ._map import imap as imap
from ._map import map as map
from ._middlewares import RemoteTraceback as RemoteTraceback
from ._middlewares import TracebackMiddleware as TracebackMiddleware
from ._middlewares import retry_middleware as retry_middleware

__all__ = [
    "RedeliveringStreamBroker",
    "RemoteTraceback",
    "SupportsRate",
    "TracebackMiddleware",
    "imap",
    "map",
    "redis_broker",
    "retry_middleware",
]

export(globals())
