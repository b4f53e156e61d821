"""``decompose``: every part of the plan goes to its own top expert; the answers are composed.

All parts of all experts run in **one** call of the execution layer (one mixed-adapter batch
locally, concurrent requests remotely); each expert sees its part first and the rest of the
request as context (:func:`~orchestrator.planning.part_messages`). A part that abstained goes to the
base model. A failed part goes to its next routed expert, then to the base. Composition:
``sections`` (default; each answer under a heading made of the part's own words, no LLM pass)
or ``synthesis`` (the aggregator over the parts' answers, with the meta-answer guard).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from experts.registry import BASE_EXPERT
from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import finish_of, whole
from orchestrator.merge.compose import sections
from orchestrator.merge.synthesis import synthesize
from orchestrator.planning import Plan, part_messages
from orchestrator.trace import Contribution, PartResult

__all__ = ["Decompose", "run_parts"]


def _candidates(part_experts: list[str], abstained: bool) -> list[str]:
    order = [] if abstained else list(part_experts)
    return [*order, BASE_EXPERT] if BASE_EXPERT not in order else order


def run_parts(ctx: MergeContext, plan: Plan) -> MergeResult:
    """Answer every part (one batch per round: first choices, then the fallbacks of failed parts)."""
    t0 = time.perf_counter()
    queues = [_candidates([e.name for e in p.routing.experts], p.routing.abstained) for p in plan.parts]
    msgs = [part_messages(ctx.messages, plan, p) for p in plan.parts]
    results: list[PartResult | None] = [None] * len(plan.parts)
    errors: list[list[str]] = [[] for _ in plan.parts]
    contributions: list[Contribution] = []
    todo = list(range(len(plan.parts)))
    while todo:
        reqs = [(queues[i][0], msgs[i]) for i in todo]
        outs = ctx.pool.run(reqs, ctx.config, cancel=ctx.cancel)
        nxt = []
        for i, out in zip(todo, outs):
            part = plan.parts[i]
            weight = next((e.weight for e in part.routing.experts if e.name == out.expert), 1.0)
            contributions.append(out.contribution(weight))
            g = out.generation
            if out.ok and g is not None and g.text.strip():
                results[i] = PartResult(
                    text=part.text, span=part.span, routing=part.routing, answered_by=out.expert, answer=g.text,
                    tokens=g.tokens, latency_s=round(out.latency_s, 4), finish_reason=g.finish_reason,
                    fallback="; ".join(errors[i]) or None,
                )
                continue
            errors[i].append(f"{out.expert}: {out.error or 'empty answer'}")
            queues[i].pop(0)
            if queues[i] and not (ctx.cancel is not None and ctx.cancel.cancelled):
                nxt.append(i)
            else:
                results[i] = PartResult(text=part.text, span=part.span, routing=part.routing, answered_by=None,
                                        answer="", fallback="; ".join(errors[i]))
        todo = nxt
    done = [r for r in results if r is not None]
    ok = [r for r in done if r.answered_by]
    used: dict[str, float] = {}
    for r in ok:
        assert r.answered_by is not None
        used[r.answered_by] = used.get(r.answered_by, 0.0) + 1.0 / len(ok)
    return MergeResult(
        text="",
        contributions=contributions,
        experts_s=time.perf_counter() - t0,
        tokens=sum(r.tokens for r in ok),
        prompt_tokens=0,
        used_weights=used,
        all_failed=not ok,
        finish_reason=finish_of(*(r.finish_reason for r in ok)),
        parts=done,
    )


@register_strategy
class Decompose:
    name = "decompose"
    needs_local_weights = False
    uses_plan = True
    cost = "one batch with every part on its own expert (+ one aggregator pass with compose = synthesis)"

    def run(self, ctx: MergeContext) -> MergeResult:
        assert ctx.plan is not None, "decompose needs a plan"
        res = run_parts(ctx, ctx.plan)
        res.chosen = self.name
        answered = [(p.text, p.answer) for p in res.parts if p.answered_by]
        if res.all_failed:
            return res
        if len(answered) == 1:
            res.text = answered[0][1]
        elif ctx.settings.compose == "synthesis":
            notes = "\n\n".join(f"{p.text}\n{p.answer.strip()}" for p in res.parts if p.answered_by)
            prompt = ctx.settings.synthesis_template.format(question=ctx.question.strip(), contributions=notes)
            synthesize(ctx, prompt, answered, res)
        else:
            res.text = sections(answered)
        return res

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        return whole(self.run(ctx))  # the text exists only once the whole result does
