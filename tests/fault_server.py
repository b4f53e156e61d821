"""A fault-injecting OpenAI-protocol server in its own process (it can die mid-request), for tests.

Modes per model name: ``ok``, ``fail500``, ``flaky`` (503 once), ``bad400``, ``slow`` (10 s),
``die`` (exits mid-request), ``wrongschema`` (200 with a body that is not a completion), ``nonjson``. ``models_mode``: ``ok``, ``nonjson`` or ``list`` (a malformed
``/v1/models``). ``/stats`` counts calls per model; ``/last`` holds each model's last request body.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx

FAULT_SERVER = r'''
import asyncio, json, os, sys, time
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
import uvicorn

modes = json.loads(sys.argv[1]); port = int(sys.argv[2])
calls = {}
app = FastAPI()

models_mode = sys.argv[3] if len(sys.argv) > 3 else "ok"
last = {}

@app.get("/v1/models")
async def models():
    if models_mode == "nonjson":
        return PlainTextResponse("<html>not an API</html>")
    if models_mode == "list":
        return JSONResponse([{"id": "tiny-base"}])
    data = [{"id": "tiny-base", "object": "model", "parent": None}]
    data += [{"id": m, "object": "model", "parent": "tiny-base"} for m in modes]
    return {"object": "list", "data": data}

@app.get("/stats")
async def stats():
    return calls

@app.get("/last")
async def last_bodies():
    return last

@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    model = body["model"]
    calls[model] = calls.get(model, 0) + 1
    last[model] = body
    mode = modes.get(model, "ok" if model == "tiny-base" else "missing")
    if mode == "missing":
        return JSONResponse({"error": {"message": f"model {model} not found", "type": "not_found", "param": None, "code": 404}}, 404)
    if mode == "fail500":
        return JSONResponse({"object": "error", "message": "injected failure", "type": "InternalServerError", "code": 500}, 500)
    if mode == "flaky" and calls[model] == 1:
        return JSONResponse({"error": {"message": "warming up", "type": "server_error", "param": None, "code": None}}, 503)
    if mode == "bad400":
        return JSONResponse({"error": {"message": "prompt too long", "type": "invalid_request_error", "param": "messages", "code": None}}, 400)
    if mode == "wrongschema":
        return JSONResponse({"id": "x", "object": "chat.completion", "choices": "none"})
    if mode == "nonjson":
        return PlainTextResponse("<html>502 bad gateway</html>")
    if mode == "slow":
        await asyncio.sleep(10)
    if mode == "die":
        await asyncio.sleep(0.3)
        os._exit(1)
    text = f"answer from {model}"
    if body.get("stream"):
        async def events():
            for word in text.split(" "):
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}

uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultServer:
    def __init__(self, modes: dict[str, str], *, models_mode: str = "ok") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, "-c", FAULT_SERVER, json.dumps(modes), str(self.port), models_mode],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/stats", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fault server did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)

    def calls(self) -> dict[str, int]:
        return httpx.get(self.url.removesuffix("/v1") + "/stats", timeout=5).json()

    def last(self) -> dict[str, dict]:
        return httpx.get(self.url.removesuffix("/v1") + "/last", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
