"""OpenAI chat-completions wire format: the request we accept, the responses and chunks we send, errors.

expertmix's own options ride as extra top-level body fields (the ``openai`` client's
``extra_body``): ``strategy``, ``k``, ``min_weight``. Answers carry the routing and
per-expert contributions in an extra top-level ``expertmix`` object, which OpenAI
clients ignore (``response.model_extra["expertmix"]`` in the Python client).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "ChatMessage", "OpenAIError", "chunk", "completion", "error_body", "model_card"]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    # expertmix extensions (extra_body)
    strategy: str | None = None
    k: int | None = Field(default=None, ge=1)
    min_weight: float | None = Field(default=None, ge=0, lt=1)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


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


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


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


def model_card(id: str, *, parent: str | None, owned_by: str = "expertmix", description: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": id, "object": "model", "created": 0, "owned_by": owned_by, "root": parent or id,
                            "parent": parent}
    if description:
        card["description"] = description
    return card
