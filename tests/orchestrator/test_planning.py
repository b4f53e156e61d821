"""Planners: segmentation of cross-department requests, one router batch, neighbour merging, LLM fallback."""

from __future__ import annotations

import pytest

from expertmix.errors import StrategyError
from orchestrator.planning import PlanContext, get_planner, part_messages, planner_names
from orchestrator.planning.llm import parse_plan
from orchestrator.planning.segment import _absorb_short, candidate_spans
from orchestrator.routing import ExpertWeight, Routing

KEYWORDS = {"finance": ("hedge", "revenue", "ebitda", "pricing", "budget"),
            "engineering": ("python", "database", "build", "list", "code"),
            "product": ("user story", "user stories", "requirement", "roadmap")}


class KeywordRouter:
    """A deterministic router for planner tests: the department whose keyword occurs first; counts calls."""

    labels = ("finance", "engineering", "product")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def _one(self, q: str, k: int) -> Routing:
        low = q.lower()
        hits = sorted((low.find(w), lab) for lab, ws in KEYWORDS.items() for w in ws if w in low)
        if not hits:
            return Routing((ExpertWeight("finance", 1.0),), True, {"finance": 1.0}, 0.1, reason="no keyword")
        top = hits[0][1]
        return Routing((ExpertWeight(top, 1.0),), False, {top: 1.0}, 0.9)

    def route(self, q: str, *, k: int = 2, min_weight: float = 0.0) -> Routing:
        self.calls.append([q])
        return self._one(q, k)

    def route_batch(self, qs, *, k: int = 2, min_weight: float = 0.0) -> list[Routing]:
        self.calls.append(list(qs))
        return [self._one(q, k) for q in qs]


def _plan(text: str, planner: str = "segment", **kw):
    router = KeywordRouter()
    plan = get_planner(planner).plan(text, PlanContext(router=router, k=2, min_weight=0.05, **kw))
    return plan, router


def _spans(t: str) -> list[str]:
    return [t[a:b] for a, b in _absorb_short(candidate_spans(t), t)]


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("How should we hedge our EUR revenue, and what does engineering need to build for it?",
         ["How should we hedge our EUR revenue", "what does engineering need to build for it?"]),
        ("What is EBITDA? Also, write a user story for the checkout page.",
         ["What is EBITDA?", "write a user story for the checkout page."]),
        ("Two things: 1) how do I reverse a list in Python 2) what is EBITDA?",
         ["how do I reverse a list in Python", "what is EBITDA?"]),
        ("Could you answer these?\n- estimate the cloud budget\n- write the requirements for the login page",
         ["estimate the cloud budget", "write the requirements for the login page"]),
        ("We sell in Europe. How should we hedge that revenue? I need it in Python.",
         ["We sell in Europe. How should we hedge that revenue? I need it in Python."]),
        ("Explain the difference between revenue and profit.", ["Explain the difference between revenue and profit."]),
    ],
)
def test_candidate_parts(text: str, parts: list[str]) -> None:
    assert _spans(text) == parts


def test_cross_department_request_gets_parts_on_different_experts_in_one_router_batch() -> None:
    plan, router = _plan("How should we hedge our EUR revenue, and what database changes does engineering need?")
    assert [p.expert for p in plan.parts] == ["finance", "engineering"]
    assert plan.multi and len(router.calls) == 1  # the whole request and every candidate in one batch
    assert plan.parts[1].text.startswith("What database")  # sentence case for the expert
    q = "How should we hedge our EUR revenue, and what database changes does engineering need?"
    for p in plan.parts:
        a, b = p.span
        assert q[a:b].lower() == p.text.lower()


def test_one_part_request_costs_one_router_call() -> None:
    plan, router = _plan("Write a Python function that reverses a list.")
    assert len(plan.parts) == 1 and not plan.multi and len(router.calls) == 1


