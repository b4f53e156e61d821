"""The merge-strategy interface: weighted experts + a question → one answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from experts.backends.base import GenerationConfig
from experts.prompts import Message

if TYPE_CHECKING:
    from collections.abc import Iterator

    from experts.backends.local import LocalBackend
    from orchestrator.config import OrchestratorSettings
    from orchestrator.execution import ExpertPool
    from orchestrator.trace import Contribution

__all__ = ["MergeContext", "MergeResult", "MergeStrategy"]


@dataclass
class MergeContext:
    """Everything a strategy needs. ``weights`` are normalized and sorted, highest first."""

    messages: list[Message]
    question: str
    weights: list[tuple[str, float]]
    config: GenerationConfig
    settings: OrchestratorSettings
    pool: ExpertPool
    local: LocalBackend | None


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


class MergeStrategy(Protocol):
    """Turns weighted experts into one answer. ``needs_local_weights``: only on the local backend."""

    name: str
    needs_local_weights: bool
    cost: str

    def run(self, ctx: MergeContext) -> MergeResult: ...

    def stream(self, ctx: MergeContext) -> Iterator[str | MergeResult]:
        """Yield text chunks, then the final :class:`MergeResult`."""
        ...
