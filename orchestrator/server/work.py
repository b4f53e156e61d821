"""One request's work, whatever door it came in by (chat or text completions, plain or streamed).

A :class:`Work` holds the request's fields as the client sent them; the orchestrator builds
the decoding settings from them (``om.ask`` / ``om.stream`` / ``om.generate``), so a request
gets the same settings here as through the CLI or the Python API. ``response_format`` is
honoured by :mod:`orchestrator.server.jsonmode` around whichever call answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from experts.backends.base import CancelToken
from orchestrator.server.jsonmode import ATTEMPTS, JsonRule
from orchestrator.server.schemas import OpenAIError
from orchestrator.server.streaming import StopCut

if TYPE_CHECKING:
    from orchestrator.server.app import ServerState
    from orchestrator.trace import Answer

__all__ = ["ORCHESTRATED_MODEL", "Result", "Work", "answer_extra", "run_work", "stream_source"]

ORCHESTRATED_MODEL = "expertmix"


@dataclass
class Work:
    """What the client asked for. ``cancel`` is cancelled when the client goes away or the server stops."""

    rid: str
    kind: str  # "chat" | "text"
    model: str  # as the client named it
    target: str  # "expertmix", an expert, or "__base__"
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    strategy: str | None = None
    planner: str | None = None
    k: int | None = None
    min_weight: float | None = None
    json: JsonRule | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    answer_id: str | None = None

    @property
    def orchestrated(self) -> bool:
        return self.target == ORCHESTRATED_MODEL


@dataclass
class Result:
    """An answer in the terms the wire format needs."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    answer: Answer | None = None
    id: str | None = None


def _ask_kwargs(work: Work, temperature: float | None, seed: int | None) -> dict[str, Any]:
    return {"k": work.k, "strategy": work.strategy, "planner": work.planner, "max_new_tokens": work.max_tokens,
            "temperature": temperature, "top_p": work.top_p, "seed": seed, "stop": work.stop or None,
            "min_weight": work.min_weight, "repetition_penalty": work.repetition_penalty, "cancel": work.cancel}


def answer_extra(state: ServerState, answer: Answer, rid: str) -> dict[str, Any]:
    """The ``expertmix`` trace of an answer, with internal addresses hidden from the client."""
    d = answer.to_dict()
    d.pop("answer", None)
    d.pop("usage", None)
    for c in d.get("contributions", []):
        if c.get("error"):
            c["error"] = state.redact(str(c["error"]), request_id=rid)
    return d


def answer_finish(answer: Answer, cut: bool) -> str:
    """The core's verdict (``length`` when any part hit its token limit), ``stop`` when a stop string cut it."""
    return "stop" if cut or answer.finish_reason != "length" else "length"


def _orchestrated(state: ServerState, work: Work, messages: list[dict[str, str]], temperature: float | None,
                  seed: int | None) -> Result:
    answer = state.om.ask(messages, **_ask_kwargs(work, temperature, seed))
    state.metrics.observe_answer(answer)
    state.metrics.observe_tokens(ORCHESTRATED_MODEL, answer.prompt_tokens, answer.tokens)
    text, cut = StopCut.apply(answer.text, work.stop)
    return Result(text, answer_finish(answer, cut), answer.prompt_tokens, answer.tokens,
                  answer_extra(state, answer, work.rid), answer, getattr(answer, "id", None))


def _direct(state: ServerState, work: Work, messages: list[dict[str, str]], temperature: float | None,
            seed: int | None) -> Result:
    g = state.om.generate(work.target, messages, max_new_tokens=work.max_tokens, temperature=temperature,
                          top_p=work.top_p, seed=seed, stop=work.stop or None,
                          repetition_penalty=work.repetition_penalty, cancel=work.cancel)
    work.cancel.raise_if_cancelled(expert=work.target, what="the request")
    state.metrics.observe_tokens(work.target, g.prompt_tokens, g.tokens)
    text, cut = StopCut.apply(g.text, work.stop)
    finish = "stop" if cut else (g.finish_reason if g.finish_reason in ("stop", "length") else "stop")
    return Result(text, finish, g.prompt_tokens, g.tokens, {"expert": work.target, "latency_s": round(g.latency_s, 4)})


def run_work(state: ServerState, work: Work) -> Result:
    """Answer ``work`` (blocking; in a worker thread). ``response_format``: validate, retry, or fail by name."""
    once = _orchestrated if work.orchestrated else _direct
    if work.json is None:
        return once(state, work, work.messages, work.temperature, work.seed)
    error: str | None = None
    for attempt in range(ATTEMPTS):
        # a greedy request would repeat itself: retries sample, seeded, so they are reproducible
        temperature = work.temperature if attempt == 0 or work.temperature else 0.7
        seed = work.seed if attempt == 0 else (work.seed or 0) + attempt
        res = once(state, work, work.json.prime(work.messages, error), temperature, seed)
        value, error = work.json.check(res.text)
        if error is None:
            res.text = json.dumps(value, ensure_ascii=False)
            res.finish_reason = "stop"
            res.extra["response_format"] = {"type": work.json.kind, "attempts": attempt + 1}
            return res
    raise OpenAIError(422, f"response_format {work.json.kind}: no valid answer in {ATTEMPTS} attempts; last: "
                      f"{error}. Raise max_tokens, simplify the schema, or ask without response_format",
                      param="response_format", code="response_format_not_met")


def stream_source(state: ServerState, work: Work) -> Iterator[str | Result]:
    """Text chunks, then a final :class:`Result` (blocking; in a worker thread)."""
    if work.json is not None:  # the answer must be validated whole before any of it is sent
        res = run_work(state, work)
        yield res.text
        yield res
        return
    if work.orchestrated:
        parts: list[str] = []
        for item in state.om.stream(work.messages, **_ask_kwargs(work, work.temperature, work.seed)):
            if isinstance(item, str):
                parts.append(item)
                yield item
                continue
            if not item.tokens and parts:  # a streamed answer that did not count its tokens
                item.prompt_tokens, item.tokens = _count(state, work.messages, "".join(parts))
            state.metrics.observe_answer(item)
            state.metrics.observe_tokens(ORCHESTRATED_MODEL, item.prompt_tokens, item.tokens)
            yield Result("", answer_finish(item, False), item.prompt_tokens, item.tokens,
                         answer_extra(state, item, work.rid), item, getattr(item, "id", None))
        return
    yield from _direct_stream(state, work)


def _direct_stream(state: ServerState, work: Work) -> Iterator[str | Result]:
    it = state.om.generate_stream(work.target, work.messages, max_new_tokens=work.max_tokens,
                                  temperature=work.temperature, top_p=work.top_p, seed=work.seed,
                                  stop=work.stop or None, repetition_penalty=work.repetition_penalty,
                                  cancel=work.cancel)
    parts: list[str] = []
    try:
        for piece in it:
            parts.append(piece)
            yield piece
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    work.cancel.raise_if_cancelled(expert=work.target, what="the request")
    prompt, tokens = _count(state, work.messages, "".join(parts))
    state.metrics.observe_tokens(work.target, prompt, tokens)
    yield Result("", "length" if tokens >= work.max_tokens else "stop", prompt, tokens, {"expert": work.target})


def _count(state: ServerState, messages: list[dict[str, str]], text: str) -> tuple[int, int]:
    """Token counts of a directly streamed answer (the local tokenizer; 0 when there is none)."""
    local = state.om.local
    if local is None:
        return 0, 0
    prompt = len(local.encode_prompt(messages))
    return prompt, len(local.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
