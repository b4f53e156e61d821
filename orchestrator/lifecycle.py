"""Live changes to a running orchestrator: reload the router, add or remove an expert.

Every change is a swap of one reference (``om.router``, ``om.config``, one entry of the route
tables), so a request in flight keeps what it started with: it planned and routed with the router
it read at its start, and it resolved its experts' backends before the change. Adapters stay in
memory after an expert is removed, so in-flight work on them finishes.

>>> reload_router(om)                                   # doctest: +SKIP
>>> add_expert(om, ExpertSpec(name="legal", adapter=Path("adapters/legal"), description="Contracts"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmix.errors import AdapterError, ExpertError, InputError, UnknownExpert
from experts.registry import BASE_EXPERT, ExpertSpec, name_problem

if TYPE_CHECKING:
    from orchestrator.core import Orchestrator
    from orchestrator.routing import Router

__all__ = ["adapter_roots", "add_expert", "check_adapter_path", "reload_router", "remove_expert", "router_version"]

_lock = threading.Lock()  # one change at a time (changes are rare; requests never take it)


def router_version(router: Router) -> str:
    """A short name for the router in use: its store version or directory name, or ``default``."""
    path = getattr(router, "path", None)
    return Path(path).name if path else "default"


def reload_router(om: Orchestrator, path: str | Path | None = None) -> Router:
    """Load the router again (the config's path, else the store's current version) and swap it in.

    The new router is loaded and checked against the experts before the swap; on any error the
    old one stays in place.
    """
    from orchestrator.routing import Router, check_labels

    new = Router.load(path if path is not None else om.config.router.path)
    with _lock:
        check_labels(new, om.expert_names)
        om.router = new
    return new


def adapter_roots(config: Any, extra: tuple[Path, ...] = ()) -> tuple[Path, ...]:
    """Directories adapters may be loaded from at run time: the config file's directory, the packaged
    default adapters, and ``extra`` (plus ``EXPERTMIX_ADAPTER_ROOTS``, ``os.pathsep``-separated)."""
    import experts

    roots = [Path(experts.__file__).resolve().parent / "default" / "adapters", *extra]
    if getattr(config, "path", None):
        roots.append(Path(config.path).resolve().parent)
    env = os.environ.get("EXPERTMIX_ADAPTER_ROOTS", "")
    roots += [Path(p) for p in env.split(os.pathsep) if p]
    return tuple(dict.fromkeys(r.expanduser().resolve() for r in roots))


def check_adapter_path(path: str | Path, roots: tuple[Path, ...]) -> Path:
    """The resolved adapter directory, if it lies under one of ``roots`` (symlinks resolved); else InputError."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise InputError(f"lora_path {str(path)!r} must be an absolute path under one of the adapter roots")
    real = p.resolve()
    if not any(real == r or r in real.parents for r in roots):
        raise InputError(f"lora_path {str(path)!r} is outside the adapter roots ({', '.join(map(str, roots))}); "
                         "put the adapter under one of them or add its directory to EXPERTMIX_ADAPTER_ROOTS")
    if not real.is_dir():
        raise InputError(f"lora_path {str(path)!r} is not a directory (a PEFT adapter directory is expected)")
    return real


def add_expert(om: Orchestrator, spec: ExpertSpec) -> None:
    """Load ``spec``'s adapter (validated against the base first) and make the expert visible.

    It answers ``model=NAME`` at once; the router routes to it once a router trained with its
    label is promoted and reloaded.
    """
    problem = name_problem(spec.name)
    if problem:
        raise InputError(problem)
    with _lock:
        if spec.name in om.expert_names:
            raise InputError(f"expert {spec.name!r} is already loaded; unload it first or pick another name")
        if spec.backend != "local":
            raise InputError(f"expert {spec.name!r}: only local (LoRA adapter) experts can be added at run time")
        if om.local is None:
            raise ExpertError(f"expert {spec.name!r}: this orchestrator has no local base model to load adapters onto")
        if spec.name in om.local.expert_names():
            raise InputError(f"expert {spec.name!r} was unloaded but its adapter is still held by the running "
                             "model; load it under another name (or restart to reuse the name)")
        om.local.add_expert(spec)  # validates the adapter against the base; AdapterError if it does not fit
        backend = om.batcher if om.batcher is not None else om.local
        om.routes[spec.name] = backend
        om.pool.routes[spec.name] = backend
        om.config = replace(om.config, experts=(*om.config.experts, spec))


def remove_expert(om: Orchestrator, name: str) -> None:
    """Hide an expert: ``model=NAME`` answers 404 and the route tables forget it.

    Routed requests that still pick it (the router keeps its label until a new router is promoted)
    record it as a failed contribution, and the merge renormalizes the weights over the rest.
    """
    with _lock:
        if name == BASE_EXPERT or name not in om.expert_names:
            raise UnknownExpert(f"unknown expert {name!r}; loaded: {', '.join(om.expert_names)}", expert=name)
        om.config = replace(om.config, experts=tuple(e for e in om.config.experts if e.name != name))
        om.routes.pop(name, None)
        om.pool.routes.pop(name, None)


def spec_for(name: str, path: Path, *, description: str = "") -> ExpertSpec:
    """A local expert spec for a validated adapter directory."""
    try:
        return ExpertSpec(name=name, adapter=path, description=description)
    except Exception as exc:  # ConfigError from the spec's own checks
        raise AdapterError(f"expert {name!r}: {exc}", expert=name) from exc
