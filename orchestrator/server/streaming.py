"""``stream: true``: the answer as server-sent events in OpenAI's ``chat.completion.chunk`` format.

The blocking stream (orchestrator or one expert; see :func:`orchestrator.server.work.stream_source`)
runs in a worker thread and hands its chunks to the event loop through an asyncio queue. A client
that goes away cancels the work (its cancel token) and frees its queue slot. The first chunk is awaited before the
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
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from sse_starlette.sse import EventSourceResponse

from orchestrator.server.schemas import chunk, new_id, text_chunk

if TYPE_CHECKING:
    from orchestrator.server.app import ServerState
    from orchestrator.server.work import Work

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


async def sse_response(state: ServerState, work: Work, *, include_usage: bool,
                       on_done: Callable[[int], None], release: Callable[[], None]) -> EventSourceResponse:
    """Start ``work`` streaming; ``release`` frees its queue slot when the work itself has ended."""
    from orchestrator.server.errors import to_openai_error
    from orchestrator.server.work import Result, _count, stream_source

    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def cancel(reason: str) -> None:
        stop.set()
        work.cancel.cancel(reason)

    def put(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shut down)
            cancel("server stopped")

    def produce() -> None:
        try:
            it = stream_source(state, work)
            try:
                for item in it:
                    if stop.is_set():
                        break
                    put("item", item)
            finally:
                it.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            put("error", exc)
        finally:
            release()
        put("end", None)

    try:
        state.executor.submit(produce)
    except RuntimeError as exc:  # the executor is shut down: the server is stopping
        release()
        on_done(503)
        raise to_openai_error(exc) from exc
    try:
        first = await items.get()
    except asyncio.CancelledError:
        cancel("client disconnected")
        on_done(499)
        raise
    if first[0] == "error":
        cancel("error")
        err = to_openai_error(first[1], redact=state.redact, request_id=work.rid)
        on_done(err.status)
        raise err from first[1]

    render = chunk if work.kind == "chat" else text_chunk
    rid, created, model = work.answer_id or new_id("chatcmpl" if work.kind == "chat" else "cmpl"), \
        int(time.time()), work.model

    async def events() -> AsyncIterator[str]:
        status = 200
        cut = StopCut(work.stop)
        final: Result | None = None
        sent: list[str] = []
        pending: tuple[str, Any] | None = first
        try:
            if work.kind == "chat":
                yield json.dumps(render(id=rid, model=model, created=created, role=True, content=""))
            while True:
                kind, value = pending if pending is not None else await items.get()
                pending = None
                if kind == "end":
                    break
                if kind == "error":
                    err = to_openai_error(value, redact=state.redact, request_id=work.rid)
                    status = err.status
                    yield json.dumps(err.body())
                    yield "[DONE]"
                    return
                if isinstance(value, Result):
                    final = value
                    continue
                text = cut.feed(value)
                sent.append(text)
                if text:
                    yield json.dumps(render(id=rid, model=model, created=created, content=text))
                if cut.stopped:
                    cancel("stop string")
                    break
            tail = cut.flush()
            sent.append(tail)
            if tail:
                yield json.dumps(render(id=rid, model=model, created=created, content=tail))
            if final is not None:
                usage = (final.prompt_tokens, final.completion_tokens)
            else:  # cut at a stop string before the work's own end: count what was sent
                usage = await asyncio.to_thread(_count, state, work.messages, "".join(sent))
            finish = "stop" if cut.stopped or final is None else final.finish_reason
            extra = final.extra if final else {}
            yield json.dumps(render(id=rid, model=model, created=created, finish_reason=finish, usage=usage,
                                    expertmix=extra))
            if include_usage:
                yield json.dumps(render(id=rid, model=model, created=created, usage=usage, choices=False))
            yield "[DONE]"
        except asyncio.CancelledError:
            status = 499  # client went away
            raise
        finally:
            cancel("stream ended")
            on_done(status)

    return EventSourceResponse(events(), ping=15)
