"""``taskiq worker tests.taskiq_helpers.worker:broker``: the test workers."""

from __future__ import annotations

from .tasks import from_environment

broker = from_environment().broker
