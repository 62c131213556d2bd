"""Importing changes nothing, parallelkit runs without SQLAlchemy, and the private names hold.

Each import check runs in a fresh interpreter: this test process has long
imported everything.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent

SNAPSHOT = """
import logging, signal, sys
import sqlalchemy
from sqlalchemy.engine import Engine
from sqlalchemy.event import registry
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper, RelationshipProperty, Session
from sqlalchemy.pool import Pool

def listeners(cls):
    dispatch = cls.dispatch
    return {
        name: sorted(repr(fn) for fns in getattr(dispatch, name)._clslevel.values() for fn in fns)
        for name in dispatch._event_names
    }

def snapshot():
    return {
        "registry": sorted(map(repr, registry._key_to_collection)),
        "strategies": {
            repr(cls): sorted(map(repr, table)) for cls, table in
            RelationshipProperty._all_strategies.items()
        },
        "Session": listeners(Session),
        "Mapper": listeners(Mapper),
        "Engine": listeners(Engine),
        "Pool": listeners(Pool),
        "AsyncSession methods": sorted(vars(AsyncSession)),
        "loggers": sorted(n for n in logging.root.manager.loggerDict if "sqlalchemy" in n),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
    }
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_importing_parallelkit_its_sqlalchemy_package_and_the_plugin_changes_nothing() -> None:
    code = SNAPSHOT + (
        "before = snapshot()\n"
        "import parallelkit, parallelkit.sqlalchemy, parallelkit.pytest_plugin\n"
        "after = snapshot()\n"
        "changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}\n"
        "assert not changed, changed\n"
        # and what the old import did is now an explicit call
        "from parallelkit.sqlalchemy import guard_sessions\n"
        "assert guard_sessions(True) is False\n"
        "assert snapshot()['Session'] != before['Session']\n"
        "guard_sessions(False)\n"
        "assert snapshot()['Session'] == before['Session']\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr


def test_parallelkit_imports_without_sqlalchemy_and_the_extra_is_named() -> None:
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('sqlalchemy', 'greenlet', 'aiosqlite', 'asyncpg'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import parallelkit, parallelkit.pytest_plugin\n"
        "import anyio\n"
        "async def double(x): return 2 * x\n"
        "assert anyio.run(parallelkit.map, double, [1, 2]) == [2, 4]\n"
        "assert 'sqlalchemy' not in sys.modules\n"
        "try:\n"
        "    import parallelkit.sqlalchemy\n"
        "except ImportError as exc:\n"
        "    assert \"pip install 'parallelkit[sqlalchemy]'\" in str(exc), exc\n"
        "    assert exc.name == 'sqlalchemy', exc.name\n"
        "else:\n"
        "    raise AssertionError('imported without SQLAlchemy')\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr


def test_the_private_names_eager_relies_on_are_there() -> None:
    """Fails loudly on a SQLAlchemy release that moved them (eager would then fall back
    to SQLAlchemy's generic raiseload message)."""
    from sqlalchemy.orm import Load, strategies

    from parallelkit.sqlalchemy import _compat, _eager

    assert sqlalchemy.__version__.startswith(("2.0.", "2.1.")), sqlalchemy.__version__
    lazy = getattr(strategies, "_LazyLoader", None) or strategies.LazyLoader  # 2.1, 2.0
    assert callable(lazy._invoke_raise_load)
    assert "loadopt" in inspect.signature(lazy._load_for_state).parameters
    assert callable(Load._set_relationship_strategy)
    # eager's own callback: the first registration is the one every raise uses
    assert _compat.available(_eager._not_loaded)
    from sqlalchemy.orm import RelationshipProperty

    assert any(
        dict(key).get("lazy") == _compat.RAISE_KEY
        for key in RelationshipProperty._all_strategies[RelationshipProperty]
    )
