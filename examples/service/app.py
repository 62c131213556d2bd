"""``create_app(settings)``: the FastAPI app of one variant."""

from __future__ import annotations

import importlib

from fastapi import FastAPI

from .shared import Settings

__all__ = ["MODULES", "create_app"]

#: The module of each variant (imported only when asked for: the ordinary and expert servers
#: never import parallelkit).
MODULES = {
    "ordinary": "examples.service.ordinary",
    "expert": "examples.service.expert",
    "parallelkit": "examples.service.with_parallelkit",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app of ``settings.variant`` (default: the parallelkit variant on SQLite)."""
    settings = settings or Settings()
    module = importlib.import_module(MODULES[settings.variant])
    app: FastAPI = module.create_app(settings)
    return app
