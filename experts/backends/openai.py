"""httpx client for OpenAI-compatible multi-LoRA servers (vLLM ``--enable-lora``, LoRAX, ``expertmix serve``).

Each expert is addressed by sending ``model = <adapter name>`` (``remote_name`` in the
config, else the expert's name), exactly as vLLM's ``--lora-modules name=path`` and
LoRAX expect; ``__base__`` is the server's base model (the parent of the adapters in
``/v1/models``, or its one root entry).

The client is written once, async (:meth:`OpenAIBackend.agenerate`, :meth:`OpenAIBackend.astream`),
on one pooled ``httpx.AsyncClient`` that runs on a private event-loop thread; the
``Backend`` protocol's sync methods are thin wrappers over it. Requests of one call run
concurrently under a concurrency limit; 5xx, 429 and connection errors are retried with
exponential backoff within the expert's time budget; error bodies become typed errors:

    ==============================  ===========================================
    server says                     raised
    ==============================  ===========================================
    400 / 422                       InputError (the request itself is bad)
    401 / 403                       ExpertUnavailable (check ``api_key``)
    404                             UnknownExpert (the server lacks the adapter)
    429 / 5xx / connection errors   ExpertUnavailable, after retries
    no answer within the timeout    ExpertTimeout
    ==============================  ===========================================

:meth:`OpenAIBackend.load_adapter` / :meth:`OpenAIBackend.unload_adapter` change the remote's set
at run time (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, served only when
vLLM runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): the remote refusing an adapter (400, 404)
is an AdapterError, a vLLM without runtime updating (404 on the route itself) an AdapterError that
says how to start it, an unknown adapter on unload UnknownExpert; auth, 5xx and connection failures
ExpertUnavailable (not retried: a load is not idempotent).

>>> from experts.registry import ExpertSpec                                   # doctest: +SKIP
>>> b = OpenAIBackend("http://127.0.0.1:8001/v1", [ExpertSpec("finance", backend="openai",
...                   base_url="http://127.0.0.1:8001/v1")])                  # doctest: +SKIP
>>> b.generate([("finance", [{"role": "user", "content": "What is EBITDA?"}])], GenerationConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import httpx

from expertmix.errors import (
    AdapterError,
    ExpertError,
    ExpertTimeout,
    ExpertUnavailable,
    InputError,
    UnknownExpert,
)
from experts.backends.base import CancelToken, Generation, GenerationConfig
from experts.prompts import Message
from experts.registry import BASE_EXPERT, ExpertSpec

__all__ = ["OpenAIBackend"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRY_EXC = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.PoolTimeout)
_END = object()


def _error_message(resp: httpx.Response) -> str:
    """The message of an OpenAI (``{"error": {...}}``) or vLLM (``{"message": ...}``) error body."""
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    return str(body)[:300]


def _route_missing(resp: httpx.Response) -> bool:
    """A 404 from the web framework (no such route), not from vLLM's own handler (which names the adapter)."""
    try:
        body = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    if not isinstance(body, dict) or body == {"detail": "Not Found"}:
        return True
    return not (body.get("error") or body.get("message"))


class _Retryable(Exception):
    """Internal: a failure worth another try (5xx/429/connection), with the typed error to raise at the end."""

    def __init__(self, error: ExpertError) -> None:
        super().__init__(str(error))
        self.error = error


