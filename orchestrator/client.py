"""The fast CLI path: talk to a running ``expertmix serve`` instead of loading the models.

``expertmix ask/route/generate`` call :func:`find_server` first. A server is used when it is
named (``--server URL`` or ``EXPERTMIX_SERVER``) or when ``expertmix serve`` left a port file
(``$EXPERTMIX_HOME/serve.json``) for the same config file and answers ``/health``; otherwise the
command loads in-process. The server returns the trace in the ``expertmix`` field of the
response, so the printed answer and table are the same either way (:func:`answer_dict`).

Only ``httpx`` is imported here (no torch): asking a warm server costs one HTTP round trip.
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
_PROBE_S = 0.5


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
    """A reachable ``expertmix serve`` (base URL without ``/v1``)."""

    url: str
    api_key: str | None = None

    def _client(self, timeout: float | None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def healthy(self) -> bool:
        import httpx

        try:
            with self._client(_PROBE_S) as c:
                r = c.get("/health")
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            with self._client(None) as c:
                r = c.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise ExpertUnavailable(f"server {self.url} failed: {exc}; unset {ENV_SERVER} or drop --server to run "
                                    "in-process", expert=str(body.get("model"))) from exc
        return _json_or_raise(r, self.url)

    def stream_chat(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield each SSE chunk (a dict) of a streamed chat completion."""
        import httpx

        try:
            with self._client(None) as c, c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    r.read()
                    _json_or_raise(r, self.url)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk:
                        _raise_api_error(chunk, self.url)
                    yield chunk
        except httpx.HTTPError as exc:
            raise ExpertUnavailable(f"server {self.url} failed mid-stream: {exc}", expert=str(body.get("model"))) from exc


def _raise_api_error(body: dict[str, Any], url: str, status: int = 0) -> None:
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    msg = str(err.get("message") or body)
    if status in (400, 404, 413, 422):
        raise InputError(msg)
    raise ExpertmixError(f"server {url} answered {status or 'an error'}: {msg}")


def _json_or_raise(r: Any, url: str) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:200]}}
    if r.status_code != 200 or not isinstance(body, dict):
        _raise_api_error(body if isinstance(body, dict) else {}, url, r.status_code)
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
        if not s.healthy():
            raise ConfigError(f"no expertmix server answers at {url}/health; start one with `expertmix serve`, "
                              f"or drop --server / unset {ENV_SERVER} to run in-process")
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
    return {"answer": text, **trace,
            "usage": {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0)}}
