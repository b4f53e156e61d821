"""The backend interface: generate for a list of (expert, messages) pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from experts.prompts import Message

__all__ = ["Backend", "Generation", "GenerationConfig"]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options. ``temperature == 0`` means greedy (the default)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: >1 discourages repeating tokens (small models loop under greedy decoding); 1.0 = off
    repetition_penalty: float = 1.0
    #: cooperative deadline for local decoding (transformers ``max_time``); set by the fault policy
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One expert's output."""

    expert: str
    text: str
    tokens: int
    latency_s: float
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length"
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Generates for named experts. ``__base__`` is the base model with no adapter."""

    #: whether the backend holds weights locally (needed by mixture / adapter_merge)
    local_weights: bool

    def expert_names(self) -> list[str]: ...

    def generate(self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig) -> list[Generation]:
        """Generate for every (expert, messages) pair; local backends do it in one batch."""
        ...

    def stream(self, expert: str, messages: list[Message], config: GenerationConfig) -> Iterator[str]:
        """Yield text chunks of one expert's answer."""
        ...

    def close(self) -> None: ...
