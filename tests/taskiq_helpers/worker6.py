"""``taskiq worker tests.taskiq_helpers.worker6:broker``: the test workers with the
tasks of ``tasks6`` as well."""

from __future__ import annotations

from .tasks6 import from_environment

broker = from_environment().base.broker
