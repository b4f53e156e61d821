"""The OpenAI-compatible HTTP app around an :class:`~orchestrator.core.Orchestrator`.

    POST /v1/chat/completions   model = "expertmix" (routed + merged), an expert's name, or "__base__"
    POST /v1/completions        the same models for ``prompt`` clients (the prompt is one user turn)
    GET  /v1/models             the base, each expert (parent = the base), and "expertmix"
    GET  /openapi.json, /docs   the API description (same auth rule as /v1/*)
    GET  /health                liveness and queue state (no auth; 503 while shutting down)
    GET  /metrics               Prometheus text format

Work runs in a thread pool (the orchestrator is synchronous and thread-safe). Batching is the
orchestrator's business (``Orchestrator(config, batching=True)``); the server only reads
``om.batcher`` for health and metrics. Every request gets a cancel token: a client that goes
away, or a server that stops, cancels its work.

>>> from orchestrator.core import Orchestrator                       # doctest: +SKIP
>>> app = create_app(Orchestrator.from_config(batching=True), owns_orchestrator=True)  # doctest: +SKIP
>>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from experts.prompts import normalize_messages
from experts.registry import BASE_EXPERT
from orchestrator.config import ServerSettings
from orchestrator.request import default_max_new_tokens
from orchestrator.server.errors import Redactor, install_handlers, to_openai_error
from orchestrator.server.jsonmode import parse_response_format
from orchestrator.server.limits import BodySizeLimit, Gate, stop_limits
from orchestrator.server.metrics import Metrics
from orchestrator.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    _Request,
    completion,
    model_card,
    new_id,
    text_completion,
)
from orchestrator.server.streaming import sse_response
from orchestrator.server.work import ORCHESTRATED_MODEL, Work, answer_extra, run_work

if TYPE_CHECKING:
    from orchestrator.core import Orchestrator

__all__ = ["ORCHESTRATED_MODEL", "ServerState", "answer_extra", "create_app"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ServerState:
    """What the handlers share: the orchestrator, metrics, the worker pool, the work in flight."""

    def __init__(self, om: Orchestrator, settings: ServerSettings, *, batching: bool, owns_orchestrator: bool) -> None:
        self.om = om
        self.settings = settings
        self.metrics = Metrics()
        self.owns_orchestrator = owns_orchestrator
        self.started = time.time()
        self.closing = False
        self.redact = Redactor.for_config(om.config)
        self._lock = threading.Lock()
        self._work: dict[int, Work] = {}
        self._seq = 0
        # batching is the orchestrator's (Orchestrator(config, batching=True)); the server only watches it
        self.batcher = om.batcher
        if batching and self.batcher is None and om.local is not None:
            logger.info("the orchestrator was built without batching: requests decode one by one")
        self._on_batch = self.batcher is not None and self.batcher.on_batch is None
        if self._on_batch:
            self.batcher.on_batch = self.metrics.on_batch  # type: ignore[union-attr]
        # one thread per request being served: requests wait in the batcher's queue, not here
        self.executor = cf.ThreadPoolExecutor(max_workers=max(4, min(settings.max_queue, 128)),
                                              thread_name_prefix="expertmix-serve")
        self.base_name = om.config.base.model

    # -- work in flight --------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._work)

    def acquire(self, work: Work) -> Callable[[], None]:
        """Take a queue slot for ``work`` (429 when full, 503 when closing); returns its idempotent release."""
        with self._lock:
            if self.closing:
                raise OpenAIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._work) >= self.settings.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise OpenAIError(429, f"server busy: {len(self._work)} requests in flight "
                                  f"(max_queue={self.settings.max_queue}); retry with backoff",
                                  type="rate_limit_error", code="queue_full")
            self._seq += 1
            key = self._seq
            self._work[key] = work
            self.metrics.in_flight.inc()

        def release() -> None:
            with self._lock:
                if self._work.pop(key, None) is not None:
                    self.metrics.in_flight.dec()

        return release

    def cancel_all(self, reason: str) -> int:
        with self._lock:
            works = list(self._work.values())
        for w in works:
            w.cancel.cancel(reason)
        return len(works)

    def drain(self, grace_s: float) -> bool:
        """Stop taking work; wait up to ``grace_s`` for the work in flight, then cancel the rest."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.in_flight:
            logger.warning("shutdown: cancelling %d request(s) still running after %.0f s", self.in_flight, grace_s)
            self.cancel_all("the server is shutting down")
            return False
        return True

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    def resolve_model(self, model: str) -> str:
        """``expertmix``, an expert name or ``__base__`` (the base's own name is an alias); else 404."""
        if model == ORCHESTRATED_MODEL or model in self.om.expert_names or model == BASE_EXPERT:
            return model
        if model == self.base_name:
            return BASE_EXPERT
        known = ", ".join([ORCHESTRATED_MODEL, *self.om.expert_names, BASE_EXPERT])
        raise OpenAIError(404, f"The model {model!r} does not exist; available: {known}", param="model",
                          code="model_not_found")

    def close(self) -> None:
        self.closing = True
        self.cancel_all("the server is shutting down")
        if self._on_batch and self.batcher is not None:
            self.batcher.on_batch = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_orchestrator:
            self.om.close()