def test_neighbours_with_the_same_expert_merge_and_are_rerouted() -> None:
    plan, _ = _plan("What is EBITDA? How do I forecast revenue? Also, write a user story for the dashboard.")
    assert [p.expert for p in plan.parts] == ["finance", "product"]
    assert plan.parts[0].text == "What is EBITDA? How do I forecast revenue?"


def test_abstained_part_is_kept_as_a_base_part() -> None:
    plan, _ = _plan("What is EBITDA? Also, what's the weather like in Paris tomorrow?")
    assert [p.expert for p in plan.parts] == ["finance", None]


def test_max_parts_folds_the_tail() -> None:
    text = "What is EBITDA? How do I reverse a list in Python? Write a user story for login. What is our budget?"
    plan, _ = _plan(text, max_parts=2)
    assert len(plan.parts) == 2 and plan.parts[1].span[1] == len(text)


def test_part_messages_put_the_part_first_and_keep_the_whole_request() -> None:
    q = "What is EBITDA? Also, write a user story for the checkout page."
    plan, _ = _plan(q)
    sys_msg = {"role": "system", "content": "Be brief."}
    second = part_messages([sys_msg, {"role": "user", "content": q}], plan, plan.parts[1])
    assert second[0] == sys_msg
    # the part first, then the rest of the request (the whole request is in the prompt, once)
    assert second[1]["content"] == 'Write a user story for the checkout page.\n\n(The rest of the request: "What is EBITDA? Also")'
    first = part_messages([{"role": "user", "content": q}], plan, plan.parts[0])
    assert first[0]["content"] == 'What is EBITDA?\n\n(The rest of the request: "Also, write a user story for the checkout page.")'
    # a part without a span (an LLM plan's paraphrase) gets the whole request after it
    from dataclasses import replace

    free = replace(plan.parts[1], span=None)
    assert q in part_messages([{"role": "user", "content": q}], plan, free)[0]["content"]


def test_llm_plan_validation() -> None:
    q = "How should we hedge our EUR revenue, and what does engineering need to build for it?"
    experts = ["finance", "engineering", "product"]
    ok = parse_plan('{"parts": [{"text": "How should we hedge our EUR revenue", "expert": "finance"}, '
                    '{"text": "what does engineering need to build for it", "expert": "engineering"}]}',
                    q, experts=experts, max_parts=4)
    assert [p["expert"] for p in ok] == ["finance", "engineering"]
    for bad, why in (("no json here", "no JSON"), ('{"parts": []}', "non-empty"),
                     ('{"parts": [{"text": "hedge", "expert": "legal"}]}', "unknown expert"),
                     ('{"parts": [{"text": "buy bitcoin now"}]}', "not in the request"),
                     ('{"parts": [{"text": "hedge"}]}', "do not cover")):
        with pytest.raises(ValueError, match=why):
            parse_plan(bad, q, experts=experts, max_parts=4)


def test_llm_planner_falls_back_to_segment_and_says_why() -> None:
    q = "How should we hedge our EUR revenue, and what does engineering need to build for it?"
    router = KeywordRouter()
    ctx = PlanContext(router=router, k=2, min_weight=0.0, experts=("finance", "engineering", "product"),
                      generate=lambda prompt: "Sure! Here is a plan: hedge and build.")
    plan = get_planner("llm").plan(q, ctx)
    assert plan.fallback and plan.fallback.startswith("segment (invalid LLM plan")
    assert [p.expert for p in plan.parts] == ["finance", "engineering"]

    def boom(prompt: str) -> str:
        raise TimeoutError("aggregator timed out")

    plan = get_planner("llm").plan(q, PlanContext(router=router, k=2, min_weight=0.0, generate=boom))
    assert "TimeoutError" in plan.fallback and plan.multi


def test_registry() -> None:
    assert {"segment", "llm", "none"} <= set(planner_names())
    with pytest.raises(StrategyError, match="unknown planner"):
        get_planner("astrology")
