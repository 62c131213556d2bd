"""A small CRM schema and deterministic seed data, shared by tests, docs and benchmarks.

The schema follows the playbook's CRM backend: companies own contacts,
automation rules and cadences; contacts have conversations and cadence
enrollments. See :mod:`examples.crm.models` and :mod:`examples.crm.seed`.
"""

from __future__ import annotations

from .models import (
    AutomationRule,
    Base,
    Cadence,
    Company,
    CompanySettings,
    Contact,
    Conversation,
    Enrollment,
)
from .seed import SeedSizes, SeedSummary, build, seed, seed_sync

__all__ = [
    "AutomationRule",
    "Base",
    "Cadence",
    "Company",
    "CompanySettings",
    "Contact",
    "Conversation",
    "Enrollment",
    "SeedSizes",
    "SeedSummary",
    "build",
    "seed",
    "seed_sync",
]
