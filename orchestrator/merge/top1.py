"""``top1``: only the highest-weight expert answers (the next one if it fails). Cost: one generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

from orchestrator.merge import register_strategy
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.trace import Contribution

__all__ = ["Top1"]


@register_strategy
class Top1:
    name = "top1"
    needs_local_weights = False
    uses_plan = False
    cost = "one generation by the highest-weight expert"

    def run(self, ctx: MergeContext) -> MergeResult:
        contributions: list[Contribution] = []
        t0 = time.perf_counter()
        for name, w in ctx.weights:
            out = ctx.pool.run([(name, ctx.messages)], ctx.config, cancel=ctx.cancel)[0]
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
                    finish_reason=g.finish_reason,
                )
            if ctx.cancel is not None and ctx.cancel.cancelled:
                break
        return MergeResult(text="", contributions=contributions, experts_s=time.perf_counter() - t0, all_failed=True)

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        name, w = ctx.weights[0]
        t0 = time.perf_counter()
        chunks: list[str] = []
        try:
            for chunk in ctx.pool.stream(name, ctx.messages, ctx.config, cancel=ctx.cancel):
                chunks.append(chunk)
                yield chunk
        except Exception as exc:  # noqa: BLE001 - fault policy: fall back to the non-streamed path
            failed = Contribution(expert=name, weight=w, error=f"{type(exc).__name__}: {exc}")
            if chunks or len(ctx.weights) == 1 or (ctx.cancel is not None and ctx.cancel.cancelled):
                # part of the answer was sent: it stands, cut short, with the error in the trace
                text = "".join(chunks).strip()
                yield MergeResult(text=text, contributions=[failed], experts_s=time.perf_counter() - t0,
                                  used_weights={name: 1.0} if text else {}, all_failed=not text, finish_reason="length")
                return
            res = self.run(replace(ctx, weights=ctx.weights[1:]))
            res.contributions.insert(0, failed)
            if res.text:
                yield res.text
            yield res
            return
        text = "".join(chunks).strip()
        if not text and len(ctx.weights) > 1:  # an empty answer is a failure: the next expert answers
            res = self.run(replace(ctx, weights=ctx.weights[1:]))
            res.contributions.insert(0, Contribution(expert=name, weight=w, error="empty answer"))
            if res.text:
                yield res.text
            yield res
            return
        tokens = len(chunks)
        yield MergeResult(
            text=text,
            contributions=[Contribution(expert=name, weight=w, text=text, tokens=tokens,
                                        latency_s=round(time.perf_counter() - t0, 4))],
            experts_s=time.perf_counter() - t0,
            tokens=tokens,
            used_weights={name: 1.0},
            finish_reason="length" if tokens >= ctx.config.max_new_tokens else "stop",
        )
