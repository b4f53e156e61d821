"""expertmix's public API: route a query to the top-k experts, run them, merge one answer.

>>> from orchestrator import Orchestrator                       # doctest: +SKIP
>>> answer = Orchestrator.from_config().ask("What is EBITDA?")   # doctest: +SKIP

Names are imported lazily so that ``import orchestrator`` (and ``expertmix --help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from expertmix.errors import (
    AdapterError,
    AllExpertsFailed,
    ConfigError,
    DataError,
    ExpertError,
    ExpertmixError,
    ExpertTimeout,
    ExpertUnavailable,
    InputError,
    ModelError,
    RouterArtifactError,
    RouterError,
    RouterMismatch,
    RouterNotFitted,
    StrategyError,
    UnknownExpert,
)

if TYPE_CHECKING:
    from orchestrator.config import ExpertmixConfig, load_config
    from orchestrator.core import Orchestrator
    from orchestrator.merge import register_strategy
    from orchestrator.routing import ExpertWeight, Router, Routing
    from orchestrator.trace import Answer, Contribution, Timings

_LAZY = {
    "Orchestrator": "orchestrator.core",
    "Answer": "orchestrator.trace",
    "Contribution": "orchestrator.trace",
    "Timings": "orchestrator.trace",
    "Routing": "orchestrator.routing",
    "ExpertWeight": "orchestrator.routing",
    "Router": "orchestrator.routing",
    "ExpertmixConfig": "orchestrator.config",
    "load_config": "orchestrator.config",
    "register_strategy": "orchestrator.merge",
}

__all__ = [
    "AdapterError",
    "AllExpertsFailed",
    "Answer",
    "ConfigError",
    "Contribution",
    "DataError",
    "ExpertError",
    "ExpertTimeout",
    "ExpertUnavailable",
    "ExpertWeight",
    "ExpertmixConfig",
    "ExpertmixError",
    "InputError",
    "ModelError",
    "Orchestrator",
    "Router",
    "RouterArtifactError",
    "RouterError",
    "RouterMismatch",
    "RouterNotFitted",
    "Routing",
    "StrategyError",
    "Timings",
    "UnknownExpert",
    "load_config",
    "register_strategy",
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
