"""``taskiq worker tests.taskiq_helpers.worker9:broker``: the test workers with the
tasks of ``tasks9`` (an hour's retry backoff)."""

from __future__ import annotations

from .tasks9 import from_environment

broker = from_environment().broker
