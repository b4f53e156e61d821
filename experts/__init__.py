"""Experts: base model resolution, the expert registry, backends (local peft, OpenAI-compatible) and LoRA training."""

from __future__ import annotations

from experts.backends.base import Backend, Generation, GenerationConfig
from experts.registry import BASE_EXPERT, BaseSpec, ExpertRegistry, ExpertSpec

__all__ = ["BASE_EXPERT", "Backend", "BaseSpec", "ExpertRegistry", "ExpertSpec", "Generation", "GenerationConfig"]
