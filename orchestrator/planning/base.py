"""A plan: the request split into parts, each with its own routing.

>>> plan = get_planner("segment").plan(text, router=router, k=2, min_weight=0.05)   # doctest: +SKIP
>>> [(p.text, p.routing.experts[0].name) for p in plan.parts]                        # doctest: +SKIP
[('How should we hedge our EUR revenue?', 'finance'), ('What does engineering need to build for it?', 'engineering')]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from experts.prompts import Message

if TYPE_CHECKING:
    from orchestrator.routing import Router, Routing

__all__ = ["Part", "Plan", "PlanContext", "Planner", "part_messages"]


@dataclass(frozen=True)
class Part:
    """One sub-question: its text, where it sits in the request, and its own routing."""

    text: str
    routing: Routing
    span: tuple[int, int] | None = None

    @property
    def expert(self) -> str | None:
        """The part's top expert, or None when the router abstained (the base model answers)."""
        return None if self.routing.abstained else self.routing.experts[0].name

    def to_dict(self) -> dict[str, Any]:
        r = self.routing
        return {
            "text": self.text,
            "span": list(self.span) if self.span else None,
            "experts": [{"name": e.name, "weight": round(e.weight, 6)} for e in r.experts],
            "abstained": r.abstained,
            "reason": r.reason,
        }


@dataclass(frozen=True)
class Plan:
    """The parts of a request. ``routing`` is the whole request's routing; ``fallback`` says
    why another planner's plan was used (e.g. the LLM's plan was invalid)."""

    parts: tuple[Part, ...]
    planner: str
    routing: Routing
    fallback: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def multi(self) -> bool:
        """Several parts on different experts (or the base): worth decomposing."""
        return len(self.parts) > 1 and len({p.expert for p in self.parts}) > 1

    def to_dict(self) -> dict[str, Any]:
        return {"planner": self.planner, "fallback": self.fallback, "parts": [p.to_dict() for p in self.parts]}


@dataclass
class PlanContext:
    """What a planner may use: the router, the routing options, and (for ``llm``) a text generator."""

    router: Router
    k: int
    min_weight: float
    max_parts: int = 4
    experts: Sequence[str] = ()
    #: ``generate(prompt) -> text`` with the aggregator model; None where no LLM planning is possible
    generate: Callable[[str], str] | None = None


class Planner(Protocol):
    name: str

    def plan(self, question: str, ctx: PlanContext) -> Plan: ...


_CONTEXT = "\n\n(The rest of the request: \"{rest}\")"
_WHOLE = "\n\n(This is one part of a longer request: \"{whole}\". Answer only this part.)"


def part_messages(messages: Sequence[Message], plan: Plan, part: Part) -> list[Message]:
    """The messages the expert answering ``part`` sees: the part's question first, then the rest of
    the request as context, so the whole request is in the prompt once (every part prompt is
    prefilled, and on CPU prefill is a large share of a two-part answer's time). A part without a
    span (an LLM plan's paraphrase) gets the whole request after it. Earlier turns of the
    conversation are kept; a one-part plan changes nothing."""
    msgs = [dict(m) for m in messages]
    if len(plan.parts) <= 1:
        return msgs
    last = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
    content = str(msgs[last]["content"])
    a, b = part.span if part.span is not None else (0, 0)
    rest = " ".join(f"{content[:a]} … {content[b:]}".split()).strip(" …,;:") if 0 <= a < b <= len(content) else ""
    if rest:
        context = _CONTEXT.format(rest=rest)
    else:
        context = _WHOLE.format(whole=" ".join(content.split()))
    msgs[last] = {**msgs[last], "content": part.text + context}
    return msgs
    last = max(i for i, m in enumerate(msgs) if m.get("role") == "user")
    whole = " ".join(str(msgs[last]["content"]).split())
    msgs[last] = {**msgs[last], "content": part.text + _CONTEXT.format(whole=whole)}
    return msgs
