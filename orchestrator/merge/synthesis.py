"""``synthesis`` (default): experts answer in one mixed-adapter batch, then an aggregator writes one answer.

Mixture-of-Agents style: the aggregator (the base model, or an expert named in config)
sees the question and every expert's answer with its name and weight. Cost: one
batched generation of k rows + one aggregator generation over a longer prompt.
With a single surviving expert the aggregator is skipped and its answer returned.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import run_weighted

__all__ = ["Synthesis", "build_synthesis_prompt"]


def build_synthesis_prompt(ctx: MergeContext, survivors: list[tuple[str, float]], texts: dict[str, str]) -> str:
    parts = [
        ctx.settings.contribution_template.format(
            expert=name, weight=f"{w:.2f}", weight_pct=f"{100 * w:.0f}%", text=texts[name].strip()
        )
        for name, w in survivors
    ]
    return ctx.settings.synthesis_template.format(question=ctx.question.strip(), contributions="\n\n".join(parts))


@register_strategy
class Synthesis:
    name = "synthesis"
    needs_local_weights = False
    cost = "one mixed-adapter batch of k expert answers + one aggregator generation"

    def _prepare(self, ctx: MergeContext) -> tuple[MergeResult, list[dict[str, str]] | None]:
        outcomes, contributions, survivors, elapsed = run_weighted(ctx)
        res = MergeResult(text="", contributions=contributions, experts_s=elapsed, used_weights=dict(survivors))
        if not survivors:
            res.all_failed = True
            return res, None
        gens = {o.expert: o.generation for o in outcomes if o.ok and o.generation is not None}
        res.tokens = sum(g.tokens for g in gens.values())
        res.prompt_tokens = max((g.prompt_tokens for g in gens.values()), default=0)
        if len(survivors) == 1:
            res.text = gens[survivors[0][0]].text
            return res, None
        prompt = build_synthesis_prompt(ctx, survivors, {n: g.text for n, g in gens.items()})
        return res, [{"role": "user", "content": prompt}]

    def run(self, ctx: MergeContext) -> MergeResult:
        res, agg_messages = self._prepare(ctx)
        if agg_messages is None:
            return res
        t0 = time.perf_counter()
        out = ctx.pool.run([(ctx.settings.aggregator, agg_messages)], ctx.config)[0]
        res.merge_s = time.perf_counter() - t0
        if out.ok and out.generation is not None and out.generation.text.strip():
            res.text = out.generation.text
            res.tokens += out.generation.tokens
        else:  # aggregator failed: the highest-weight expert's answer stands
            top = next(iter(res.used_weights))
            res.text = next(c.text for c in res.contributions if c.expert == top)
        return res

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        res, agg_messages = self._prepare(ctx)
        if agg_messages is None:
            if res.text:
                yield res.text
            yield res
            return
        t0 = time.perf_counter()
        backend = ctx.pool.backend_for(ctx.settings.aggregator)
        chunks: list[str] = []
        try:
            for chunk in backend.stream(ctx.settings.aggregator, agg_messages, ctx.config):
                chunks.append(chunk)
                yield chunk
        except Exception:  # noqa: BLE001 - aggregator failure: fall back to the top expert
            if not chunks:
                top = next(iter(res.used_weights))
                text = next(c.text for c in res.contributions if c.expert == top)
                chunks = [text]
                yield text
        res.merge_s = time.perf_counter() - t0
        res.text = "".join(chunks).strip()
        yield res
