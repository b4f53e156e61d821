"""``adapter_merge``: the selected adapters merged in weight space at the routed weights, then one generation.

peft ``add_weighted_adapter(combination_type="cat")`` gives exactly Σ wᵢ·ΔWᵢ. Merges are
cached per weight vector rounded to 0.01 in a bounded LRU, so a repeated routing costs
the same as a single expert. Cost: one merge (first time) + one generation. Needs local weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from expertmix.errors import StrategyError
from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import failed_result, require_local, whole
from orchestrator.trace import Contribution

__all__ = ["AdapterMerge"]


@register_strategy
class AdapterMerge:
    name = "adapter_merge"
    needs_local_weights = True
    uses_plan = False
    cost = "one weighted adapter merge per new weight vector (LRU-cached) + one generation"

    def run(self, ctx: MergeContext) -> MergeResult:
        require_local(ctx, self.name)
        local = ctx.pool.local
        if local is None:
            raise StrategyError("adapter_merge needs local adapter weights")
        t0 = time.perf_counter()
        try:
            name = local.merged_adapter(dict(ctx.weights))
        except Exception as exc:  # noqa: BLE001 - fault policy
            return failed_result(ctx, exc, t0)
        merge_s = time.perf_counter() - t0
        out = ctx.pool.run_local(
            "adapter_merge",
            lambda tok: local.generate([(name, ctx.messages)], ctx.config, cancel=tok)[0],
            experts=[n for n, _ in ctx.weights],
            cancel=ctx.cancel,
        )
        if out.generation is None:
            return failed_result(ctx, out.exception or RuntimeError(out.error or "generation failed"), t0)
        g = out.generation
        elapsed = time.perf_counter() - t0 - merge_s
        return MergeResult(
            text=g.text,
            contributions=[
                Contribution(expert=n, weight=w, tokens=g.tokens, latency_s=round(elapsed, 4)) for n, w in ctx.weights
            ],
            experts_s=elapsed,
            merge_s=merge_s,
            tokens=g.tokens,
            prompt_tokens=g.prompt_tokens,
            used_weights=dict(ctx.weights),
            finish_reason=g.finish_reason,
        )

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        return whole(self.run(ctx))  # the text exists only once the whole result does
