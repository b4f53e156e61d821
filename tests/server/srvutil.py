"""Constants and small helpers shared by the server tests (fixtures live in conftest.py)."""

from __future__ import annotations

import httpx

KEY = "test-key"
Q_FIN = "What is EBITDA and how do I compute it from an income statement?"
Q_ENG = "How do I reverse a list in Python?"
Q_PROD = "Write a user story for a login page."
AUTH = {"Authorization": f"Bearer {KEY}"}


def msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def err(resp: httpx.Response) -> dict:
    """The OpenAI error object of a response (and check its shape)."""
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (labels if labels else "")) and (labels or line[len(name)] in " {"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")
