"""Helpers of the orchestrator tests."""

from __future__ import annotations

from typing import Any


def finished(memory: Any) -> dict[str, Any]:
    """The finished spans by name."""
    return {s.name: s for s in memory.get_finished_spans()}


def exception_types(span: Any) -> list[str]:
    """The type names of the exceptions recorded on ``span`` (without their module)."""
    return [
        str((e.attributes or {}).get("exception.type")).rsplit(".", 1)[-1]
        for e in span.events
        if e.name == "exception"
    ]
