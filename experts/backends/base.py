"""The backend interface: generate for a list of (expert, messages) pairs, under a cancel token."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from expertmix.errors import ExpertTimeout, InputError, RequestCancelled
from experts.prompts import Message

__all__ = ["MAX_SEED", "MAX_STOP", "Backend", "CancelToken", "Generation", "GenerationConfig", "LocalWeights"]

#: request limits shared by every door (CLI, Python API, server): work outside them is refused up front
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_SEED = 2**63 - 1


class CancelToken:
    """Cooperative cancellation with an optional deadline. Thread-safe.

    A token is cancelled when :meth:`cancel` is called, when its deadline passes, or when
    its parent is cancelled. Local decoding checks it between steps; remote backends cancel
    their HTTP request; queued work is dropped.

    >>> t = CancelToken(timeout_s=30)
    >>> t.cancelled, t.child(timeout_s=5).remaining() <= 5
    (False, True)
    """

    def __init__(self, *, timeout_s: float | None = None, parent: CancelToken | None = None) -> None:
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise InputError(f"timeout must be a finite number >= 0, got {timeout_s}")
        self.deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self.parent = parent
        self._event = threading.Event()
        self._reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def timed_out(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return self.parent.timed_out if self.parent is not None else False

    @property
    def cancelled(self) -> bool:
        if self._event.is_set() or self.timed_out:
            return True
        return self.parent.cancelled if self.parent is not None else False

    @property
    def reason(self) -> str | None:
        if self._event.is_set():
            return self._reason
        if self.timed_out:
            return "deadline passed"
        return self.parent.reason if self.parent is not None else None

    def remaining(self) -> float | None:
        """Seconds to the nearest deadline (this token's or a parent's); None = no deadline."""
        own = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        up = self.parent.remaining() if self.parent is not None else None
        if own is None:
            return up
        return own if up is None else min(own, up)

    def child(self, *, timeout_s: float | None = None) -> CancelToken:
        """A token cancelled with this one, with its own (tighter) deadline."""
        return CancelToken(timeout_s=timeout_s, parent=self)

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` or until cancelled; True if cancelled."""
        end = time.monotonic() + timeout_s
        while True:
            if self.cancelled:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._event.wait(min(left, 0.05))

    def error(self, *, expert: str | None = None, what: str = "work") -> ExpertTimeout | RequestCancelled:
        """The typed error to raise for a cancelled token: a timeout or an explicit cancellation."""
        if self.timed_out and not self._event.is_set():
            return ExpertTimeout(f"{what} did not finish before its deadline", expert=expert)
        return RequestCancelled(f"{what} cancelled: {self.reason}", expert=expert)

    def raise_if_cancelled(self, *, expert: str | None = None, what: str = "work") -> None:
        if self.cancelled:
            raise self.error(expert=expert, what=what)


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
        def finite(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if finite("temperature", self.temperature) < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < finite("top_p", self.top_p) <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if finite("repetition_penalty", self.repetition_penalty) <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.max_time_s is not None and finite("max_time_s", self.max_time_s) <= 0:
            raise InputError(f"max_time_s must be > 0, got {self.max_time_s}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise InputError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise InputError("stop must be a tuple of strings")
        if len(self.stop) > MAX_STOP:
            raise InputError(f"at most {MAX_STOP} stop strings are allowed, got {len(self.stop)}")
        if sum(len(s) for s in self.stop) > MAX_STOP_CHARS:
            raise InputError(f"stop strings may total at most {MAX_STOP_CHARS} characters")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty")

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
    finish_reason: str = "stop"  # "stop" | "length" | "cancelled"
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """Generates for named experts. ``__base__`` is the base model with no adapter."""

    #: whether the backend holds weights locally (needed by mixture / adapter_merge)
    local_weights: bool

    def expert_names(self) -> list[str]: ...

    def generate(
        self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> list[Generation]:
        """Generate for every (expert, messages) pair; local backends do it in one batch.

        Raises a typed :class:`~expertmix.errors.ExpertError` (never returns half-states);
        a cancelled ``cancel`` stops the work and raises its :meth:`CancelToken.error`."""
        ...

    def stream(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        """Yield text chunks of one expert's answer. Closing the iterator cancels the work."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LocalWeights(Protocol):
    """What ``mixture`` and ``adapter_merge`` need: the adapters' weights in this process."""

    def expert_names(self) -> list[str]: ...

    def generate(
        self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> list[Generation]: ...

    def mixture_generate(
        self, messages: list[Message], weights: Mapping[str, float], config: GenerationConfig, *,
        cancel: CancelToken | None = None,
    ) -> Generation:
        """Decode from p(t) = Σ wᵢ·pᵢ(t) over the named adapters."""
        ...

    def merged_adapter(self, weights: Mapping[str, float]) -> str:
        """Name of an adapter equal to Σ wᵢ·ΔWᵢ (cached); usable in ``generate``."""
        ...
