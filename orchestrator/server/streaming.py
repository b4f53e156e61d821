"""``stream: true``: the answer as server-sent events in OpenAI's ``chat.completion.chunk`` format.

The blocking stream (orchestrator or one expert) runs in a worker thread and hands its
chunks to the event loop through an asyncio queue. The first chunk is awaited before the
response starts, so errors found early (unknown strategy, prompt too long) still get a
proper HTTP status; a failure after that becomes an ``{"error": ...}`` event. The last
content chunk carries ``finish_reason``, ``usage`` and the ``expertmix`` trace;
``stream_options.include_usage`` adds OpenAI's separate usage chunk. Ends with ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from sse_starlette.sse import EventSourceResponse

from experts.backends.base import GenerationConfig
from orchestrator.server.schemas import ChatCompletionRequest, chunk, new_id

if TYPE_CHECKING:
    from orchestrator.server.app import ServerState

__all__ = ["StopCut", "sse_response"]


class StopCut:
    """Cut streamed text at the first stop string, holding back just enough to see one across chunks."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self.buf = self.buf[: min(cuts)], ""
            return out
        keep = len(self.buf) - self.hold
        out, self.buf = self.buf[:keep], self.buf[keep:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out

    @staticmethod
    def apply(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
        cut = StopCut(stops)
        out = cut.feed(text) + cut.flush()
        return out, cut.stopped


def _source(state: ServerState, req: ChatCompletionRequest, target: str, messages: list[dict[str, str]],
            gen: GenerationConfig) -> Iterator[Any]:
    from orchestrator.server.app import ORCHESTRATED_MODEL

    om = state.om
    if target == ORCHESTRATED_MODEL:
        return om.stream(messages, k=req.k, strategy=req.strategy, max_new_tokens=gen.max_new_tokens,
                         temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed, min_weight=req.min_weight)
    return om.pool.backend_for(target).stream(target, messages, gen)


def _count(state: ServerState, messages: list[dict[str, str]], text: str) -> tuple[int, int]:
    """Token counts of a directly streamed answer (the local tokenizer; 0 when there is none)."""
    local = state.om.local
    if local is None:
        return 0, 0
    prompt = len(local.encode_prompt(messages))
    return prompt, len(local.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


async def sse_response(state: ServerState, req: ChatCompletionRequest, target: str, messages: list[dict[str, str]],
                       gen: GenerationConfig, *, on_done: Callable[[int], None]) -> EventSourceResponse:
    from orchestrator.server.app import ORCHESTRATED_MODEL, answer_extra
    from orchestrator.server.errors import to_openai_error
    from orchestrator.trace import Answer

    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shut down)
            cancel.set()

    def produce() -> None:
        try:
            it = _source(state, req, target, messages, gen)
            try:
                for item in it:
                    put("item", item)
                    if cancel.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            put("error", exc)
        put("end", None)

    state.executor.submit(produce)
    try:
        first = await items.get()
    except asyncio.CancelledError:
        cancel.set()
        on_done(499)
        raise
    if first[0] == "error":
        cancel.set()
        err = to_openai_error(first[1])
        on_done(err.status)
        raise err from first[1]

    rid, created, model = new_id(), int(time.time()), req.model
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        status = 200
        cut = StopCut(gen.stop)
        parts: list[str] = []
        answer: Answer | None = None
        pending: tuple[str, Any] | None = first
        try:
            yield json.dumps(chunk(id=rid, model=model, created=created, role=True, content=""))
            while True:
                kind, value = pending if pending is not None else await items.get()
                pending = None
                if kind == "end":
                    break
                if kind == "error":
                    err = to_openai_error(value)
                    status = err.status
                    yield json.dumps(err.body())
                    yield "[DONE]"
                    return
                if isinstance(value, Answer):
                    answer = value
                    continue
                parts.append(value)
                text = cut.feed(value)
                if text:
                    yield json.dumps(chunk(id=rid, model=model, created=created, content=text))
                if cut.stopped:
                    cancel.set()
                    break
            tail = cut.flush()
            if tail:
                yield json.dumps(chunk(id=rid, model=model, created=created, content=tail))
            if answer is not None:
                state.metrics.observe_answer(answer)
                usage = (answer.prompt_tokens, answer.tokens)
                extra: dict[str, Any] = answer_extra(answer)
            else:
                usage = await asyncio.to_thread(_count, state, messages, "".join(parts))
                extra = {"expert": target}
            state.metrics.observe_tokens(ORCHESTRATED_MODEL if answer is not None else target, *usage)
            finish = "stop" if cut.stopped or answer is not None or usage[1] < gen.max_new_tokens else "length"
            yield json.dumps(chunk(id=rid, model=model, created=created, finish_reason=finish, usage=usage, expertmix=extra))
            if include_usage:
                yield json.dumps(chunk(id=rid, model=model, created=created, usage=usage, choices=False))
            yield "[DONE]"
        except asyncio.CancelledError:
            status = 499  # client went away
            raise
        finally:
            cancel.set()
            on_done(status)

    return EventSourceResponse(events(), ping=15)
