"""``taskiq worker tests.taskiq_helpers.worker7:broker``: the test workers with the
tasks of ``tasks7`` as well."""

from __future__ import annotations

from .tasks7 import from_environment

broker = from_environment().base.broker