class OpenAIBackend:
    """Experts served by an OpenAI-compatible server. Thread-safe; one connection pool per instance.

    ``timeout_s`` is the default per-request budget (an expert's ``timeout_s`` overrides it;
    the orchestrator's ``expert_timeout_s`` arrives as ``GenerationConfig.max_time_s`` and
    caps both); retries happen inside that budget.
    """

    local_weights = False

    def __init__(
        self,
        base_url: str,
        experts: Sequence[ExpertSpec],
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_retries: int = 2,
        backoff_s: float = 0.25,
        max_concurrency: int = 32,
        check: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ExpertUnavailable(f"base_url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.specs = {e.name: e for e in experts}
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._remote = {e.name: e.remote_name or e.name for e in experts}
        self._base_model: str | None = None
        self._closed = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expertmix-openai", daemon=True)
        self._thread.start()
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)

        async def make() -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
            client = httpx.AsyncClient(
                base_url=self.base_url, headers=headers, limits=limits, transport=transport,
                timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            )
            return client, asyncio.Semaphore(max_concurrency)

        self._client, self._sem = self._run(make())
        if check:
            try:
                self._run(self.acheck())
            except ExpertUnavailable as exc:
                if exc.status_code == 404:
                    self.close()
                    raise
                # A server still starting (vLLM takes ~40 s) must not stop the orchestrator: checked again on use.
                logger.warning("expert server %s not reachable at start-up (%s); will retry on first use", self.base_url, exc)

    # -- sync facade (the Backend protocol) --------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], cancel: CancelToken | None = None, *, what: str = "request") -> T:
        """Run ``coro`` on the private loop; a cancelled ``cancel`` cancels the HTTP request and raises."""
        if self._closed:
            coro.close()
            raise ExpertUnavailable(f"backend for {self.base_url} is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        # wait on the future, not on result(timeout): ExpertTimeout is a TimeoutError too
        while not cf.wait([fut], timeout=0.05).done:
            if cancel is not None and cancel.cancelled:
                fut.cancel()
                raise cancel.error(what=what)
            if self._closed:
                fut.cancel()
                raise ExpertUnavailable(f"backend for {self.base_url} was closed")
        try:
            return fut.result()
        except cf.CancelledError:
            raise ExpertUnavailable(f"{what} on {self.base_url} was cancelled (backend closing)") from None

    def expert_names(self) -> list[str]:
        return list(self.specs)

    def generate(
        self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> list[Generation]:
        """Every (expert, messages) pair concurrently; the first failure raises (typed). The
        orchestrator sends remote rows one per call, so one expert's failure is its own."""
        if cancel is not None:
            left = cancel.remaining()
            if left is not None:
                config = replace(config, max_time_s=max(0.001, min(left, config.max_time_s or left)))
        return self._run(self.agenerate(requests, config), cancel, what="generation")

    def stream(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        """Yield text chunks of one expert's answer (server-sent events). Closing the iterator
        (or cancelling ``cancel``) closes the HTTP stream."""
        q: queue.Queue[Any] = queue.Queue()
        if cancel is not None:
            left = cancel.remaining()
            if left is not None:
                config = replace(config, max_time_s=max(0.001, min(left, config.max_time_s or left)))

        async def pump() -> None:
            try:
                async for chunk in self.astream(expert, messages, config):
                    q.put(chunk)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                q.put(exc)
            q.put(_END)

        if self._closed:
            raise ExpertUnavailable(f"backend for {self.base_url} is closed", expert=expert)
        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                try:
                    item = q.get(timeout=0.05)
                except queue.Empty:
                    if cancel is not None and cancel.cancelled:
                        raise cancel.error(expert=expert, what="stream") from None
                    if self._closed:
                        raise ExpertUnavailable(f"backend for {self.base_url} was closed", expert=expert) from None
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    def load_adapter(
        self, name: str, path: str, *, spec: ExpertSpec | None = None, timeout_s: float = 120.0
    ) -> None:
        """Ask the remote to load the LoRA adapter at ``path`` (a path *on the remote host*, or whatever its
        ``lora_path`` accepts) as model ``name``; on success this backend serves expert ``name`` (``spec``,
        else a plain openai spec). Typed errors as in the module docstring; on error nothing changed here."""
        if spec is not None and spec.name != name:
            raise InputError(f"load_adapter: spec {spec.name!r} is not for adapter {name!r}")
        self._run(self._admin("load_lora_adapter", {"lora_name": name, "lora_path": path}, name, timeout_s),
                  what="load_lora_adapter")
        spec = spec or ExpertSpec(name=name, backend="openai", base_url=self.base_url)
        # copy-and-swap: requests in flight read the old tables, new ones the new
        self.specs = {**self.specs, name: spec}
        self._remote = {**self._remote, name: name}

    def unload_adapter(self, name: str, *, timeout_s: float = 120.0) -> None:
        """Ask the remote to unload model ``name`` and stop serving expert ``name`` here. An adapter the
        remote does not have raises UnknownExpert (and is forgotten here too: the remote lacks it anyway)."""
        remote = self._remote.get(name, name)
        try:
            self._run(self._admin("unload_lora_adapter", {"lora_name": remote}, name, timeout_s),
                      what="unload_lora_adapter")
        except UnknownExpert:
            self.forget(name)
            raise
        self.forget(name)

    def forget(self, name: str) -> None:
        """Stop serving expert ``name`` from this backend (no remote call)."""
        self.specs = {n: s for n, s in self.specs.items() if n != name}
        self._remote = {n: r for n, r in self._remote.items() if n != name}

    async def _admin(self, route: str, body: dict[str, Any], expert: str, timeout_s: float) -> None:
        """One POST to vLLM's adapter-management ``route``; any refusal becomes a typed error."""
        try:
            resp = await self._client.post(f"/{route}", json=body, timeout=timeout_s)
        except httpx.TimeoutException:
            raise ExpertTimeout(f"{self.base_url}/{route}: no answer within {timeout_s:g} s",
                                expert=expert) from None
        except httpx.HTTPError as exc:
            raise ExpertUnavailable(f"cannot reach {self.base_url}/{route}: {type(exc).__name__}: {exc}",
                                    expert=expert) from exc
        if resp.status_code == 200:
            return
        code = resp.status_code
        msg = f"{self.base_url}/{route}: HTTP {code}: {_error_message(resp)}"
        if code == 404 and _route_missing(resp):
            raise AdapterError(
                f"{self.base_url} does not offer /{route} (HTTP 404): start vLLM with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment (and --enable-lora) to change its "
                "adapters at run time", expert=expert)
        if code == 404 and route == "unload_lora_adapter":
            raise UnknownExpert(msg, expert=expert)
        if code in (400, 404, 422):
            raise AdapterError(f"{msg} (lora_path is read on the remote host)" if route == "load_lora_adapter"
                               else msg, expert=expert)
        if code in (401, 403):
            msg += " (check the expert's api_key)"
        if code in (408, 504):
            raise ExpertTimeout(msg, expert=expert)
        raise ExpertUnavailable(msg, expert=expert, status_code=code)

    def close(self) -> None:
        """Cancel pending requests, close the connection pool, stop the loop thread. Never hangs."""
        if self._closed:
            return

        async def shutdown() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        except Exception:
            logger.debug("closing http client failed", exc_info=True)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- async core ---------------------------------------------------------------------------------
    async def acheck(self) -> list[str]:
        """``GET /models``: fail naming every configured expert the server lacks; find the base model."""
        try:
            resp = await self._client.get("/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise ExpertUnavailable(f"cannot reach {self.base_url}/models: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            raise self._typed(resp, expert=None, what="GET /models")
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ExpertUnavailable(
                f"{self.base_url}/models did not answer with an OpenAI model list ({resp.text[:120]!r}); "
                "is base_url the /v1 root of an OpenAI-compatible server?"
            )
        entries = [m for m in body["data"] if isinstance(m, dict) and "id" in m]
        ids = [str(m["id"]) for m in entries]
        missing = [n for n, r in self._remote.items() if r not in ids]
        if missing:
            raise ExpertUnavailable(
                f"{self.base_url} does not serve expert(s) {', '.join(missing)} "
                f"(model names {', '.join(self._remote[n] for n in missing)}); it serves: {', '.join(ids) or 'nothing'}. "
                "Start vLLM with --enable-lora --lora-modules NAME=ADAPTER_DIR for each, or set remote_name",
                expert=missing[0],
                status_code=404,
            )
        parents = {str(m["parent"]) for m in entries if m.get("id") in self._remote.values() and m.get("parent")}
        roots = [str(m["id"]) for m in entries if not m.get("parent")]
        if BASE_EXPERT in ids:
            self._base_model = BASE_EXPERT
        elif len(parents) == 1:
            self._base_model = parents.pop()
        elif len(roots) == 1:
            self._base_model = roots[0]
        elif roots:
            self._base_model = next((r for r in roots if r != "expertmix"), roots[0])
        return ids

    async def _model_for(self, expert: str) -> str:
        if expert == BASE_EXPERT:
            if self._base_model is None:
                await self.acheck()
            if self._base_model is None:
                raise UnknownExpert(f"{self.base_url}/models lists no base model for {BASE_EXPERT!r}", expert=expert)
            return self._base_model
        try:
            return self._remote[expert]
        except KeyError:
            known = ", ".join([*self._remote, BASE_EXPERT])
            raise UnknownExpert(f"unknown expert {expert!r}; this backend serves: {known}", expert=expert) from None

    def _budget(self, expert: str, config: GenerationConfig) -> float:
        spec = self.specs.get(expert)
        budget = spec.timeout_s if spec is not None and spec.timeout_s else self.timeout_s
        return min(budget, config.max_time_s) if config.max_time_s else budget

    @staticmethod
    def _payload(model: str, messages: list[Message], config: GenerationConfig, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "stream": stream,
        }
        if config.stop:
            body["stop"] = list(config.stop)
        if config.seed is not None:
            body["seed"] = config.seed
        if config.repetition_penalty != 1.0:
            body["repetition_penalty"] = config.repetition_penalty  # vLLM's sampling extension; same as local
        return body

    def _typed(self, resp: httpx.Response, *, expert: str | None, what: str) -> ExpertError | InputError:
        msg = f"{self.base_url} {what}: HTTP {resp.status_code}: {_error_message(resp)}"
        code = resp.status_code
        if code in (400, 422):
            return InputError(msg)
        if code == 404:
            return UnknownExpert(msg, expert=expert)
        if code in (408, 504):
            return ExpertTimeout(msg, expert=expert)
        if code in (401, 403):
            msg += " (check the expert's api_key)"
        return ExpertUnavailable(msg, expert=expert, status_code=code)

    async def _with_retries(self, expert: str, budget: float, attempt_fn: Callable[[float], Awaitable[T]]) -> T:
        """Run ``attempt_fn(deadline)`` with retries on :class:`_Retryable`, all within ``budget`` seconds."""
        deadline = time.monotonic() + budget
        last: ExpertError | None = None
        for attempt in range(self.max_retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                async with self._sem:
                    return await asyncio.wait_for(attempt_fn(left), timeout=left)
            except (TimeoutError, httpx.TimeoutException) as exc:
                if isinstance(exc, httpx.PoolTimeout):
                    last = ExpertUnavailable(f"{self.base_url}: connection pool exhausted", expert=expert)
                    continue
                raise ExpertTimeout(f"{self.base_url}: no answer within {budget:g} s", expert=expert) from None
            except _Retryable as exc:
                last = exc.error
            except _RETRY_EXC as exc:
                last = ExpertUnavailable(f"{self.base_url}: {type(exc).__name__}: {exc or 'connection lost'}", expert=expert)
            if attempt < self.max_retries:
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        if last is None:
            raise ExpertTimeout(f"{self.base_url}: no answer within {budget:g} s", expert=expert)
        raise last

    async def _one(self, expert: str, messages: list[Message], config: GenerationConfig) -> Generation:
        model = await self._model_for(expert)
        body = self._payload(model, messages, config, stream=False)
        t0 = time.perf_counter()

        async def attempt(left: float) -> Generation:
            resp = await self._client.post("/chat/completions", json=body, timeout=httpx.Timeout(left, connect=min(left, 5.0)))
            if resp.status_code != 200:
                err = self._typed(resp, expert=expert, what=f"model {model!r}")
                if resp.status_code in _RETRY_STATUS and isinstance(err, ExpertError):
                    raise _Retryable(err)
                raise err
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] or ""
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise ExpertUnavailable(f"{self.base_url}: not an OpenAI chat completion: {resp.text[:200]}", expert=expert) from exc
            usage = data.get("usage") or {}
            return Generation(
                expert=expert,
                text=text.strip(),
                tokens=int(usage.get("completion_tokens") or 0),
                latency_s=time.perf_counter() - t0,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                finish_reason=str(choice.get("finish_reason") or "stop"),
                extra={"remote_model": model},
            )

        return await self._with_retries(expert, self._budget(expert, config), attempt)

    async def agenerate(self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig) -> list[Generation]:
        """Async :meth:`generate`: one HTTP request per pair, concurrently."""
        if not requests:
            return []
        results = await asyncio.gather(*(self._one(n, m, config) for n, m in requests), return_exceptions=True)
        for (name, _), r in zip(requests, results):
            if isinstance(r, BaseException):
                if isinstance(r, (ExpertError, InputError)):
                    raise r
                logger.warning("expert %s on %s failed", name, self.base_url, exc_info=r)
                raise ExpertUnavailable(f"{self.base_url}: {type(r).__name__}: {r}", expert=name) from r
        return [r for r in results if isinstance(r, Generation)]

    async def astream(self, expert: str, messages: list[Message], config: GenerationConfig) -> AsyncIterator[str]:
        """Async :meth:`stream`. Retries only before the first chunk arrived."""
        model = await self._model_for(expert)
        body = self._payload(model, messages, config, stream=True)
        budget = self._budget(expert, config)
        deadline = time.monotonic() + budget
        # Open the stream with retries; then read it under the remaining budget.
        cm: Any = None

        async def attempt(left: float) -> httpx.Response:
            nonlocal cm
            cm = self._client.stream("POST", "/chat/completions", json=body,
                                     timeout=httpx.Timeout(left, connect=min(left, 5.0)))
            resp: httpx.Response = await cm.__aenter__()
            if resp.status_code != 200:
                await resp.aread()
                await cm.__aexit__(None, None, None)
                err = self._typed(resp, expert=expert, what=f"model {model!r}")
                if resp.status_code in _RETRY_STATUS and isinstance(err, ExpertError):
                    raise _Retryable(err)
                raise err
            return resp

        resp: httpx.Response = await self._with_retries(expert, budget, attempt)
        events = 0
        try:
            lines = resp.aiter_lines()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpertTimeout(f"{self.base_url}: answer not finished within {budget:g} s", expert=expert)
                try:
                    line = await asyncio.wait_for(anext(lines), timeout=left)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ExpertTimeout(f"{self.base_url}: answer not finished within {budget:g} s", expert=expert) from None
                except httpx.HTTPError as exc:
                    raise ExpertUnavailable(f"{self.base_url}: stream broke: {type(exc).__name__}: {exc}", expert=expert) from exc
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    events += 1
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict) and "error" in event:
                    msg = event["error"].get("message") if isinstance(event["error"], dict) else event["error"]
                    raise ExpertUnavailable(f"{self.base_url}: {msg}", expert=expert)
                choices = event.get("choices") if isinstance(event, dict) else None
                if not isinstance(choices, list):
                    continue
                events += 1
                for choice in choices:
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    piece = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(piece, str) and piece:
                        yield piece
            if events == 0:
                raise ExpertUnavailable(f"{self.base_url}: model {model!r} did not answer with an OpenAI event stream",
                                        expert=expert)
        finally:
            await cm.__aexit__(None, None, None)
