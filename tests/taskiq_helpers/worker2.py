"""``taskiq worker tests.taskiq_helpers.worker2:broker``: the test workers with the
tasks of ``tasks2`` as well."""

from __future__ import annotations

from .tasks2 import from_environment

broker = from_environment().base.broker
