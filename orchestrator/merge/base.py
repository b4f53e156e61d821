"""The merge-strategy interface: weighted experts + a question → one answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from experts.backends.base import GenerationConfig
from experts.prompts import Message

if TYPE_CHECKING:
    from collections.abc import Iterator

    from experts.backends.base import CancelToken
    from orchestrator.config import OrchestratorSettings
    from orchestrator.execution import ExpertPool
    from orchestrator.planning import Plan
    from orchestrator.trace import Contribution, PartResult

__all__ = ["MergeContext", "MergeResult", "MergeStrategy"]


@dataclass
class MergeContext:
    """Everything a strategy needs. ``weights`` are normalized and sorted, highest first.

    Strategies generate only through ``pool`` (the execution layer: deadlines, cancellation,
    error policy); local-weights strategies use ``pool.local`` (a typed interface)."""

    messages: list[Message]
    question: str
    weights: list[tuple[str, float]]
    config: GenerationConfig
    settings: OrchestratorSettings
    pool: ExpertPool
    plan: Plan | None = None
    cancel: CancelToken | None = None


@dataclass
class MergeResult:
    text: str
    contributions: list[Contribution]
    experts_s: float = 0.0
    merge_s: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    #: weights actually used, after failed experts were dropped (renormalized)
    used_weights: dict[str, float] = field(default_factory=dict)
    #: set when the strategy could not use any expert (the core then falls back to the base)
    all_failed: bool = False
    #: "length" when any generation behind the answer hit its token limit
    finish_reason: str = "stop"
    #: per-part results of a decomposed answer
    parts: list[PartResult] = field(default_factory=list)
    #: the strategy that actually ran (``auto`` picks one) and what it fell back to, if anything
    chosen: str | None = None
    notes: list[str] = field(default_factory=list)


class MergeStrategy(Protocol):
    """Turns weighted experts into one answer. ``needs_local_weights``: only on the local backend."""

    name: str
    needs_local_weights: bool
    #: whether the strategy reads ``ctx.plan`` (the core then runs the configured planner)
    uses_plan: bool
    cost: str

    def run(self, ctx: MergeContext) -> MergeResult: ...

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        """Yield text chunks, then the final :class:`MergeResult`."""
        ...
