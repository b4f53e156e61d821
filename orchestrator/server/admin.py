"""Routing as a service and the live lifecycle endpoints.

    POST /v1/route                  {"input": text | [texts], "k"?, "min_weight"?} → the routing, no generation
    POST /v1/feedback               {"id", "rating": "good"|"bad", "expert"?, "comment"?, "text"?}
    POST /admin/reload              load the router again (config path / store's current) and swap it in
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"} (vLLM's shape): a new local expert, validated
                                    first; with "backend": "openai" (and "base_url" when the config has
                                    several expert servers) the load is forwarded to that vLLM server
    POST /v1/unload_lora_adapter    {"lora_name"} (forwarded to its vLLM server for an openai expert)

The last three change the server: they need the server to have an API key (403 otherwise).
Local adapter paths must lie under the adapter roots (the config file's directory, the packaged
adapters, ``EXPERTMIX_ADAPTER_ROOTS``): no reading arbitrary files. A remote expert's ``lora_path``
is a path on the vLLM host and is not checked here; loads are forwarded only to expert servers the
config already names (never to an address a request brings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from orchestrator import lifecycle
from orchestrator.feedback import FeedbackLog, feedback_path, parse_feedback
from orchestrator.server.errors import to_openai_error
from orchestrator.server.schemas import OpenAIError

if TYPE_CHECKING:
    from orchestrator.server.app import ServerState

__all__ = ["install_admin"]

#: texts per /v1/route call at most
MAX_ROUTE_INPUTS = 64


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str]
    k: int | None = Field(default=None, ge=1)
    min_weight: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False)
    planner: str | None = None


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)
    description: str = Field(default="", max_length=500)
    #: questions this expert should answer: with the description, they route to it until the router is retrained
    examples: list[str] = Field(default_factory=list, max_length=100)
    #: "openai": load it on a configured vLLM server (lora_path is a path on that host)
    backend: Literal["local", "openai"] = "local"
    #: which configured expert server (its /v1 root, as in the config); needed only when there are several
    base_url: str | None = Field(default=None, max_length=2048)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = None


def _route_one(state: ServerState, text: str, req: RouteRequest) -> dict[str, Any]:
    om = state.om
    version = lifecycle.router_version(om.router)
    routing = om.route(text, k=req.k, min_weight=req.min_weight)
    out: dict[str, Any] = {"input": text, **routing.to_dict(), "router_version": version}
    if req.planner or om.settings.planner != "none":  # the parts a request would be split into
        out["plan"] = om.plan(text, planner=req.planner, k=req.k, min_weight=req.min_weight).to_dict()
    return out


def install_admin(app: FastAPI, state: ServerState, check_auth: Callable[..., None],
                  adapter_roots: tuple[Any, ...] = ()) -> None:
    om = state.om

    def needs_key() -> None:
        if not state.settings.api_key:
            raise OpenAIError(403, "this endpoint changes the server: start it with --api-key to use it",
                              type="permission_error", code="api_key_required")

    admin = [Depends(needs_key), Depends(check_auth)]

    async def change(fn: Callable[[], Any]) -> Any:
        try:
            return await state.run(fn)
        except Exception as exc:
            err = to_openai_error(exc, redact=state.redact)
            if err.status >= 500 and type(exc).__name__ in ("AdapterError", "RouterMismatch", "RouterArtifactError"):
                err = OpenAIError(400, err.message, param=None, code=type(exc).__name__)
            raise err from exc

    @app.post("/v1/feedback", dependencies=[Depends(check_auth)])
    async def give_feedback(body: dict[str, Any]) -> dict[str, Any]:
        fb = parse_feedback(body, experts=om.expert_names)
        await state.run(FeedbackLog(feedback_path(om.config)).append, fb)
        return {"object": "feedback", "id": fb.id, "rating": fb.rating, "expert": fb.expert}

    @app.post("/admin/reload", dependencies=admin)
    async def reload() -> dict[str, Any]:
        old = lifecycle.router_version(om.router)
        new = await change(om.reload_router)
        return {"object": "router", "previous": old, "version": lifecycle.router_version(new),
                "labels": list(new.labels)}

    @app.post("/v1/load_lora_adapter", dependencies=admin)
    async def load_adapter(req: LoadAdapter) -> PlainTextResponse:
        if req.base_url is not None and req.backend != "openai":
            raise OpenAIError(400, 'base_url names a remote expert server: send it with "backend": "openai"',
                              param="base_url", code="invalid_input")

        def load() -> None:
            if req.backend == "openai":
                spec = lifecycle.remote_spec_for(om, req.lora_name, base_url=req.base_url,
                                                 description=req.description)
                lifecycle.add_expert(om, spec, examples=tuple(req.examples), remote_path=req.lora_path)
                return
            path = lifecycle.check_adapter_path(req.lora_path, lifecycle.adapter_roots(om.config, tuple(adapter_roots)))
            lifecycle.add_expert(om, lifecycle.spec_for(req.lora_name, path, description=req.description),
                                 examples=tuple(req.examples))

        await change(load)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=admin)
    async def unload_adapter(req: UnloadAdapter) -> PlainTextResponse:
        await change(lambda: om.remove_expert(req.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/route", dependencies=[Depends(check_auth)])
    async def route(req: RouteRequest) -> dict[str, Any]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > MAX_ROUTE_INPUTS:
            raise OpenAIError(400, f"input: send 1 to {MAX_ROUTE_INPUTS} texts, got {len(texts)}", param="input",
                              code="invalid_input")
        data = await state.run(lambda: [_route_one(state, t, req) for t in texts])
        return {"object": "list", "data": data}
