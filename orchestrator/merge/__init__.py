"""Merge strategies, in a plain registry selectable by name.

| name            | what it does                                                    | cost (k experts, n tokens)              |
|-----------------|-----------------------------------------------------------------|-----------------------------------------|
| ``synthesis``   | experts answer in one mixed batch; an aggregator rewrites them  | 1 batched generation + 1 aggregator run |
| ``mixture``     | token-level p(t) = Σ wᵢ·pᵢ(t), one forward pass per step        | 1 generation, batch of k rows           |
| ``adapter_merge``| adapters merged in weight space at the routed weights (cached) | merge once per weight vector, then 1 gen|
| ``top1``        | only the highest-weight expert answers                          | 1 generation                            |
| ``decompose``   | each part of the plan on its own top expert, answers as sections | 1 batched generation (all parts)       |
| ``auto``        | decompose for multi-part requests, else top1 / adapter_merge     | as the chosen strategy                 |
"""

from __future__ import annotations

from typing import TypeVar

from expertmix.errors import StrategyError
from orchestrator.merge.base import MergeContext, MergeResult, MergeStrategy

__all__ = [
    "STRATEGIES",
    "MergeContext",
    "MergeResult",
    "MergeStrategy",
    "get_strategy",
    "register_strategy",
    "strategy_names",
]

STRATEGIES: dict[str, type[MergeStrategy]] = {}
_S = TypeVar("_S", bound=MergeStrategy)


def register_strategy(cls: type[_S]) -> type[_S]:
    """Class decorator: add a strategy under ``cls.name``; duplicates are refused."""
    name = cls.name
    if name in STRATEGIES:
        raise StrategyError(f"merge strategy {name!r} is already registered")
    STRATEGIES[name] = cls
    return cls


def strategy_names() -> list[str]:
    _load_builtins()
    return sorted(STRATEGIES)


def get_strategy(name: str) -> MergeStrategy:
    _load_builtins()
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise StrategyError(f"unknown merge strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}") from None


def _load_builtins() -> None:
    from orchestrator.merge import adapter_merge, auto, decompose, mixture, synthesis, top1  # noqa: F401
