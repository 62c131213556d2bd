"""How one server process runs: :class:`Settings`, the variants, the seed size."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from examples.crm.db import database_url
from examples.crm.seed import SeedSizes

__all__ = ["SEED_SIZES", "VARIANTS", "Settings"]

#: 20 companies x 20 contacts x 5 conversations = 2,000 conversations (issue 18's size).
SEED_SIZES = SeedSizes(companies=20, contacts_per_company=20, conversations_per_contact=5)
VARIANTS = ("ordinary", "expert", "parallelkit")
_NAME = re.compile(r"[a-z0-9_-]*")
#: The longest PostgreSQL identifier (NAMEDATALEN - 1): the schema ``svc_<name>`` must fit.
_LONGEST = 63


@dataclass(frozen=True, slots=True)
class Settings:
    """How one server process runs.

    Attributes:
        variant: ``"ordinary"``, ``"expert"`` or ``"parallelkit"``.
        name: this server's name: its PostgreSQL schema (``svc_<name>``), its
            SQLite directory and its Redis namespace, so several servers share
            one database server without sharing rows.
        shared: ``False`` (default): the schema and the Redis namespace are this
            server's alone: a leftover is dropped, they are created and seeded at
            start and dropped (the namespace cleared) at stop. ``True``: a replica of
            the service ``name``: it joins the schema and namespace of every
            ``shared`` server of that name (the first to start creates and seeds
            them, under a PostgreSQL advisory lock) and never drops or clears them,
            so stopping one replica leaves the others their data. Needs a
            PostgreSQL ``database``. Neither kind drops the other's schema: a server
            finding one of the other kind under its name refuses to start
            (``database.SchemaInUse``).
        database: a SQLAlchemy URL; ``None``: a SQLite file in a new temporary
            directory (aiosqlite).
        redis: a Redis URL; used by the parallelkit variant when ``store="redis"``.
        store: ``"memory"`` or ``"redis"``: where the parallelkit variant's
            cache keeps its entries.
        pool_size: connections in the engine's pool (no overflow).
        seed_sizes: the seed data (default: 2,000 conversations).
        charge_latency, notify_latency, mail_latency: seconds each simulated
            external call takes (payment provider, webhook receiver, mailer).
        fresh, stale: the cache windows (``fresh`` is the TTL of the caches
            without stale-while-revalidate).
    """

    variant: str = "parallelkit"
    name: str = ""
    database: str | None = None
    redis: str | None = None
    store: str = "memory"
    pool_size: int = 10
    seed_sizes: SeedSizes = SEED_SIZES
    charge_latency: float = 0.005
    notify_latency: float = 0.002
    mail_latency: float = 0.001
    fresh: float = 30.0
    stale: float = 300.0
    shared: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            msg = f"variant must be one of {VARIANTS}, got {self.variant!r}"
            raise ValueError(msg)
        if not _NAME.fullmatch(self.name):
            # it names a PostgreSQL schema, set unquoted in search_path: "svc_repA" would
            # be created but searched as svc_repa ("no schema has been selected to create in")
            msg = f"name must be lowercase letters, digits, '_' or '-', got {self.name!r}"
            raise ValueError(msg)
        if len(self.schema) > _LONGEST:
            # PostgreSQL's identifiers: a longer schema name fails in the driver at start
            msg = (
                f"name must be at most {_LONGEST - len('svc_')} characters (its schema"
                f" svc_<name> is a PostgreSQL identifier: {_LONGEST} bytes at most),"
                f" got {len(self.name)}"
            )
            raise ValueError(msg)
        if self.store not in ("memory", "redis"):
            msg = f"store must be 'memory' or 'redis', got {self.store!r}"
            raise ValueError(msg)
        if self.store == "redis" and not self.redis:
            msg = "store='redis' needs a Redis URL (redis=...)"
            raise ValueError(msg)
        shared: object = self.shared  # typed bool, but a dataclass takes anything
        if not isinstance(shared, bool):
            msg = f"shared must be a bool, got {self.shared!r}"
            raise TypeError(msg)
        if self.shared and not _is_postgresql(self.database):
            # a SQLite file (or the default temporary one) is one process's: nothing to share
            msg = f"shared=True needs a PostgreSQL database (database=...), got {self.database!r}"
            raise ValueError(msg)
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int):
            msg = f"pool_size must be an int, got {self.pool_size!r}"
            raise TypeError(msg)
        if self.pool_size < 1:
            # 0 is an unbounded pool for SQLAlchemy, a negative size one that never lends
            msg = f"pool_size must be at least 1, got {self.pool_size!r}"
            raise ValueError(msg)

    @property
    def server(self) -> str:
        """The name used for this server's schema / directory / namespace."""
        return self.name or self.variant

    @property
    def schema(self) -> str:
        """This server's PostgreSQL schema: ``svc_<server>``."""
        return f"svc_{self.server}".replace("-", "_")

    @property
    def namespace(self) -> str:
        """This server's Redis namespace: ``svc-<server>``."""
        return f"svc-{self.server}"


def _is_postgresql(url: str | None) -> bool:
    resolved = database_url(url)
    try:
        return resolved is not None and make_url(resolved).get_backend_name() == "postgresql"
    except (ArgumentError, ValueError):  # not a URL: the engine would say so later
        return False
