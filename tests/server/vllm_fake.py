"""A loopback stand-in for a vLLM server with ``--enable-lora`` (no GPU here): the parts expertmix uses.

    GET  /v1/models                 the base model and every loaded adapter (parent = the base)
    POST /v1/chat/completions       ``model`` = the base or a loaded adapter; else 404 (vLLM's error body)
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}: 200 text/plain; 400 already loaded or not a
                                    valid adapter; 404 "No adapter found" for a path the host lacks
    POST /v1/unload_lora_adapter    {"lora_name"}: 200; 404 when it is not loaded

The two adapter routes exist only with ``runtime_updating=True`` (vLLM registers them only under
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; otherwise the framework answers 404 ``{"detail": "Not Found"}``).
``host_paths`` are the adapter directories "on the vLLM host"; ``/…/corrupt`` ones fail to load (400).
``delay_s``: each answer takes this long (requests that overlap a change).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

BASE = "tiny-base"


def _error(message: str, kind: str, code: int) -> Any:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=code
    )


def fake_vllm_app(
    *,
    static: tuple[str, ...] = (),
    host_paths: tuple[str, ...] = (),
    runtime_updating: bool = True,
    delay_s: float = 0.0,
) -> Any:
    app = FastAPI()
    loaded: dict[str, str] = {name: f"/static/{name}" for name in static}
    calls: list[tuple[str, dict[str, Any]]] = []
    app.state.loaded, app.state.calls = loaded, calls

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": BASE, "object": "model", "root": "/models/base", "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": BASE} for n, p in loaded.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        model = body.get("model")
        calls.append(("chat", body))
        if model != BASE and model not in loaded:
            return _error(f"The model `{model}` does not exist.", "NotFoundError", 404)
        if delay_s:
            await asyncio.sleep(delay_s)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer from {model}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }

    if runtime_updating:

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Any:
            body = await request.json()
            calls.append(("load", body))
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
            if name in loaded:
                return _error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400)
            if path not in host_paths:
                return _error(
                    f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404
                )
            if path.rstrip("/").endswith("corrupt"):
                return _error(
                    f"Loading lora {name} failed: invalid adapter_config.json", "BadRequestError", 400
                )
            loaded[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Any:
            body = await request.json()
            calls.append(("unload", body))
            name = body.get("lora_name")
            if name not in loaded:
                return _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
            del loaded[name]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app