def _check_fields(req: _Request, settings: ServerSettings, rid: str) -> None:
    """Refuse by name what would otherwise be silently ignored (or drop it, with ``drop_params``)."""
    drop = bool(getattr(settings, "drop_params", False))
    unknown = req.unknown_fields()
    if unknown and not drop:
        raise OpenAIError(400, f"unknown field(s) {', '.join(unknown)}: this server does not implement them "
                          "(start it with --drop-params to ignore unknown fields)", param=unknown[0],
                          code="unknown_parameter")
    unsupported = req.unsupported()
    if unsupported and not drop:
        raise OpenAIError(400, f"{', '.join(unsupported)}: not supported by this server; leave at the default "
                          "(or start it with --drop-params to ignore)", param=unsupported[0],
                          code="unsupported_parameter")
    if drop and (unknown or unsupported):
        logger.info("request %s: dropped field(s) %s", rid, ", ".join(unknown + unsupported))
    if isinstance(req, ChatCompletionRequest):
        problem = req.tool_problem()
        if problem:
            raise OpenAIError(400, problem, param=problem.split(":", 1)[0], code="unsupported_parameter")
    most, chars = stop_limits()
    stops = req.stop_list
    if len(stops) > most or sum(len(s) for s in stops) > chars:
        raise OpenAIError(400, f"stop: {len(stops)} string(s), {sum(len(s) for s in stops)} characters; at most "
                          f"{most} strings and {chars} characters in all", param="stop", code="too_many_stops")


