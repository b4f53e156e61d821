"""Live changes to a running orchestrator: reload the router, add or remove an expert.

Every change is a swap of one reference (``om.router``, ``om.config``, one entry of the route
tables), so a request in flight keeps what it started with: it planned and routed with the router
it read at its start, and it resolved its experts' backends before the change. Adapters stay in
memory after an expert is removed, so in-flight work on them finishes.

>>> reload_router(om)                                   # doctest: +SKIP
>>> add_expert(om, ExpertSpec(name="legal", adapter=Path("adapters/legal"), description="Contracts"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmix.errors import AdapterError, ExpertError, InputError, UnknownExpert
from experts.registry import BASE_EXPERT, ExpertSpec, name_problem
from orchestrator.routing import Router

if TYPE_CHECKING:
    from experts.backends.openai import OpenAIBackend
    from orchestrator.core import Orchestrator

__all__ = ["RouterWatch", "adapter_roots", "add_expert", "check_adapter_path", "reload_router",
           "remote_backend", "remote_spec_for", "remove_expert", "router_pointer", "router_version",
           "router_watch"]

logger = logging.getLogger(__name__)

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
    from orchestrator.routing import check_labels

    trained = Router.load(path if path is not None else om.config.router.path)
    with _lock:
        current = om.router
        added = dict(current.added) if isinstance(current, LiveRouter) else {}
        names = set(om.expert_names)
        new = live_router(om, trained, added={n: c for n, c in added.items() if n in names},
                          removed=frozenset(lab for lab in trained.labels if lab not in names))
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


def add_expert(om: Orchestrator, spec: ExpertSpec, *, examples: tuple[str, ...] = (),
               remote_path: str | None = None) -> None:
    """Load ``spec``'s adapter and make the expert visible; on any error nothing changed.

    A local expert's adapter is validated against the base first. An ``openai`` expert's adapter is
    loaded by its server (``remote_path``: a path on *that* host, not checked here) through
    :meth:`~experts.backends.openai.OpenAIBackend.load_adapter`; ``spec.base_url`` picks which of the
    servers this orchestrator already talks to. Either answers ``model=NAME`` at once, and routed
    requests reach it when they are clearly closer to its description and ``examples`` than to any
    trained department's description (see :class:`LiveRouter`) until a router trained with its label
    is promoted and reloaded.
    """
    problem = name_problem(spec.name)
    if problem:
        raise InputError(problem)
    with _lock:
        if spec.name in om.expert_names:
            raise InputError(f"expert {spec.name!r} is already loaded; unload it first or pick another name")
        router = _router_adding(om, spec, examples)  # before loading: a failure here leaves nothing to undo
        backend: Any
        if spec.backend == "openai":
            if not remote_path:
                raise InputError(f"expert {spec.name!r}: lora_path (the adapter's path on the remote host) "
                                 "is required")
            backend = remote_backend(om, spec.base_url)
            spec = replace(spec, base_url=backend.base_url)
            backend.load_adapter(spec.name, remote_path, spec=spec)  # typed error if the remote refuses it
        elif spec.backend == "local":
            if om.local is None:
                raise ExpertError(f"expert {spec.name!r}: this orchestrator has no local base model to load "
                                  "adapters onto")
            if spec.name in om.local.expert_names():
                raise InputError(f"expert {spec.name!r} was unloaded but its adapter is still held by the "
                                 "running model; load it under another name (or restart to reuse the name)")
            om.local.add_expert(spec)  # validated against the base; AdapterError if it does not fit
            backend = om.batcher if om.batcher is not None else om.local
        else:
            raise InputError(f"expert {spec.name!r}: backend {spec.backend!r} cannot be added at run time")
        om.routes[spec.name] = backend
        om.pool.routes[spec.name] = backend
        if spec.timeout_s is not None:
            om.pool.timeouts[spec.name] = spec.timeout_s
        om.config = replace(om.config, experts=(*om.config.experts, spec))
        om.router = router


def _router_adding(om: Orchestrator, spec: ExpertSpec, examples: tuple[str, ...]) -> Router:
    """The router to use once ``spec`` is visible: the current one, plus ``spec`` routed by similarity."""
    current = om.router
    trained = current.trained if isinstance(current, LiveRouter) else current
    if spec.name in trained.labels:
        return current
    centroid = _unit(_unit(trained._embed([spec.description or spec.name, *examples])).mean(axis=0))
    added = {**(current.added if isinstance(current, LiveRouter) else {}), spec.name: centroid}
    removed = current.removed if isinstance(current, LiveRouter) else frozenset()
    return live_router(om, trained, added=added, removed=removed - {spec.name})


def remote_backend(om: Orchestrator, base_url: str | None = None) -> OpenAIBackend:
    """The OpenAI-compatible expert server this orchestrator already talks to at ``base_url`` (``None``:
    the only one). Run-time loads are forwarded only to servers named in the config (with their api_key),
    never to an address a request brings."""
    from experts.backends.openai import OpenAIBackend

    remotes = list({id(b): b for b in om.routes.values() if isinstance(b, OpenAIBackend)}.values())
    if base_url:
        want = base_url.rstrip("/")
        found = [b for b in remotes if b.base_url == want]
        if found:
            return found[0]
        raise InputError(f"base_url {base_url!r} is not an expert server of this config; run-time loads go "
                         "only to servers configured for an expert with backend = \"openai\" (known: "
                         f"{', '.join(b.base_url for b in remotes) or 'none'}); add one there and restart")
    if len(remotes) == 1:
        return remotes[0]
    if not remotes:
        raise InputError("this config has no backend = \"openai\" expert, so there is no remote server to "
                         "forward to; configure one (base_url = the vLLM /v1 root) and restart")
    raise InputError(f"this config talks to {len(remotes)} expert servers; say which with base_url "
                     f"({', '.join(b.base_url for b in remotes)})")


def remove_expert(om: Orchestrator, name: str) -> None:
    """Hide an expert: ``model=NAME`` answers 404 and the route tables forget it.

    An ``openai`` expert is unloaded on its server first (an error there leaves it in place; a server
    that no longer has it is fine). The router stops picking it at once (its weight is renormalized
    over the rest) until a router without its label is promoted.
    """
    from experts.backends.openai import OpenAIBackend

    with _lock:
        if name == BASE_EXPERT or name not in om.expert_names:
            raise UnknownExpert(f"unknown expert {name!r}; loaded: {', '.join(om.expert_names)}", expert=name)
        backend = om.routes.get(name)
        if isinstance(backend, OpenAIBackend):
            try:
                backend.unload_adapter(name)
            except UnknownExpert:
                logger.warning("expert %r: its server no longer had the adapter; removed here", name)
        om.config = replace(om.config, experts=tuple(e for e in om.config.experts if e.name != name))
        om.routes.pop(name, None)
        om.pool.routes.pop(name, None)
        om.pool.timeouts.pop(name, None)
        current = om.router
        trained = current.trained if isinstance(current, LiveRouter) else current
        added = {n: c for n, c in (current.added if isinstance(current, LiveRouter) else {}).items() if n != name}
        removed = (current.removed if isinstance(current, LiveRouter) else frozenset()) | {name}
        om.router = live_router(om, trained, added=added, removed=removed)


def spec_for(name: str, path: Path, *, description: str = "") -> ExpertSpec:
    """A local expert spec for a validated adapter directory."""
    try:
        return ExpertSpec(name=name, adapter=path, description=description)
    except Exception as exc:  # ConfigError from the spec's own checks
        raise AdapterError(f"expert {name!r}: {exc}", expert=name) from exc


def remote_spec_for(om: Orchestrator, name: str, *, base_url: str | None = None,
                    description: str = "") -> ExpertSpec:
    """An ``openai`` expert spec on one of the configured expert servers (see :func:`remote_backend`)."""
    backend = remote_backend(om, base_url)
    key = next((e.api_key for e in om.config.experts
                if e.backend == "openai" and (e.base_url or "").rstrip("/") == backend.base_url), None)
    problem = name_problem(name)
    if problem:
        raise InputError(problem)
    return ExpertSpec(name=name, description=description, backend="openai", base_url=backend.base_url,
                      api_key=key)



# -- routing for experts the router was not trained on -------------------------------------------------
#: a live expert is routed to only when the question is at least this similar to its description/examples
#: and more similar to it than to every trained department's description by MARGIN
MIN_SIMILARITY = 0.35
MARGIN = 0.05


def _unit(x: Any) -> Any:
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class LiveRouter(Router):  # type: ignore[misc,valid-type]
    """The trained router plus live changes: experts added since (scored by embedding similarity to
    their description and examples, and said so in ``Routing.reason``) and experts removed since
    (dropped from every routing, weights renormalized over the rest)."""

    def __init__(self, trained: Router, *, added: dict[str, Any], removed: frozenset[str],
                 departments: dict[str, Any]) -> None:
        super().__init__(model=trained.model, encoder=trained.encoder, path=trained.path,
                         cache_size=trained.cache_size)
        self.trained = trained
        self.added = dict(added)  # name -> unit centroid of its description (+ examples)
        self.removed = frozenset(removed)
        self.departments = dict(departments)  # trained label -> unit embedding of its description

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(lab for lab in self.trained.labels if lab not in self.removed) + tuple(self.added)

    def route_batch(self, queries: Any, *, k: int = 2, min_weight: float = 0.0) -> list[Any]:
        from orchestrator.routing import ExpertWeight, Routing

        base = self.trained.route_batch(queries, k=max(1, len(self.trained.labels)), min_weight=0.0)
        if not base:
            return base
        vecs = _unit(self.trained._embed([q.strip() for q in queries])) if self.added else None
        out = []
        for row, r in enumerate(base):
            probs = {n: p for n, p in r.probabilities.items() if n not in self.removed}
            abstained, reason = r.abstained, r.reason
            live = None
            if vecs is not None:
                v = vecs[row]
                dept = max((float(v @ d) for n, d in self.departments.items() if n not in self.removed), default=0.0)
                sims = {n: float(v @ c) for n, c in self.added.items()}
                name, sim = max(sims.items(), key=lambda kv: kv[1])
                if sim >= MIN_SIMILARITY and sim >= dept + MARGIN:
                    live = name
                    share = min(1.0, (sim - dept) / MARGIN / 4 + 0.5)
                    total = sum(probs.values()) or 1.0
                    probs = {n: p / total * (1 - share) for n, p in probs.items()}
                    probs[name] = share
                    abstained = False
                    reason = (f"live expert {name!r} by description similarity {sim:.2f} (best trained department "
                              f"{dept:.2f}); not in the trained router yet")
            ranked = sorted(probs.items(), key=lambda kv: -kv[1])[: min(k, len(probs))]
            total = sum(p for _, p in ranked) or 1.0
            chosen = [(n, p / total) for n, p in ranked]
            if min_weight > 0 and chosen:
                kept = [chosen[0]] + [c for c in chosen[1:] if c[1] >= min_weight]
                s = sum(w for _, w in kept) or 1.0
                chosen = [(n, w / s) for n, w in kept]
            out.append(Routing(experts=tuple(ExpertWeight(n, w) for n, w in chosen), abstained=abstained,
                               probabilities=probs, confidence=r.confidence if live is None else 1.0, reason=reason))
        return out


def _descriptions(om: Orchestrator, router: Router, names: list[str]) -> dict[str, Any]:
    descr = {e.name: e.description or e.name for e in om.config.experts}
    texts = [descr.get(n, n) for n in names]
    return dict(zip(names, _unit(router._embed(texts)), strict=True)) if names else {}


def live_router(om: Orchestrator, trained: Router, *, added: dict[str, Any], removed: frozenset[str]) -> Router:
    """``trained`` if nothing changed since it was trained, else a :class:`LiveRouter` over it."""
    removed = frozenset(n for n in removed if n in trained.labels)
    added = {n: c for n, c in added.items() if n not in trained.labels}
    if not added and not removed:
        return trained
    return LiveRouter(trained, added=added, removed=removed,
                      departments=_descriptions(om, trained, list(trained.labels)))


# -- following `router promote` in a running server -------------------------------------------------------
def router_pointer(config: Any) -> Path | None:
    """The file ``router promote`` rewrites for this config's router (the store's ``CURRENT``), or ``None``
    when ``[router] path`` names a version directory (pinned: only ``POST /admin/reload`` changes it)."""
    from router_training.store import ROUTER_JSON, RouterStore

    path = config.router.path
    if path is None:
        return RouterStore().root / "CURRENT"  # no path: the default store's current version (else shipped)
    p = Path(path).expanduser()
    return None if (p / ROUTER_JSON).is_file() else p / "CURRENT"


class RouterWatch:
    """Reload the router when its store's ``CURRENT`` changes: :meth:`poll` costs one ``stat``.

    A new router is loaded and checked before the swap (see :func:`reload_router`); one that fails is
    logged and the old router kept (:meth:`poll` says ``"failed"``), and it is tried again only when
    ``CURRENT`` changes again.
    """

    def __init__(self, om: Orchestrator, pointer: Path, *, every_s: float) -> None:
        self.om = om
        self.pointer = pointer
        self.every_s = every_s
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.pointer.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def poll(self) -> str | None:
        """``"reloaded"``, ``"failed"``, or ``None`` when there was nothing to do."""
        sig = self._signature()
        if sig == self._seen:
            return None
        self._seen = sig
        if sig is None:
            logger.warning("router store pointer %s disappeared; keeping router %s", self.pointer,
                           router_version(self.om.router))
            return None
        try:
            version = self.pointer.read_text("utf-8").strip()
        except OSError:
            version = ""
        old = router_version(self.om.router)
        if version and version == old:
            return None
        try:
            reload_router(self.om, self.pointer.parent)
        except Exception as exc:  # noqa: BLE001 - any failure: keep serving with the router we have
            logger.error("router store %s now names %r, but it cannot be used; keeping router %s: %s",
                         self.pointer.parent, version, old, exc)
            return "failed"
        logger.info("router store %s: switched from router %s to %s", self.pointer.parent, old,
                    router_version(self.om.router))
        return "reloaded"


def router_watch(om: Orchestrator, every_s: float) -> RouterWatch | None:
    """A :class:`RouterWatch` for ``om``'s config, or ``None`` when disabled (0), when the version is
    pinned, or when the router in use did not come from the watched store (one handed to the
    orchestrator from elsewhere is not replaced behind its owner's back)."""
    from router_training.artifact import default_router_path

    pointer = router_pointer(om.config) if every_s > 0 else None
    if pointer is None:
        return None
    path = getattr(om.router, "path", None)
    if path is not None:
        here = Path(path).resolve()
        from_store = here.parent == pointer.parent.resolve()
        shipped = here == default_router_path().resolve() and not pointer.exists()
        if not (from_store or shipped):
            logger.info("router %s is not from store %s: not following router promote there", here,
                        pointer.parent)
            return None
    return RouterWatch(om, pointer, every_s=every_s)
