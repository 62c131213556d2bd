"""pytest plugin registered by parallelkit (entry point ``pytest11``).

Integrations add their fixtures here lazily, so that the plugin costs nothing
and imports no optional dependency unless a fixture is used.
"""

from __future__ import annotations
