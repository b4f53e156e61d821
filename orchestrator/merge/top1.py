"""``top1``: only the highest-weight expert answers (the next one if it fails). Cost: one generation."""

from __future__ import annotations

import time
from collections.abc import Iterator

from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.trace import Contribution

__all__ = ["Top1"]


@register_strategy
class Top1:
    name = "top1"
    needs_local_weights = False
    cost = "one generation by the highest-weight expert"

    def run(self, ctx: MergeContext) -> MergeResult:
        contributions: list[Contribution] = []
        t0 = time.perf_counter()
        for name, w in ctx.weights:
            out = ctx.pool.run([(name, ctx.messages)], ctx.config)[0]
            contributions.append(out.contribution(w))
            if out.ok and out.generation is not None:
                g = out.generation
                return MergeResult(
                    text=g.text,
                    contributions=contributions,
                    experts_s=time.perf_counter() - t0,
                    tokens=g.tokens,
                    prompt_tokens=g.prompt_tokens,
                    used_weights={name: 1.0},
                )
        return MergeResult(text="", contributions=contributions, experts_s=time.perf_counter() - t0, all_failed=True)

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        name, w = ctx.weights[0]
        t0 = time.perf_counter()
        chunks: list[str] = []
        try:
            for chunk in ctx.pool.backend_for(name).stream(name, ctx.messages, ctx.config):
                chunks.append(chunk)
                yield chunk
        except Exception as exc:  # noqa: BLE001 - fault policy: fall back to the non-streamed path
            if chunks:
                raise
            res = self.run(MergeContext(**{**ctx.__dict__, "weights": ctx.weights[1:]})) if len(ctx.weights) > 1 else None
            failed = Contribution(expert=name, weight=w, error=f"{type(exc).__name__}: {exc}")
            if res is None:
                yield MergeResult(text="", contributions=[failed], all_failed=True)
                return
            res.contributions.insert(0, failed)
            if res.text:
                yield res.text
            yield res
            return
        text = "".join(chunks).strip()
        yield MergeResult(
            text=text,
            contributions=[Contribution(expert=name, weight=w, text=text, latency_s=round(time.perf_counter() - t0, 4))],
            experts_s=time.perf_counter() - t0,
            used_weights={name: 1.0},
        )
