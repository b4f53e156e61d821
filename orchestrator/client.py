"""The fast CLI path: talk to a running ``expertmix serve`` instead of loading the models.

``expertmix ask/route/generate`` call :func:`find_server` first. A server is used when it is
named (``--server URL`` or ``EXPERTMIX_SERVER``) or when ``expertmix serve`` left a port file
(``$EXPERTMIX_HOME/serve.json``) for the same config file and answers ``/health``; otherwise the
command loads in-process. The server returns the trace in the ``expertmix`` field of the
response, so the printed answer and table are the same either way (:func:`answer_dict`).

Only the standard library is imported here (no torch, no httpx): asking a warm server costs
~0.3 s of CPU in this process and two HTTP round trips (``/health``, then the request).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertmix.errors import ConfigError, ExpertmixError, ExpertUnavailable, InputError

__all__ = ["Server", "answer_dict", "find_server", "port_file", "remove_port_file", "write_port_file"]

ENV_SERVER = "EXPERTMIX_SERVER"
ENV_API_KEY = "EXPERTMIX_API_KEY"
_PROBE_S = 0.5  # a discovered server (port file) that does not answer this fast is skipped: run in-process
_NAMED_PROBE_S = 5.0  # a server the user named must answer; a busy one (a generation holding its CPU) gets longer


def port_file() -> Path:
    """Where ``expertmix serve`` announces itself: ``$EXPERTMIX_HOME/serve.json``."""
    from expertmix.io import expertmix_home

    return Path(expertmix_home()) / "serve.json"


def _config_key(config: str | Path | None) -> str:
    from orchestrator.config import default_config_path

    return str(Path(config).resolve() if config is not None else default_config_path())


def write_port_file(*, url: str, config: str | Path | None) -> Path:
    """Called by ``serve`` once it listens. Holds no secret (a key comes from EXPERTMIX_API_KEY)."""
    from expertmix.io import atomic_write_text

    p = port_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps({"url": url, "pid": os.getpid(), "config": _config_key(config)}) + "\n")
    return p


def remove_port_file() -> None:
    """Called by ``serve`` on exit; leaves a file written by another server alone."""
    p = port_file()
    try:
        if json.loads(p.read_text("utf-8")).get("pid") == os.getpid():
            p.unlink()
    except (OSError, ValueError, AttributeError):
        pass


@dataclass
class Server:
    """A reachable ``expertmix serve`` (base URL without ``/v1``).

    Plain ``http.client`` rather than httpx: this is the whole cost of a fast CLI call, and the
    standard library imports in a quarter of the time.
    """

    url: str
    api_key: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None) -> Any:
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname or "127.0.0.1", u.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn.request(method, u.path.rstrip("/") + path, body=data, headers=headers)
        return conn.getresponse()

    def healthy(self, timeout: float = _PROBE_S) -> bool:
        import http.client

        try:
            r = self._request("GET", "/health", None, timeout)
            r.read()
            return bool(r.status == 200)
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._post("/v1/chat/completions", body)

    def route(self, question: str, *, k: int | None, min_weight: float | None) -> dict[str, Any] | None:
        """The server's routing of one question (``POST /v1/route``); ``None`` if the server has no such route."""
        body: dict[str, Any] = {"input": question}
        if k is not None:
            body["k"] = k
        if min_weight is not None:
            body["min_weight"] = min_weight
        out = self._post("/v1/route", body, missing_ok=True)
        if out is None:
            return None
        return out["data"][0]  # type: ignore[no-any-return]

    def _post(self, path: str, body: dict[str, Any], *, missing_ok: bool = False) -> Any:
        import http.client

        try:
            r = self._request("POST", path, body, None)
            raw = r.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ExpertUnavailable(
                f"server {self.url} failed: {exc}; unset {ENV_SERVER} or pass --local to run in-process",
                expert=str(body.get("model", "router")),
            ) from exc
        if missing_ok and r.status in (404, 405):
            return None
        return _json_or_raise(r.status, raw, self.url)

    def stream_chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each server-sent chunk (a dict) of a streamed chat completion."""
        import http.client

        try:
            r = self._request("POST", "/v1/chat/completions", {**body, "stream": True}, None)
            if r.status != 200:
                _json_or_raise(r.status, r.read(), self.url)
            while True:
                line = r.readline()
                if not line:
                    return
                text = line.decode("utf-8").strip()
                if not text.startswith("data:"):
                    continue
                data = text[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    _raise_api_error(chunk, self.url)
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            raise ExpertUnavailable(
                f"server {self.url} failed mid-stream: {exc}", expert=str(body.get("model"))
            ) from exc


def _raise_api_error(body: dict[str, Any], url: str, status: int = 0) -> None:
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    msg = str(err.get("message") or body)
    if status in (400, 404, 413, 422):
        raise InputError(msg)
    raise ExpertmixError(f"server {url} answered {status or 'an error'}: {msg}")


def _json_or_raise(status: int, raw: bytes, url: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"error": {"message": raw[:200].decode("utf-8", "replace")}}
    if status != 200 or not isinstance(body, dict):
        _raise_api_error(body if isinstance(body, dict) else {}, url, status)
    return body  # type: ignore[no-any-return]


def find_server(*, server: str | None, config: str | Path | None, local: bool = False) -> Server | None:
    """The server to use, or ``None`` to load in-process.

    ``--server``/``EXPERTMIX_SERVER`` name one explicitly: it must answer (else a ConfigError says so).
    The port file is used only when it was written for the same config file and the server answers.
    ``local=True`` (``--local``) always loads in-process.
    """
    if local:
        return None
    key = os.environ.get(ENV_API_KEY) or None
    named = server or os.environ.get(ENV_SERVER)
    if named:
        url = named.rstrip("/").removesuffix("/v1")
        s = Server(url, key)
        if not s.healthy(_NAMED_PROBE_S):
            raise ConfigError(
                f"no expertmix server answers at {url}/health; start one with `expertmix serve`, "
                f"or drop --server / unset {ENV_SERVER} to run in-process"
            )
        return s
    try:
        info = json.loads(port_file().read_text("utf-8"))
        url, cfg = str(info["url"]), str(info["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cfg != _config_key(config):
        return None
    s = Server(url, key)
    return s if s.healthy() else None


def answer_dict(body: dict[str, Any]) -> dict[str, Any]:
    """Rebuild ``Answer.to_dict()`` from a chat completion whose ``expertmix`` field holds the trace."""
    trace = body.get("expertmix")
    if not isinstance(trace, dict):
        raise ExpertmixError("the server's answer has no 'expertmix' trace; is it an expertmix server?")
    choice = (body.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") or ""
    usage = body.get("usage") or {}
    return {
        "answer": text,
        **trace,
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
        },
    }
