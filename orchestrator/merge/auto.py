"""``auto``: pick the strategy per request from its plan.

- several parts on different experts → ``decompose``;
- one part → ``top1``, or ``adapter_merge`` when the second expert's weight is at least
  ``CLOSE`` and the adapters are local (a genuinely mixed single question).

The thresholds come from ``bench/quality.py`` (see docs/benchmarks.md); ``Answer.strategy``
stays ``auto`` and the trace records the strategy that ran.
"""

from __future__ import annotations

from collections.abc import Iterator

from orchestrator.merge import get_strategy, register_strategy
from orchestrator.merge.base import MergeContext, MergeResult, MergeStrategy

__all__ = ["CLOSE", "Auto", "choose"]

#: second expert's normalized weight from which a single-part request merges adapters
CLOSE = 0.35


def choose(ctx: MergeContext) -> MergeStrategy:
    if ctx.plan is not None and ctx.plan.multi:
        return get_strategy("decompose")
    local = ctx.pool.local
    if (
        len(ctx.weights) > 1
        and ctx.weights[1][1] >= CLOSE
        and local is not None
        and all(n in local.expert_names() for n, _ in ctx.weights)
    ):
        return get_strategy("adapter_merge")
    return get_strategy("top1")


@register_strategy
class Auto:
    name = "auto"
    needs_local_weights = False
    uses_plan = True
    cost = "decompose for multi-part requests, else top1 (adapter_merge when the top-2 weights are close)"

    def run(self, ctx: MergeContext) -> MergeResult:
        impl = choose(ctx)
        res = impl.run(ctx)
        res.chosen = impl.name
        return res

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        impl = choose(ctx)
        for item in impl.stream(ctx):
            if isinstance(item, MergeResult):
                item.chosen = impl.name
            yield item
