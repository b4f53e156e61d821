"""Weight-space merges of LoRA adapters (peft ``add_weighted_adapter``), cached in a bounded LRU.

``combination_type="cat"`` concatenates the adapters' A and B matrices with B scaled by
``weight * scaling``, so the merged update is exactly ``Σ wᵢ·ΔWᵢ`` (the other combination
types approximate it and gave broken text with independently trained adapters).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from expertmix.errors import StrategyError

if TYPE_CHECKING:
    from experts.backends.local import LocalBackend

__all__ = ["MergedAdapterCache"]

_PREFIX = "__merged__"


class MergedAdapterCache:
    """Creates merged adapters on demand, keeps at most ``max_size``, evicts least recently used."""

    def __init__(self, backend: LocalBackend, *, max_size: int = 8, decimals: int = 2) -> None:
        self.backend = backend
        self.max_size = max_size
        self.decimals = decimals
        self._lru: OrderedDict[tuple[tuple[str, float], ...], str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def owns(self, name: str) -> bool:
        return name.startswith(_PREFIX) and name in self._lru.values()

    def key(self, weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
        total = sum(weights.values())
        if total <= 0:
            raise StrategyError("adapter_merge needs positive weights")
        # weights that round to zero would only double the merged rank: drop them, renormalize
        eps = 0.5 * 10**-self.decimals
        kept = {n: w / total for n, w in weights.items() if w / total >= eps}
        s = sum(kept.values())
        return tuple(sorted((n, round(w / s, self.decimals)) for n, w in kept.items()))

    def get(self, weights: Mapping[str, float]) -> str:
        """Return the adapter name of the merge at ``weights`` (renormalized, rounded)."""
        key = self.key(weights)
        with self._lock:
            name = self._lru.get(key)
            if name is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return name
            self.misses += 1
            b = self.backend
            if not b._peft:
                raise StrategyError("adapter_merge needs at least one local LoRA expert")
            for n, _ in key:
                if n not in b.expert_names():
                    raise StrategyError(f"adapter_merge: {n!r} is not a local LoRA expert")
            name = _PREFIX + "+".join(f"{n}:{w:.{self.decimals}f}" for n, w in key)
            name = name.replace(".", "_")
            with b._lock:
                b.model.add_weighted_adapter(
                    adapters=[n for n, _ in key],
                    weights=[w for _, w in key],
                    adapter_name=name,
                    combination_type="cat",
                )
                b.model.eval()
                b._adapter_changed(name)
            self._lru[key] = name
            while len(self._lru) > self.max_size:
                _, old = self._lru.popitem(last=False)
                with b._lock:
                    b.model.delete_adapter(old)
                    b._adapter_changed(old)
            return name
