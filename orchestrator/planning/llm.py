"""``llm``: the aggregator model writes a JSON plan; anything invalid falls back to ``segment``.

The model is asked for ``{"parts": [{"text": "...", "expert": "<name>"}]}``. The plan is
accepted only if it parses, matches that schema, names only configured experts (or none), has
at most ``max_parts`` parts, and its parts cover the request (every part's words come from the
request and together they cover most of its content words). Otherwise — or on a timeout — the
``segment`` plan is used and ``Plan.fallback`` says why. Meant for capable bases (GPU / vLLM);
the embedded 135M base rarely writes a valid plan, and then falls back cleanly.
"""

from __future__ import annotations

import json
import re
from typing import Any

from orchestrator.planning.base import Part, Plan, PlanContext
from orchestrator.planning.segment import Segment

__all__ = ["PLAN_PROMPT", "LLMPlanner", "parse_plan"]

PLAN_PROMPT = """Split the request below into independent parts, one per department that must answer it.
Departments: {experts}.
Reply with JSON only, in this form: {{"parts": [{{"text": "<the part, in the request's words>", "expert": "<department>"}}]}}
A request about one thing is one part.

Request: {question}"""

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(["a", "an", "the", "and", "or", "of", "to", "for", "in", "on", "with", "is", "are", "be", "we", "our", "i", "you", "it", "this", "that", "what", "how", "do", "does"])


def _content(s: str) -> set[str]:
    return {w for w in _WORD.findall(s.lower()) if w not in _STOP}


def parse_plan(raw: str, question: str, *, experts: list[str], max_parts: int) -> list[dict[str, Any]]:
    """Validate the model's JSON plan; raise ValueError saying what is wrong."""
    m = re.search(r"\{.*\}", raw, re.DOTALL)
    if not m:
        raise ValueError("no JSON object in the reply")
    try:
        data = json.loads(m.group(0))
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg}") from None
    parts = data.get("parts") if isinstance(data, dict) else None
    if not isinstance(parts, list) or not parts:
        raise ValueError("'parts' must be a non-empty list")
    if len(parts) > max_parts:
        raise ValueError(f"{len(parts)} parts > max_parts {max_parts}")
    out = []
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"].strip():
            raise ValueError(f"part {i}: needs a non-empty 'text' string")
        expert = p.get("expert")
        if expert is not None and expert not in experts:
            raise ValueError(f"part {i}: unknown expert {expert!r}")
        out.append({"text": p["text"].strip(), "expert": expert})
    q = _content(question)
    covered: set[str] = set()
    for p in out:
        words = _content(p["text"])
        if words - q:
            raise ValueError(f"part {p['text'][:40]!r} uses words not in the request")
        covered |= words
    if q and len(covered & q) < 0.6 * len(q):
        raise ValueError("the parts do not cover the request")
    return out


class LLMPlanner:
    name = "llm"

    def plan(self, question: str, ctx: PlanContext) -> Plan:
        fallback: str
        if ctx.generate is None:
            fallback = "no aggregator model to plan with"
        else:
            try:
                raw = ctx.generate(PLAN_PROMPT.format(experts=", ".join(ctx.experts), question=question.strip()))
                parts = parse_plan(raw, question, experts=list(ctx.experts), max_parts=ctx.max_parts)
            except ValueError as exc:
                fallback = f"invalid LLM plan: {exc}"
            except Exception as exc:  # noqa: BLE001 - timeouts, backend errors: plan without the LLM
                fallback = f"LLM planner failed: {type(exc).__name__}: {exc}"
            else:
                texts = [p["text"] for p in parts]
                routed = ctx.router.route_batch([question.strip(), *texts], k=ctx.k, min_weight=ctx.min_weight)
                whole = routed[0]
                if len(parts) == 1:
                    return Plan((Part(question.strip(), whole, (0, len(question.strip()))),), self.name, whole)
                spans = [_find(question, t) for t in texts]
                return Plan(tuple(Part(t, r, s) for t, r, s in zip(texts, routed[1:], spans)), self.name, whole)
        plan = Segment().plan(question, ctx)
        return Plan(plan.parts, self.name, plan.routing, fallback=f"segment ({fallback})", notes=plan.notes)


def _find(question: str, text: str) -> tuple[int, int] | None:
    i = question.find(text)
    return (i, i + len(text)) if i >= 0 else None
