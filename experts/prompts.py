"""Query normalization shared by every backend: text or chat messages → validated messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from expertmix.errors import InputError

__all__ = ["Message", "Query", "last_user_text", "normalize_messages"]

Message = dict[str, str]
Query = str | bytes | Sequence[Mapping[str, Any]]
_ROLES = ("system", "user", "assistant")


def _text(value: Any, where: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where} is not valid UTF-8 (byte {exc.start})") from exc
    if not isinstance(value, str):
        raise InputError(f"{where} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from a bad decode
        raise InputError(f"{where} is not valid UTF-8 (character {exc.start})") from exc
    return value


def normalize_messages(query: Query) -> list[Message]:
    """Accept a string (one user turn), UTF-8 bytes, or OpenAI-style chat messages.

    >>> normalize_messages("What is EBITDA?")
    [{'role': 'user', 'content': 'What is EBITDA?'}]
    """
    if isinstance(query, (str, bytes)):
        text = _text(query, "query")
        if not text.strip():
            raise InputError("query is empty; ask a question")
        return [{"role": "user", "content": text}]
    if not isinstance(query, Sequence) or not query:
        raise InputError("query must be a non-empty string or a non-empty list of chat messages")
    out: list[Message] = []
    for i, m in enumerate(query):
        if not isinstance(m, Mapping):
            raise InputError(f"message {i} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise InputError(f"message {i}: role must be one of {', '.join(_ROLES)}, got {role!r}")
        content = _text(m.get("content"), f"message {i} content")
        out.append({"role": str(role), "content": content})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise InputError("the last message must be a non-empty user message")
    return out


def last_user_text(messages: Sequence[Message]) -> str:
    """The text the router scores: the last user turn."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise InputError("no user message")
