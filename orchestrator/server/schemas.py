"""OpenAI wire format: the requests we accept (chat and text completions), responses, chunks, errors.

expertmix's own options ride as extra top-level body fields (the ``openai`` client's
``extra_body``): ``strategy``, ``k``, ``min_weight``, ``planner``. Answers carry the routing and
per-expert contributions in an extra top-level ``expertmix`` object, which OpenAI
clients ignore (``response.model_extra["expertmix"]`` in the Python client).

Every field OpenAI defines is declared here, so that a field we cannot honour is refused
by name (400) instead of being silently ignored; a field OpenAI does not define is
refused too, unless the server runs with ``drop_params`` (then it is dropped and logged).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "OpenAIError",
    "chunk",
    "completion",
    "error_body",
    "model_card",
    "text_chunk",
    "text_completion",
]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


def _function_text(call: Any) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        return "[tool call]"
    return f"[called tool {fn.get('name', '?')} with {fn.get('arguments', '')}]"


class ChatMessage(BaseModel):
    """One chat turn. ``tool`` turns (results of a tool the client ran) are rendered as user-visible context."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        if self.role in ("tool", "function"):
            who = self.name or self.tool_call_id or "a tool"
            return {"role": "user", "content": f"Result from {who}:\n{text}"}
        if self.role == "assistant" and self.tool_calls:
            calls = "\n".join(_function_text(c) for c in self.tool_calls)
            text = f"{text}\n{calls}".strip()
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields that need nothing from us when left at these values; anything else is refused by name
# (or dropped with drop_params). They change sampling, not the shape of the answer.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


class _Request(BaseModel):
    """What chat and text completions share: sampling, limits, expertmix's own options."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    #: vLLM's sampling extension, accepted as vLLM does (expertmix's remote backend sends it)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # expertmix extensions (extra_body)
    strategy: str | None = None
    planner: str | None = None
    k: int | None = Field(default=None, ge=1)
    min_weight: float | None = Field(default=None, ge=0, lt=1, allow_inf_nan=False)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def unknown_fields(self) -> list[str]:
        """Body fields OpenAI's API does not define (refused unless the server drops them)."""
        return sorted(self.model_extra or {})

    def unsupported(self) -> list[str]:
        """Declared OpenAI fields set to something this server cannot do (e.g. ``logprobs: true``)."""
        out = []
        for name, neutral in _NEUTRAL.items():
            if name in self.model_fields_set and getattr(self, name, None) not in neutral:
                out.append(name)
        return out


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_problem(self) -> str | None:
        """Why the tool fields cannot be honoured (None: no tools asked for, or ``tool_choice: "none"``)."""
        if self.tool_choice == "none" or self.function_call == "none":
            return None
        if self.tools or self.functions:
            field = "tools" if self.tools else "functions"
            return (f"{field}: this server's models cannot call tools (the base model was not trained for it); "
                    "send tool_choice: \"none\" to answer without tools, or drop the tools")
        if self.tool_choice not in (None, "auto") or self.function_call not in (None, "auto"):
            field = "tool_choice" if self.tool_choice not in (None, "auto") else "function_call"
            return f"{field}: asks for a tool call, but no tools can be called on this server"
        return None


class CompletionRequest(_Request):
    """``POST /v1/completions`` (legacy text completions): the prompt is sent as one user turn."""

    prompt: str | list[str]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise OpenAIError(400, f"prompt: {len(self.prompt)} prompts sent; this server takes one per request",
                              param="prompt", code="unsupported_parameter")
        return self.prompt[0]


class OpenAIError(Exception):
    """An HTTP error rendered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(*, id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               expertmix: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }],
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }
    if expertmix is not None:
        body["expertmix"] = expertmix
    return body


def text_completion(*, id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, expertmix: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": _usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }
    if expertmix is not None:
        body["expertmix"] = expertmix
    return body


def chunk(*, id: str, model: str, created: int, content: str | None = None, role: bool = False,
          finish_reason: str | None = None, usage: tuple[int, int] | None = None, choices: bool = True,
          expertmix: dict[str, Any] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}] if choices else [],
        "system_fingerprint": None,
    }
    if usage is not None:
        body["usage"] = _usage(*usage)
    if expertmix is not None:
        body["expertmix"] = expertmix
    return body


def text_chunk(*, id: str, model: str, created: int, content: str | None = None, role: bool = False,
               finish_reason: str | None = None, usage: tuple[int, int] | None = None, choices: bool = True,
               expertmix: dict[str, Any] | None = None) -> dict[str, Any]:
    """A streamed ``text_completion`` event (same arguments as :func:`chunk`; ``role`` is meaningless here)."""
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": content or "", "finish_reason": finish_reason, "logprobs": None}]
        if choices else [],
        "system_fingerprint": None,
    }
    if usage is not None:
        body["usage"] = _usage(*usage)
    if expertmix is not None:
        body["expertmix"] = expertmix
    return body


def model_card(id: str, *, parent: str | None, owned_by: str = "expertmix", description: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": id, "object": "model", "created": 0, "owned_by": owned_by, "root": parent or id,
                            "parent": parent}
    if description:
        card["description"] = description
    return card
