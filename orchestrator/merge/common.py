"""Helpers shared by strategies: run the weighted experts, drop failures, renormalize."""

from __future__ import annotations

import time
from collections.abc import Iterator

from expertmix.errors import StrategyError
from orchestrator.execution import Outcome
from orchestrator.merge.base import MergeContext, MergeResult
from orchestrator.trace import Contribution

__all__ = ["failed_result", "finish_of", "renormalize", "require_local", "run_weighted", "whole"]


def finish_of(*reasons: str) -> str:
    """"length" if any generation behind an answer was cut by its token limit."""
    return "length" if "length" in reasons else "stop"


def renormalize(weights: list[tuple[str, float]]) -> list[tuple[str, float]]:
    total = sum(w for _, w in weights)
    if total <= 0:
        return [(n, 1.0 / len(weights)) for n, _ in weights] if weights else []
    return [(n, w / total) for n, w in weights]


def run_weighted(ctx: MergeContext) -> tuple[list[Outcome], list[Contribution], list[tuple[str, float]], float]:
    """Run every weighted expert once (one mixed batch per backend).

    Returns outcomes, contributions (with the routed weights), the surviving experts with
    renormalized weights (highest first) and the wall time.
    """
    t0 = time.perf_counter()
    outcomes = ctx.pool.run([(n, ctx.messages) for n, _ in ctx.weights], ctx.config, cancel=ctx.cancel)
    elapsed = time.perf_counter() - t0
    routed = dict(ctx.weights)
    contributions = [o.contribution(routed[o.expert]) for o in outcomes]
    survivors = renormalize([(o.expert, routed[o.expert]) for o in outcomes if o.ok])
    return outcomes, contributions, survivors, elapsed


def whole(res: MergeResult) -> Iterator[str | MergeResult]:
    """``stream`` for a strategy that only has its text at the end: the text in one chunk, then the result."""
    if res.text:
        yield res.text
    yield res


def require_local(ctx: MergeContext, strategy: str) -> None:
    """mixture and adapter_merge need the adapters' weights in this process."""
    local = ctx.pool.local
    names = [n for n, _ in ctx.weights]
    remote = [n for n in names if local is None or n not in local.expert_names()]
    if remote:
        raise StrategyError(
            f"strategy {strategy!r} needs local adapter weights, but {', '.join(remote)} "
            "run on a remote (OpenAI-compatible) backend; use 'synthesis' or 'top1' with remote experts"
        )


def failed_result(ctx: MergeContext, exc: BaseException, t0: float) -> MergeResult:
    """Every weighted expert failed with ``exc``: the core then falls back to the base model."""
    err = f"{type(exc).__name__}: {exc}"
    return MergeResult(
        text="",
        contributions=[Contribution(expert=n, weight=w, error=err) for n, w in ctx.weights],
        experts_s=time.perf_counter() - t0,
        all_failed=True,
    )
