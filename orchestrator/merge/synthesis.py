"""``synthesis``: experts answer in one mixed-adapter batch, then an aggregator writes one answer.

Mixture-of-Agents style: the aggregator (the base model, or an expert named in config) sees
the question and the experts' drafts as notes. Cost: one batched generation of k rows + one
aggregator generation over a longer prompt. With a single surviving expert the aggregator is
skipped. **Guard**: an aggregator answer that talks about the experts or their answers instead
of answering (see :func:`~orchestrator.merge.compose.is_meta`) is replaced by the drafts as
``sections``; the answer's ``notes`` say so ("synthesis_guard") and ``/metrics`` counts it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.merge.common import finish_of, run_weighted, whole
from orchestrator.merge.compose import is_meta, sections

__all__ = ["GUARD_NOTE", "Synthesis", "build_synthesis_prompt", "synthesize"]

GUARD_NOTE = "synthesis_guard"


def build_synthesis_prompt(ctx: MergeContext, survivors: Sequence[tuple[str, float]], texts: dict[str, str],
                           *, question: str | None = None) -> str:
    parts = [
        ctx.settings.contribution_template.format(
            expert=name, weight=f"{w:.2f}", weight_pct=f"{100 * w:.0f}%", text=texts[name].strip()
        )
        for name, w in survivors
    ]
    q = (question if question is not None else ctx.question).strip()
    return ctx.settings.synthesis_template.format(question=q, contributions="\n\n".join(parts))


def synthesize(ctx: MergeContext, prompt: str, fallback: list[tuple[str, str]], res: MergeResult) -> None:
    """Run the aggregator on ``prompt``; on failure or a meta-answer use ``sections(fallback)``. Fills ``res``."""
    t0 = time.perf_counter()
    out = ctx.pool.run([(ctx.settings.aggregator, [{"role": "user", "content": prompt}])], ctx.config,
                       cancel=ctx.cancel)[0]
    res.merge_s += time.perf_counter() - t0
    g = out.generation
    if out.ok and g is not None and g.text.strip() and not is_meta(g.text):
        res.text = g.text
        res.tokens += g.tokens
        res.finish_reason = finish_of(res.finish_reason, g.finish_reason)
        return
    if out.ok and g is not None and g.text.strip():
        res.notes.append(GUARD_NOTE)
    else:
        res.notes.append(f"aggregator failed: {out.error or 'empty answer'}")
    res.text = sections(fallback)


@register_strategy
class Synthesis:
    name = "synthesis"
    needs_local_weights = False
    uses_plan = False
    cost = "one mixed-adapter batch of k expert answers + one aggregator generation"

    def run(self, ctx: MergeContext) -> MergeResult:
        outcomes, contributions, survivors, elapsed = run_weighted(ctx)
        res = MergeResult(text="", contributions=contributions, experts_s=elapsed, used_weights=dict(survivors))
        if not survivors:
            res.all_failed = True
            return res
        gens = {o.expert: o.generation for o in outcomes if o.ok and o.generation is not None}
        res.tokens = sum(g.tokens for g in gens.values())
        res.prompt_tokens = max((g.prompt_tokens for g in gens.values()), default=0)
        res.finish_reason = finish_of(*(g.finish_reason for g in gens.values()))
        if len(survivors) == 1:
            res.text = gens[survivors[0][0]].text
            return res
        texts = {n: g.text for n, g in gens.items()}
        fallback = [(n.capitalize(), texts[n]) for n, _ in survivors]
        synthesize(ctx, build_synthesis_prompt(ctx, survivors, texts), fallback, res)
        return res

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        return whole(self.run(ctx))  # the text exists only once the whole result does
