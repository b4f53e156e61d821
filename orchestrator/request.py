"""One request's options, validated once, and the one place decoding settings are built.

Every door — ``Orchestrator.ask``/``stream``/``generate``, the CLI, the HTTP server, remote
and local backends — turns the caller's overrides plus the config's defaults into a
:class:`~experts.backends.base.GenerationConfig` here, so the same request decodes the same
way whichever door it came in by.

>>> from orchestrator.config import OrchestratorSettings
>>> opts = RequestOptions(max_new_tokens=32)
>>> opts.generation(OrchestratorSettings()).repetition_penalty   # the config's default applies
1.1
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from expertmix.errors import InputError
from experts.backends.base import GenerationConfig

if TYPE_CHECKING:
    from orchestrator.config import OrchestratorSettings

__all__ = ["RequestOptions"]


@dataclass(frozen=True)
class RequestOptions:
    """Per-request overrides; ``None`` means "the config's value"."""

    k: int | None = None
    strategy: str | None = None
    planner: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] | str | None = None
    min_weight: float | None = None
    #: vLLM's sampling extension (>1 discourages repeats); None = the config's ``repetition_penalty``
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 16):
            raise InputError(f"k must be an integer in [1, 16], got {self.k!r}")
        if self.min_weight is not None:
            mw = self.min_weight
            if isinstance(mw, bool) or not isinstance(mw, (int, float)) or not math.isfinite(mw) or not 0 <= mw < 1:
                raise InputError(f"min_weight must be a number in [0, 1), got {mw!r}")
        for name in ("strategy", "planner"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InputError(f"{name} must be a non-empty string, got {v!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    def generation(self, settings: OrchestratorSettings) -> GenerationConfig:
        """The decoding settings of this request: overrides, else the config's defaults (validated)."""
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else default_max_new_tokens(settings),
            temperature=self.temperature if self.temperature is not None else settings.temperature,
            top_p=self.top_p if self.top_p is not None else 1.0,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            repetition_penalty=(self.repetition_penalty if self.repetition_penalty is not None
                                else settings.repetition_penalty),
        )

    def merged(self, **overrides: Any) -> RequestOptions:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def default_max_new_tokens(settings: OrchestratorSettings) -> int:
    """``EXPERTMIX_MAX_NEW_TOKENS`` when set (every door, as the CLI's option default), else the config's."""
    env = os.environ.get("EXPERTMIX_MAX_NEW_TOKENS", "").strip()
    if not env:
        return settings.max_new_tokens
    if not env.isdigit() or int(env) < 1:
        raise InputError(f"EXPERTMIX_MAX_NEW_TOKENS must be a whole number >= 1, got {env!r}")
    return int(env)
