"""``adapter_merge``: the selected adapters merged in weight space at the routed weights, then one generation.

peft ``add_weighted_adapter(combination_type="cat")`` gives exactly Σ wᵢ·ΔWᵢ. Merges are
cached per weight vector rounded to 0.01 in a bounded LRU, so a repeated routing costs
the same as a single expert. Cost: one merge (first time) + one generation. Needs local weights.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import failed_result, require_local
from orchestrator.trace import Contribution

__all__ = ["AdapterMerge"]


@register_strategy
class AdapterMerge:
    name = "adapter_merge"
    needs_local_weights = True
    cost = "one weighted adapter merge per new weight vector (LRU-cached) + one generation"

    def _merged(self, ctx: MergeContext) -> str:
        require_local(ctx, self.name)
        assert ctx.local is not None
        key = ctx.local.merged.key(dict(ctx.weights))
        if len(key) == 1:  # one expert carries (almost) all the weight: no merge needed
            return key[0][0]
        return ctx.local.merged.get(dict(ctx.weights))

    def run(self, ctx: MergeContext) -> MergeResult:
        t0 = time.perf_counter()
        name = self._merged(ctx)
        merge_s = time.perf_counter() - t0
        try:
            assert ctx.local is not None
            g = ctx.local.generate([(name, ctx.messages)], ctx.config)[0]
        except Exception as exc:  # noqa: BLE001 - fault policy
            return failed_result(ctx, exc, t0)
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
        )

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        t0 = time.perf_counter()
        name = self._merged(ctx)
        merge_s = time.perf_counter() - t0
        assert ctx.local is not None
        chunks: list[str] = []
        try:
            for c in ctx.local.stream(name, ctx.messages, ctx.config):
                chunks.append(c)
                yield c
        except Exception as exc:  # noqa: BLE001
            if chunks:
                raise
            yield failed_result(ctx, exc, t0)
            return
        elapsed = time.perf_counter() - t0 - merge_s
        yield MergeResult(
            text="".join(chunks).strip(),
            contributions=[Contribution(expert=n, weight=w, latency_s=round(elapsed, 4)) for n, w in ctx.weights],
            experts_s=elapsed,
            merge_s=merge_s,
            used_weights=dict(ctx.weights),
        )