def create_app(
    om: Orchestrator,
    *,
    settings: ServerSettings | None = None,
    batching: bool = True,
    owns_orchestrator: bool = False,
    adapter_roots: tuple[Any, ...] = (),
) -> FastAPI:
    """Build the ASGI app. ``settings`` default to ``om.config.server``; ``owns_orchestrator``
    closes ``om`` when the app shuts down; ``adapter_roots`` add to the directories
    ``/v1/load_lora_adapter`` may read. ``batching`` only matters for an orchestrator that
    does not own a batcher itself (build it with ``Orchestrator(config, batching=True)``)."""
    settings = settings or om.config.server
    state = ServerState(om, settings, batching=batching, owns_orchestrator=owns_orchestrator)

    from orchestrator.lifecycle import router_watch

    watch = router_watch(om, settings.router_watch_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_follow_router(state, watch)) if watch is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            state.close()

    app = FastAPI(title="expertmix", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.expertmix = state
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(Gate, is_closing=lambda: state.closing)

    def check_auth(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            state.metrics.rejected.labels("auth").inc()
            raise OpenAIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                              type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "shutting_down" if state.closing else "ok",
            "experts": om.expert_names,
            "base": state.base_name,
            "in_flight": state.in_flight,
            "queue_depth": state.batcher.queue_depth if state.batcher else 0,
            "batching": state.batcher is not None,
            "uptime_s": round(time.time() - state.started, 1),
        }
        return JSONResponse(body, status_code=503 if state.closing else 200)

    @app.get("/metrics", dependencies=[Depends(check_auth)])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", dependencies=[Depends(check_auth)], include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[Depends(check_auth)], include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
    async def models() -> dict[str, Any]:
        base = state.base_name
        descr = {e.name: e.description for e in om.config.experts}
        data = [model_card(base, parent=None, description="the base model (alias: __base__)")]
        data += [model_card(n, parent=base, description=descr.get(n)) for n in om.expert_names]
        data.append(model_card(ORCHESTRATED_MODEL, parent=None,
                               description="routed to the top-k experts and merged (extra body: strategy, k, min_weight)"))
        return {"object": "list", "data": data}

    async def serve(request: Request, req: _Request, kind: str, raw_messages: list[dict[str, str]]) -> Any:
        rid = request.scope.get("state", {}).get("request_id") or new_id("req")
        _check_fields(req, settings, rid)
        target = state.resolve_model(req.model)
        max_tokens = req.token_limit if req.token_limit is not None else default_max_new_tokens(om.settings)
        if max_tokens > settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {settings.max_tokens_limit}",
                              param="max_tokens", code="max_tokens_exceeded")
        rule = parse_response_format(getattr(req, "response_format", None))
        work = Work(rid=rid, kind=kind, model=req.model, target=target, messages=normalize_messages(raw_messages),
                    max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                    repetition_penalty=getattr(req, "repetition_penalty", None), stop=tuple(req.stop_list),
                    strategy=req.strategy, planner=req.planner, k=req.k, min_weight=req.min_weight, json=rule)
        release = state.acquire(work)
        t0 = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"

        def done(status: int) -> None:
            state.metrics.requests.labels(endpoint, target, str(status)).inc()
            state.metrics.latency.labels(endpoint, target).observe(time.perf_counter() - t0)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await sse_response(state, work, include_usage=include_usage, on_done=done, release=release)

        def job() -> Any:
            try:
                return run_work(state, work)
            finally:
                release()

        status = 499  # the client went away (cancelled) unless set below
        try:
            res = await _watch(request, state.run(job), work)
            status = 200
        except asyncio.CancelledError:
            work.cancel.cancel("client disconnected")
            raise
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            release()
            status = 503
            raise OpenAIError(503, "the server is shutting down", type="server_error", code="shutting_down") from exc
        except Exception as exc:
            err = to_openai_error(exc, redact=state.redact, request_id=rid)
            status = err.status
            raise err from exc
        finally:
            done(status)
        render = completion if kind == "chat" else text_completion
        rid_out = res.id or new_id("chatcmpl" if kind == "chat" else "cmpl")
        return JSONResponse(render(id=rid_out, model=req.model, text=res.text, finish_reason=res.finish_reason,
                                   prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                                   expertmix=res.extra))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)], response_model=None)
    async def chat(request: Request, req: ChatCompletionRequest) -> Any:
        return await serve(request, req, "chat", [m.as_dict() for m in req.messages])

    @app.post("/v1/completions", dependencies=[Depends(check_auth)], response_model=None)
    async def completions(request: Request, req: CompletionRequest) -> Any:
        return await serve(request, req, "text", [{"role": "user", "content": req.prompt_text}])

    from orchestrator.server.admin import install_admin

    install_admin(app, state, check_auth, adapter_roots)
    return app


async def _follow_router(state: ServerState, watch: Any) -> None:
    """Every ``router_watch_s``: one stat of the router store's CURRENT; on a change, reload and swap
    in a worker thread (requests in flight keep their router; a broken one is logged and counted)."""
    while not state.closing:
        await asyncio.sleep(watch.every_s)
        try:
            result = await state.run(watch.poll)
        except RuntimeError:  # the worker pool is shut down: the server is stopping
            return
        except Exception:
            logger.exception("router watch failed")
            continue
        if result is not None:
            state.metrics.router_reloads.labels(result).inc()


async def _watch(request: Request, fut: Any, work: Work) -> Any:
    """Await the work; cancel it if the client disconnects before the answer is ready."""
    task = asyncio.ensure_future(fut)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            work.cancel.cancel("client disconnected")
            return await task


def _docs_page(spec: dict[str, Any]) -> str:
    """Swagger UI with the spec inline, so the page needs no second (authenticated) fetch."""
    import json

    data = json.dumps(spec).replace("</", "<\\/")
    return f"""<!doctype html><html><head><title>expertmix API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div><script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{spec: {data}, dom_id: "#ui"}});</script></body></html>"""
