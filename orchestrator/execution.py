"""Running experts with the fault policy: per-expert timeout, failures recorded, never raised.

Experts are grouped by backend: all local experts of one call go to the local backend
as **one mixed-adapter batch**; remote backends are called concurrently.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from experts.backends.base import Backend, Generation, GenerationConfig
from experts.prompts import Message
from experts.registry import BASE_EXPERT
from expertmix.errors import ExpertmixError, ExpertTimeout, UnknownExpert
from orchestrator.trace import Contribution

__all__ = ["ExpertPool", "Outcome"]

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Result of one expert request: a generation or an error message."""

    expert: str
    generation: Generation | None
    error: str | None
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.generation is not None and self.error is None

    def contribution(self, weight: float) -> Contribution:
        g = self.generation
        return Contribution(
            expert=self.expert,
            weight=weight,
            text=g.text if g and self.ok else "",
            tokens=g.tokens if g and self.ok else 0,
            latency_s=round(self.latency_s, 4),
            error=self.error,
        )


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    return f"{name}: {exc}" if str(exc) else name


class ExpertPool:
    """Maps expert names to backends and runs requests on them under a timeout."""

    def __init__(
        self,
        routes: Mapping[str, Backend],
        *,
        timeout_s: float,
        timeouts: Mapping[str, float] | None = None,
        max_workers: int = 16,
    ) -> None:
        self.routes = dict(routes)
        self.timeout_s = timeout_s
        #: per-expert overrides of ``timeout_s`` (``timeout_s`` in an ``[[experts]]`` table)
        self.timeouts = dict(timeouts or {})
        self._executor = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="expertmix-expert")
        self._closed = threading.Event()

    def backend_for(self, expert: str) -> Backend:
        try:
            return self.routes[expert]
        except KeyError:
            known = ", ".join(self.routes)
            raise UnknownExpert(f"unknown expert {expert!r}; configured: {known}", expert=expert) from None

    def run(
        self,
        requests: Sequence[tuple[str, list[Message]]],
        config: GenerationConfig,
        *,
        timeout_s: float | None = None,
    ) -> list[Outcome]:
        """Run every request; each comes back as an :class:`Outcome` (never raises for an expert)."""
        def limit(name: str) -> float:
            if timeout_s is not None:
                return timeout_s
            return self.timeouts.get(name, self.timeout_s)

        groups: dict[int, list[int]] = defaultdict(list)
        backends: dict[int, Backend] = {}
        outcomes: list[Outcome | None] = [None] * len(requests)
        for i, (name, _) in enumerate(requests):
            try:
                b = self.backend_for(name)
            except UnknownExpert as exc:
                outcomes[i] = Outcome(name, None, _describe(exc), 0.0)
                continue
            groups[id(b)].append(i)
            backends[id(b)] = b
        t0 = time.perf_counter()
        futures: dict[cf.Future[list[Generation]], list[int]] = {}
        deadlines: dict[cf.Future[list[Generation]], float] = {}
        for key, idx in groups.items():
            batch = [requests[i] for i in idx]
            group_limit = max(limit(requests[i][0]) for i in idx)
            cfg = config if config.max_time_s is not None else replace(config, max_time_s=group_limit)
            fut = self._executor.submit(backends[key].generate, batch, cfg)
            futures[fut] = idx
            deadlines[fut] = t0 + group_limit
        pending = set(futures)
        while pending:
            wait_s = max(0.0, min(deadlines[f] for f in pending) - time.perf_counter())
            done, pending = cf.wait(pending, timeout=wait_s, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self._collect(fut, futures[fut], requests, outcomes, time.perf_counter() - t0)
            now = time.perf_counter()
            for fut in [f for f in pending if deadlines[f] <= now]:
                pending.discard(fut)
                fut.cancel()
                for i in futures[fut]:
                    exc = ExpertTimeout(f"no answer within {limit(requests[i][0]):g} s", expert=requests[i][0])
                    outcomes[i] = Outcome(requests[i][0], None, _describe(exc), now - t0)
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _collect(fut: cf.Future[list[Generation]], idx: list[int], requests: Sequence[tuple[str, list[Message]]],
                 outcomes: list[Outcome | None], elapsed: float) -> None:
        try:
            gens = fut.result()
        except BaseException as exc:  # noqa: BLE001 - the fault policy: record, never raise
            if not isinstance(exc, ExpertmixError):
                logger.warning("expert batch %s failed", [requests[i][0] for i in idx], exc_info=exc)
            for i in idx:
                outcomes[i] = Outcome(requests[i][0], None, _describe(exc), elapsed)
            return
        if len(gens) != len(idx):
            for i in idx:
                outcomes[i] = Outcome(requests[i][0], None, "backend returned a wrong number of answers", elapsed)
            return
        for i, g in zip(idx, gens):
            err = str(g.extra["error"]) if g.extra.get("error") else None
            outcomes[i] = Outcome(requests[i][0], g if err is None else None, err, g.latency_s or elapsed)

    def has_base(self) -> bool:
        return BASE_EXPERT in self.routes

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._executor.shutdown(wait=False, cancel_futures=True)
            seen: set[int] = set()
            for b in self.routes.values():
                if id(b) not in seen:
                    seen.add(id(b))
                    try:
                        b.close()
                    except Exception:  # noqa: BLE001
                        logger.debug("closing backend failed", exc_info=True)
