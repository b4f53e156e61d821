"""Expert backends: run named experts on a prompt. See :class:`experts.backends.base.Backend`."""

from __future__ import annotations

from experts.backends.base import Backend, Generation, GenerationConfig

__all__ = ["Backend", "Generation", "GenerationConfig"]
