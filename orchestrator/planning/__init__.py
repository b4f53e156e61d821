"""Planners: split a request into parts, each routed on its own, before the experts run.

| name      | what it does                                                                   | cost                      |
|-----------|--------------------------------------------------------------------------------|---------------------------|
| ``segment``| sentences / list items / coordinated clauses, routed in one batch, neighbours with the same expert merged | one router batch |
| ``llm``   | the aggregator writes a JSON plan (validated); invalid → ``segment``, said in the trace | one short generation + one router batch |
| ``none``  | the whole request is one part                                                   | one router call           |
"""

from __future__ import annotations

from typing import TypeVar

from expertmix.errors import StrategyError
from orchestrator.planning.base import Part, Plan, PlanContext, Planner, part_messages

__all__ = ["PLANNERS", "Part", "Plan", "PlanContext", "Planner", "get_planner", "part_messages", "register_planner"]

PLANNERS: dict[str, type[Planner]] = {}
_P = TypeVar("_P", bound=Planner)


def register_planner(cls: type[_P]) -> type[_P]:
    """Class decorator: add a planner under ``cls.name``; duplicates are refused."""
    name = cls.name
    if name in PLANNERS:
        raise StrategyError(f"planner {name!r} is already registered")
    PLANNERS[name] = cls
    return cls


def _load_builtins() -> None:
    if "segment" not in PLANNERS:
        from orchestrator.planning.llm import LLMPlanner
        from orchestrator.planning.segment import Segment
        from orchestrator.planning.single import Single

        for cls in (Segment, LLMPlanner, Single):
            if cls.name not in PLANNERS:
                register_planner(cls)


def planner_names() -> list[str]:
    _load_builtins()
    return sorted(PLANNERS)


def get_planner(name: str) -> Planner:
    _load_builtins()
    try:
        return PLANNERS[name]()
    except KeyError:
        raise StrategyError(f"unknown planner {name!r}; choose one of {', '.join(sorted(PLANNERS))}") from None
