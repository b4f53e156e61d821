"""``none``: the whole request is one part (one router call)."""

from __future__ import annotations

from orchestrator.planning.base import Part, Plan, PlanContext

__all__ = ["Single"]


class Single:
    name = "none"

    def plan(self, question: str, ctx: PlanContext) -> Plan:
        text = question.strip()
        routing = ctx.router.route(text, k=ctx.k, min_weight=ctx.min_weight)
        return Plan((Part(text, routing, (0, len(text))),), self.name, routing)
