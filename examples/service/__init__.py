"""A FastAPI CRM service in three variants with identical answers (issue 18's reference).

Four endpoints (and an update), each written three ways:

* ``POST /webhooks/batch``: a batch of webhook events; each needs its
  conversation -> contact -> company -> automation rules;
* ``GET /conversations/{id}``: a cached conversation read (``PATCH`` changes its
  subject and invalidates the cached entry, in every replica with ``--shared``);
* ``POST /companies/{id}/enrollments``: enroll a company's inactive contacts in
  its first cadence, one session and one e-mail per contact (a fan-out);
* ``POST /payments``: charge, then record the payment and notify the merchant.

Variants (one module each, one server process each):

* :mod:`examples.service.ordinary`: what an ordinary FastAPI developer writes;
* :mod:`examples.service.expert`: hand-tuned without parallelkit;
* :mod:`examples.service.with_parallelkit`: parallelkit as its docs recommend.

Run one: ``python -m examples.service --variant parallelkit --port 8000``
(SQLite by default; ``--database postgresql://...``, ``--redis redis://...``;
``--shared``: one replica of several, see docs/recipes/fastapi-service.md).
``python -m benchmarks service`` serves all of them under uvicorn and loads
them over real HTTP. ``GET /debug/stats`` reports the statements sent so far.
"""

from __future__ import annotations

from .app import create_app
from .shared import SEED_SIZES, VARIANTS, Settings

__all__ = ["SEED_SIZES", "VARIANTS", "Settings", "create_app"]
