"""Run-time routing: query → (cached) embedding → calibrated probabilities → top-k → weights.

    >>> router = Router.load()                      # shipped default (or the promoted version)
    >>> r = router.route("How do I reverse a list in Python?", k=2)   # doctest: +SKIP
    >>> r.experts[0].name, r.abstained                                  # doctest: +SKIP
    ('engineering', False)

When the abstain rule fires (off-topic or low confidence) ``abstained`` is True and the
orchestrator answers with the base model; ``experts`` still lists the best guesses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertmix.errors import InputError, RouterMismatch, RouterNotFitted

__all__ = ["ExpertWeight", "Router", "Routing", "check_labels"]


@dataclass(frozen=True)
class ExpertWeight:
    name: str
    weight: float


@dataclass(frozen=True)
class Routing:
    experts: tuple[ExpertWeight, ...]
    """Top-k experts, weights renormalized to sum to 1, descending."""
    abstained: bool
    probabilities: dict[str, float]
    """Calibrated probabilities of all labels."""
    confidence: float
    """The score the abstain rule compared with its threshold."""
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "experts": [{"name": e.name, "weight": e.weight} for e in self.experts],
            "abstained": self.abstained,
            "probabilities": dict(self.probabilities),
            "confidence": self.confidence,
            "reason": self.reason,
        }


class _LRU:
    """A small thread-safe LRU of query → embedding."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


def _weights(
    order: np.ndarray, probs: np.ndarray, labels: Sequence[str], k: int, min_weight: float
) -> tuple[ExpertWeight, ...]:
    top = [int(i) for i in order[:k]]
    total = float(sum(probs[i] for i in top)) or 1.0
    chosen = [(labels[i], float(probs[i]) / total) for i in top]
    if min_weight > 0:
        kept = [chosen[0]] + [c for c in chosen[1:] if c[1] >= min_weight]
        s = sum(w for _, w in kept) or 1.0
        chosen = [(n, w / s) for n, w in kept]
    return tuple(ExpertWeight(n, w) for n, w in chosen)


@dataclass
class Router:
    """A loaded router artifact plus its encoder and a query-embedding cache."""

    model: Any
    encoder: Any
    path: Path | None = None
    cache_size: int = 1024
    _cache: _LRU = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cache = _LRU(self.cache_size)

    @property
    def labels(self) -> tuple[str, ...]:
        if self.model is None:
            raise RouterNotFitted("router has no model; use Router.load()")
        return tuple(self.model.labels)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        embedding_model: str | None = None,
        cache_size: int = 1024,
        warm: bool = True,
    ) -> Router:
        """Load an artifact (None = the store's current version, else the shipped default).

        The embedding model is checked against the one recorded in the artifact;
        ``warm`` loads it now so the first query is not slow.
        """
        from router_training.artifact import check_encoder_dim, encoder_for, load_model, resolve_router_path

        p = resolve_router_path(path)
        model = load_model(p)
        encoder = encoder_for(model, embedding_model=embedding_model, path=p)
        router = cls(model=model, encoder=encoder, path=p, cache_size=cache_size)
        if warm:
            check_encoder_dim(model, encoder.dim, path=p)
            router._embed(["warm up"], use_cache=False)
        return router

    # -- embedding ---------------------------------------------------------------------
    def _embed(self, queries: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
        out: list[np.ndarray | None] = [self._cache.get(q) if use_cache else None for q in queries]
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:
            texts = [queries[i] for i in missing]
            vecs = (
                self.encoder.encode_one(texts[0])[None, :]
                if len(texts) == 1
                else self.encoder.encode(texts, cache=False)
            )
            for i, v in zip(missing, vecs, strict=True):
                out[i] = v
                if use_cache:
                    self._cache.put(queries[i], v)
        return np.stack(out)  # type: ignore[arg-type]

    # -- routing -----------------------------------------------------------------------
    def route(self, query: str, *, k: int = 2, min_weight: float = 0.0) -> Routing:
        """Top-k experts for one query; see :meth:`route_batch`."""
        return self.route_batch([query], k=k, min_weight=min_weight)[0]

    def route_batch(self, queries: Sequence[str], *, k: int = 2, min_weight: float = 0.0) -> list[Routing]:
        """Route many queries at once (one encoder batch for the uncached ones)."""
        if self.model is None:
            raise RouterNotFitted("router has no model; use Router.load()")
        if isinstance(queries, str):
            raise InputError("route_batch takes a sequence of queries, not one string")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        if not 0.0 <= min_weight <= 1.0:
            raise InputError(f"min_weight must be in [0, 1], got {min_weight}")
        cleaned = []
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise InputError("query is empty")
            cleaned.append(q.strip())
        if not cleaned:
            return []
        from router_training.long_text import length_robust_scores

        # long texts: their sentences are embedded in the same batch; abstain on the most in-domain part
        x, probs, conf = length_robust_scores(self.model, cleaned, self._embed)
        thr = float(self.model.abstain.threshold)
        labels = self.labels
        out = []
        for p, c in zip(probs, conf, strict=True):
            order = np.argsort(-p, kind="stable")
            abstained = bool(c < thr)
            reason = f"{self.model.abstain.describe()} {c:.2f} < threshold {thr:.2f}" if abstained else None
            out.append(
                Routing(
                    experts=_weights(order, p, labels, min(k, len(labels)), min_weight),
                    abstained=abstained,
                    probabilities={lab: float(p[i]) for i, lab in enumerate(labels)},
                    confidence=float(c),
                    reason=reason,
                )
            )
        return out


def check_labels(router: Router, expert_names: Iterable[str]) -> None:
    """Raise RouterMismatch unless the router's labels are exactly the configured experts."""
    labels, names = set(router.labels), set(expert_names)
    if labels == names:
        return
    parts = []
    missing = sorted(labels - names)
    extra = sorted(names - labels)
    if missing:
        parts.append(f"router labels without a configured expert: {', '.join(missing)}")
    if extra:
        parts.append(f"configured experts the router cannot route to: {', '.join(extra)}")
    where = f" ({router.path})" if router.path else ""
    raise RouterMismatch(
        f"router{where} does not match the experts: " + "; ".join(parts)
        + ". Retrain the router on these experts' labels or fix the expert names in the config."
    )
