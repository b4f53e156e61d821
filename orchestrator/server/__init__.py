"""OpenAI-compatible HTTP server: the app, the dynamic batcher, Prometheus metrics, wire schemas.

>>> from orchestrator.server import create_app          # doctest: +SKIP

Imported only by ``expertmix serve`` and by users who embed the app (it needs the
``serve`` extra: fastapi, uvicorn, sse-starlette, prometheus-client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from experts.backends.batcher import DynamicBatcher
    from orchestrator.server.app import create_app

__all__ = ["DynamicBatcher", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from orchestrator.server.app import create_app

        return create_app
    if name == "DynamicBatcher":
        from experts.backends.batcher import DynamicBatcher

        return DynamicBatcher
    raise AttributeError(f"module 'orchestrator.server' has no attribute {name!r}")
