"""Request-size limit as plain ASGI middleware: refuse before the body reaches the app."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.server.schemas import error_body

__all__ = ["BodySizeLimit"]

Scope = dict[str, Any]


class BodySizeLimit:
    """Answer 413 in OpenAI's error shape when a request body exceeds ``max_bytes``.

    Checks ``Content-Length`` first, then counts the bytes of chunked bodies as they
    arrive; an accepted body is replayed to the app unchanged.
    """

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Any, size: str) -> None:
        body = json.dumps(error_body(
            f"request body is {size} bytes; this server accepts at most {self.max_bytes}",
            type="invalid_request_error", code="request_too_large",
        )).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, length.decode())
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            part = message.get("body", b"")
            total += len(part)
            if total > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes}")
                return
            chunks.append(part)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # type: ignore[no-any-return]

        await self.app(scope, replay, send)


def stop_limits() -> tuple[int, int]:
    """(most stop strings, most characters in all of them): the core's request limits when it defines them."""
    try:
        from experts.backends import base
    except ImportError:  # pragma: no cover - the package is always there
        return 16, 1024
    return int(getattr(base, "MAX_STOP", 16)), int(getattr(base, "MAX_STOP_CHARS", 1024))


class Gate:
    """Request ids and shutdown: every response carries ``X-Request-ID``; while the server is shutting
    down, every request but ``/health`` gets a 503 in OpenAI's error shape (clients retry elsewhere)."""

    def __init__(self, app: Any, *, is_closing: Any) -> None:
        self.app = app
        self.is_closing = is_closing

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import uuid

        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        if self.is_closing() and scope.get("path") != "/health":
            body = json.dumps(error_body("the server is shutting down; retry on another instance",
                                         type="server_error", code="shutting_down")).encode()
            await send_with_id({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                                            (b"retry-after", b"1")]})
            await send_with_id({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_with_id)
