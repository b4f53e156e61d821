"""Routing as a service and the live lifecycle endpoints (issue 11).

    POST /v1/route                  {"input": text | [texts], "k"?, "min_weight"?} → the routing, no generation
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.server.schemas import OpenAIError

if TYPE_CHECKING:
    from orchestrator.server.app import ServerState

__all__ = ["install_admin"]

#: texts per /v1/route call at most
MAX_ROUTE_INPUTS = 64


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Union[str, list[str]]
    k: int | None = Field(default=None, ge=1)
    min_weight: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False)
    planner: str | None = None


def _route_one(state: ServerState, text: str, req: RouteRequest) -> dict[str, Any]:
    om = state.om
    routing = om.route(text, k=req.k, min_weight=req.min_weight)
    out: dict[str, Any] = {"input": text, **routing.to_dict()}
    version = getattr(om.router, "version", None)
    if version is not None:
        out["router_version"] = version
    plan = getattr(om, "plan", None)
    if plan is not None and (req.planner or getattr(om.settings, "planner", "none") != "none"):
        try:
            p = plan(text, planner=req.planner, k=req.k, min_weight=req.min_weight)
        except TypeError:
            p = None
        if p is not None and hasattr(p, "to_dict"):
            out["plan"] = p.to_dict()
    return out


def install_admin(app: FastAPI, state: ServerState, check_auth: Callable[..., None]) -> None:
    @app.post("/v1/route", dependencies=[Depends(check_auth)])
    async def route(req: RouteRequest) -> dict[str, Any]:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > MAX_ROUTE_INPUTS:
            raise OpenAIError(400, f"input: send 1 to {MAX_ROUTE_INPUTS} texts, got {len(texts)}", param="input",
                              code="invalid_input")
        data = await state.run(lambda: [_route_one(state, t, req) for t in texts])
        return {"object": "list", "data": data}
