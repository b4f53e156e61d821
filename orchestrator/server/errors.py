"""expertmix errors → OpenAI-shaped HTTP errors, and the app's exception handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertmix.errors import (
    AllExpertsFailed,
    ExpertmixError,
    ExpertTimeout,
    ExpertUnavailable,
    InputError,
    RequestCancelled,
    StrategyError,
    UnknownExpert,
)
from orchestrator.server.schemas import OpenAIError, error_body

__all__ = ["Redactor", "install_handlers", "to_openai_error"]

logger = logging.getLogger(__name__)

_URL = re.compile(r"https?://[^\s'\"<>)]+")
HIDDEN = "<expert server>"


class Redactor:
    """Hides internal addresses (remote experts' ``base_url``s, any URL) from what API clients see.

    The full text is logged server-side with the request id, so an operator can match the two.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str, *, request_id: str | None = None) -> str:
        out = text
        for s in self.secrets:
            out = out.replace(s, HIDDEN)
        out = _URL.sub(HIDDEN, out)
        if out != text:
            logger.warning("request %s: %s", request_id or "-", text)
            if request_id:
                out += f" (details in the server log, request id {request_id})"
        return out

    @classmethod
    def for_config(cls, config: Any) -> Redactor:
        from urllib.parse import urlsplit

        secrets: list[str] = []
        for e in getattr(config, "experts", ()):
            url = getattr(e, "base_url", None)
            if url:
                parts = urlsplit(url)
                secrets += [url.rstrip("/"), parts.netloc, parts.hostname or ""]
        return cls(secrets)


def to_openai_error(exc: BaseException, *, redact: Redactor | None = None, request_id: str | None = None) -> OpenAIError:
    """Map an exception raised while answering to the HTTP error the client sees (internal URLs hidden)."""
    err = _to_openai_error(exc)
    err.message = (redact or _DEFAULT)(err.message, request_id=request_id)
    return err


_DEFAULT = Redactor()


def _to_openai_error(exc: BaseException) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, UnknownExpert):
        return OpenAIError(404, msg, param="model", code="model_not_found")
    if isinstance(exc, StrategyError):
        return OpenAIError(400, msg, param="strategy", code="invalid_strategy")
    if isinstance(exc, InputError):
        return OpenAIError(400, msg, code="invalid_input")
    if isinstance(exc, ExpertTimeout):
        return OpenAIError(504, msg, type="server_error", code="expert_timeout")
    if isinstance(exc, ExpertUnavailable):
        status = exc.status_code if exc.status_code in (429, 503) else 502
        return OpenAIError(status, msg, type="server_error", code="expert_unavailable")
    if isinstance(exc, AllExpertsFailed):
        return OpenAIError(503, msg, type="server_error", code="all_experts_failed")
    if isinstance(exc, RequestCancelled):
        return OpenAIError(503, msg, type="server_error", code="cancelled")
    if isinstance(exc, ExpertmixError):
        return OpenAIError(500, msg, type="server_error", code=type(exc).__name__)
    logger.error("unhandled error while answering", exc_info=exc)
    return OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


def _json(err: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None, "invalid_json"
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid request body')}{more}", param, "invalid_request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _json(exc, headers)

    @app.exception_handler(ExpertmixError)
    async def _expertmix(request: Request, exc: ExpertmixError) -> JSONResponse:
        return _json(to_openai_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param, code = _validation_message(list(exc.errors()))
        return _json(OpenAIError(400, msg, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /docs"
        return JSONResponse(error_body(detail, type=kind, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return _json(to_openai_error(exc))
