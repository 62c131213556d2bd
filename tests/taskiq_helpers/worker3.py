"""``taskiq worker tests.taskiq_helpers.worker3:broker``: the test workers with the
tasks of ``tasks3``, and a result backend that loses some results."""

from __future__ import annotations

from .tasks3 import from_environment

broker = from_environment().base.broker
