"""The OpenAI-compatible HTTP app around an :class:`~orchestrator.core.Orchestrator`.

    POST /v1/chat/completions   model = "expertmix" (routed + merged), an expert's name, or "__base__"
    GET  /v1/models             the base, each expert (parent = the base), and "expertmix"
    GET  /health                liveness and queue state (no auth)
    GET  /metrics               Prometheus text format

Work runs in a thread pool (the orchestrator is synchronous and thread-safe); with
``batching`` on, the local backend's ``generate`` calls go through a
:class:`~orchestrator.server.batcher.DynamicBatcher`, so concurrent requests decode together.

>>> from orchestrator.core import Orchestrator                       # doctest: +SKIP
>>> app = create_app(Orchestrator.from_config(), owns_orchestrator=True)  # doctest: +SKIP
>>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)         # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from experts.backends.base import GenerationConfig
from experts.prompts import normalize_messages
from experts.registry import BASE_EXPERT
from expertmix.errors import ExpertUnavailable, InputError
from orchestrator.config import ServerSettings
from orchestrator.server.errors import install_handlers, to_openai_error
from orchestrator.server.limits import BodySizeLimit
from orchestrator.server.metrics import Metrics
from orchestrator.server.schemas import ChatCompletionRequest, OpenAIError, completion, model_card, new_id
from orchestrator.server.streaming import StopCut, sse_response

if TYPE_CHECKING:
    from orchestrator.core import Orchestrator
    from orchestrator.server.batcher import DynamicBatcher

__all__ = ["ORCHESTRATED_MODEL", "ServerState", "create_app"]

logger = logging.getLogger(__name__)

ORCHESTRATED_MODEL = "expertmix"
T = TypeVar("T")


class ServerState:
    """What the handlers share: the orchestrator, its (optional) batcher, metrics, the worker pool."""

    def __init__(self, om: Orchestrator, settings: ServerSettings, *, batching: bool, owns_orchestrator: bool) -> None:
        self.om = om
        self.settings = settings
        self.metrics = Metrics()
        self.owns_orchestrator = owns_orchestrator
        self.in_flight = 0
        self.started = time.time()
        self.closing = False
        self.batcher: DynamicBatcher | None = None
        if batching and om.local is not None:
            from orchestrator.server.batcher import DynamicBatcher

            self.batcher = DynamicBatcher(om.local, max_batch_size=settings.max_batch_size,
                                          max_wait_ms=settings.max_wait_ms, on_batch=self.metrics.on_batch)
            for routes in (om.routes, om.pool.routes):
                for name, backend in list(routes.items()):
                    if backend is om.local:
                        routes[name] = self.batcher
        # one thread per request being served: requests wait in the batcher's queue, not here
        self.executor = cf.ThreadPoolExecutor(max_workers=max(4, min(settings.max_queue, 128)),
                                              thread_name_prefix="expertmix-serve")
        self.base_name = om.config.base.model

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
        if self.batcher is not None:
            self.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.owns_orchestrator:
            self.om.close()


def create_app(
    om: Orchestrator,
    *,
    settings: ServerSettings | None = None,
    batching: bool = True,
    owns_orchestrator: bool = False,
) -> FastAPI:
    """Build the ASGI app. ``settings`` default to ``om.config.server``; ``owns_orchestrator``
    closes ``om`` when the app shuts down."""
    settings = settings or om.config.server
    state = ServerState(om, settings, batching=batching, owns_orchestrator=owns_orchestrator)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="expertmix", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.expertmix = state
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

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
    async def health() -> dict[str, Any]:
        return {
            "status": "shutting_down" if state.closing else "ok",
            "experts": om.expert_names,
            "base": state.base_name,
            "in_flight": state.in_flight,
            "queue_depth": state.batcher.queue_depth if state.batcher else 0,
            "batching": state.batcher is not None,
            "uptime_s": round(time.time() - state.started, 1),
        }

    @app.get("/metrics", dependencies=[Depends(check_auth)])
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(check_auth)])
    async def models() -> dict[str, Any]:
        base = state.base_name
        descr = {e.name: e.description for e in om.config.experts}
        data = [model_card(base, parent=None, description="the base model (alias: __base__)")]
        data += [model_card(n, parent=base, description=descr.get(n)) for n in om.expert_names]
        data.append(model_card(ORCHESTRATED_MODEL, parent=None,
                               description="routed to the top-k experts and merged (extra body: strategy, k, min_weight)"))
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_auth)], response_model=None)
    async def chat(req: ChatCompletionRequest) -> Any:
        target = state.resolve_model(req.model)
        max_tokens = req.token_limit if req.token_limit is not None else om.settings.max_new_tokens
        if max_tokens > settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {settings.max_tokens_limit}",
                              param="max_tokens", code="max_tokens_exceeded")
        messages = normalize_messages([m.as_dict() for m in req.messages])
        if state.closing:
            raise OpenAIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if state.in_flight >= settings.max_queue:
            state.metrics.rejected.labels("queue_full").inc()
            raise OpenAIError(429, f"server busy: {state.in_flight} requests in flight (max_queue={settings.max_queue}); "
                              "retry with backoff", type="rate_limit_error", code="queue_full")
        gen = _gen_config(om, req, max_tokens)
        label = target
        t0 = time.perf_counter()
        state.in_flight += 1
        state.metrics.in_flight.inc()

        def done(status: int) -> None:
            state.in_flight -= 1
            state.metrics.in_flight.dec()
            state.metrics.requests.labels("chat", label, str(status)).inc()
            state.metrics.latency.labels("chat", label).observe(time.perf_counter() - t0)

        if req.stream:
            return await sse_response(state, req, target, messages, gen, on_done=done)
        status = 499  # the client went away (cancelled) unless set below
        try:
            if target == ORCHESTRATED_MODEL:
                body = await state.run(_answer, state, req, messages, gen)
            else:
                body = await state.run(_direct, state, req, target, messages, gen)
            status = 200
        except Exception as exc:
            err = to_openai_error(exc)
            status = err.status
            raise err from exc
        finally:
            done(status)
        return JSONResponse(body)

    return app


def _gen_config(om: Orchestrator, req: ChatCompletionRequest, max_tokens: int) -> GenerationConfig:
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else om.settings.temperature,
            top_p=req.top_p if req.top_p is not None else 1.0,
            stop=tuple(req.stop_list),
            seed=req.seed,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def answer_extra(answer: Any) -> dict[str, Any]:
    d = answer.to_dict()
    d.pop("answer", None)
    d.pop("usage", None)
    return d


def _answer(state: ServerState, req: ChatCompletionRequest, messages: list[dict[str, str]], gen: GenerationConfig) -> dict[str, Any]:
    """model = expertmix: route, run, merge (blocking; in a worker thread)."""
    answer = state.om.ask(messages, k=req.k, strategy=req.strategy, max_new_tokens=gen.max_new_tokens,
                          temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed, min_weight=req.min_weight)
    state.metrics.observe_answer(answer)
    state.metrics.observe_tokens(ORCHESTRATED_MODEL, answer.prompt_tokens, answer.tokens)
    text, cut = StopCut.apply(answer.text, gen.stop)
    return completion(id=new_id(), model=ORCHESTRATED_MODEL, text=text, finish_reason="stop",
                      prompt_tokens=answer.prompt_tokens, completion_tokens=answer.tokens, expertmix=answer_extra(answer))


def _direct(state: ServerState, req: ChatCompletionRequest, expert: str, messages: list[dict[str, str]],
            gen: GenerationConfig) -> dict[str, Any]:
    """model = one expert or __base__: no routing, no merge; errors propagate."""
    gen = replace(gen, max_time_s=state.om.settings.expert_timeout_s)
    g = state.om.pool.backend_for(expert).generate([(expert, messages)], gen)[0]
    if g.extra.get("error"):
        raise ExpertUnavailable(str(g.extra["error"]), expert=expert)
    state.metrics.observe_tokens(expert, g.prompt_tokens, g.tokens)
    return completion(id=new_id(), model=req.model, text=g.text, finish_reason=g.finish_reason,
                      prompt_tokens=g.prompt_tokens, completion_tokens=g.tokens,
                      expertmix={"expert": expert, "latency_s": round(g.latency_s, 4)})
