"""``mixture``: token-level p(t) = Σ wᵢ·pᵢ(t) across the selected adapters.

All selected adapters run in one forward pass per decoding step (a batch of k rows of
the same prompt, KV-cached); greedy or sampled from the mixture. Cost: one generation
with k rows. Needs local adapter weights. Per-expert texts do not exist here, so each
contribution carries its weight and the shared token count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from expertmix.errors import StrategyError
from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import failed_result, require_local, whole
from orchestrator.trace import Contribution

__all__ = ["Mixture"]


@register_strategy
class Mixture:
    name = "mixture"
    needs_local_weights = True
    uses_plan = False
    cost = "one generation over k rows (one forward pass per token for all k adapters)"

    def run(self, ctx: MergeContext) -> MergeResult:
        require_local(ctx, self.name)
        local = ctx.pool.local
        if local is None:
            raise StrategyError("mixture needs local adapter weights")
        t0 = time.perf_counter()
        weights = dict(ctx.weights)
        out = ctx.pool.run_local(
            "mixture",
            lambda tok: local.mixture_generate(ctx.messages, weights, ctx.config, cancel=tok),
            experts=list(weights),
            cancel=ctx.cancel,
        )
        if out.generation is None:
            return failed_result(ctx, out.exception or RuntimeError(out.error or "mixture failed"), t0)
        g = out.generation
        elapsed = time.perf_counter() - t0
        return MergeResult(
            text=g.text,
            contributions=[
                Contribution(expert=n, weight=w, tokens=g.tokens, latency_s=round(elapsed, 4)) for n, w in ctx.weights
            ],
            experts_s=elapsed,
            tokens=g.tokens,
            prompt_tokens=g.prompt_tokens,
            used_weights=dict(ctx.weights),
            finish_reason=g.finish_reason,
        )

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        return whole(self.run(ctx))  # the text exists only once the whole result does
