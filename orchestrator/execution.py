"""The execution layer: every generation runs here, under a deadline, a cancel token and one error policy.

Experts are grouped by backend: all local experts of one call go to the local backend
as **one mixed-adapter batch**; remote experts are called concurrently, one request each.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from expertmix.errors import ExpertmixError, ExpertTimeout, ExpertUnavailable, UnknownExpert
from experts.backends.base import Backend, CancelToken, Generation, GenerationConfig, LocalWeights
from experts.prompts import Message
from experts.registry import BASE_EXPERT
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
    #: the typed error behind ``error`` (kept for direct requests, which re-raise it)
    exception: ExpertmixError | None = None

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
    """The one execution layer: every generation of every door runs through it.

    It owns the per-expert deadline (a child :class:`CancelToken` per call, cancelled when the
    deadline passes so local decoding stops and HTTP requests are cancelled), the caller's
    cancellation (a dropped client), and the error policy: :meth:`run` records failures in
    :class:`Outcome` objects and never raises for an expert; :meth:`generate` and :meth:`stream`
    (direct requests) raise typed errors. Local experts of one call decode as one mixed-adapter
    batch; remote experts are called one request each, concurrently.
    """

    def __init__(
        self,
        routes: Mapping[str, Backend],
        *,
        timeout_s: float,
        timeouts: Mapping[str, float] | None = None,
        max_workers: int = 16,
        local: LocalWeights | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.timeout_s = timeout_s
        #: per-expert overrides of ``timeout_s`` (``timeout_s`` in an ``[[experts]]`` table)
        self.timeouts = dict(timeouts or {})
        #: the adapters' weights in this process (mixture, adapter_merge), if any
        self.local = local
        self._executor = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="expertmix-expert")
        self._closed = threading.Event()

    def backend_for(self, expert: str) -> Backend:
        try:
            return self.routes[expert]
        except KeyError:
            known = ", ".join(self.routes)
            raise UnknownExpert(f"unknown expert {expert!r}; configured: {known}", expert=expert) from None

    def limit(self, expert: str) -> float:
        return self.timeouts.get(expert, self.timeout_s)

    def _token(self, expert: str, cancel: CancelToken | None, timeout_s: float | None = None) -> CancelToken:
        return CancelToken(timeout_s=timeout_s if timeout_s is not None else self.limit(expert), parent=cancel)

    # -- fault policy: outcomes, never raises for an expert ------------------------------------------
    def run(
        self,
        requests: Sequence[tuple[str, list[Message]]],
        config: GenerationConfig,
        *,
        cancel: CancelToken | None = None,
        timeout_s: float | None = None,
    ) -> list[Outcome]:
        """Run every request; each comes back as an :class:`Outcome` (never raises for an expert)."""
        def limit(name: str) -> float:
            return timeout_s if timeout_s is not None else self.limit(name)

        if self._closed.is_set():
            return [Outcome(n, None, "ExpertUnavailable: the orchestrator is closed", 0.0) for n, _ in requests]
        groups: list[tuple[Backend, list[int]]] = []
        by_backend: dict[int, list[int]] = {}
        outcomes: list[Outcome | None] = [None] * len(requests)
        for i, (name, _) in enumerate(requests):
            try:
                b = self.backend_for(name)
            except UnknownExpert as exc:
                outcomes[i] = Outcome(name, None, _describe(exc), 0.0, exc)
                continue
            if getattr(b, "local_weights", False):
                if id(b) not in by_backend:
                    by_backend[id(b)] = []
                    groups.append((b, by_backend[id(b)]))
                by_backend[id(b)].append(i)
            else:  # remote: one HTTP request per row, so one expert's failure stays its own
                groups.append((b, [i]))
        t0 = time.perf_counter()
        futures: dict[cf.Future[list[Generation]], tuple[list[int], CancelToken]] = {}
        for backend, idx in groups:
            token = CancelToken(timeout_s=max(limit(requests[i][0]) for i in idx), parent=cancel)
            batch = [requests[i] for i in idx]
            try:
                fut = self._executor.submit(backend.generate, batch, config, cancel=token)
            except RuntimeError as exc:  # executor shut down
                for i in idx:
                    outcomes[i] = Outcome(requests[i][0], None, f"ExpertUnavailable: {exc}", 0.0)
                continue
            futures[fut] = (idx, token)
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.05, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                self._collect(fut, futures[fut][0], requests, outcomes, time.perf_counter() - t0)
            for fut in [f for f in pending if futures[f][1].cancelled]:
                pending.discard(fut)
                idx, token = futures[fut]
                token.cancel(token.reason or "cancelled")  # stops local decoding / the HTTP request
                fut.cancel()
                now = time.perf_counter() - t0
                for i in idx:
                    name = requests[i][0]
                    err = token.error(expert=name, what=f"expert {name!r}")
                    if token.timed_out:
                        err = ExpertTimeout(f"no answer within {limit(name):g} s", expert=name)
                    outcomes[i] = Outcome(name, None, _describe(err), now, err)
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _collect(fut: cf.Future[list[Generation]], idx: list[int], requests: Sequence[tuple[str, list[Message]]],
                 outcomes: list[Outcome | None], elapsed: float) -> None:
        try:
            gens = fut.result()
        except BaseException as exc:
            if not isinstance(exc, ExpertmixError):
                logger.warning("expert batch %s failed", [requests[i][0] for i in idx], exc_info=exc)
            typed = exc if isinstance(exc, ExpertmixError) else None
            for i in idx:
                outcomes[i] = Outcome(requests[i][0], None, _describe(exc), elapsed, typed)
            return
        if len(gens) != len(idx):
            for i in idx:
                outcomes[i] = Outcome(requests[i][0], None, "backend returned a wrong number of answers", elapsed)
            return
        for i, g in zip(idx, gens):
            outcomes[i] = Outcome(requests[i][0], g, None, g.latency_s or elapsed)

    def run_local(
        self,
        label: str,
        fn: Callable[[CancelToken], Generation],
        *,
        experts: Sequence[str],
        cancel: CancelToken | None = None,
    ) -> Outcome:
        """Run a local-weights operation (mixture, merged adapter) under the experts' deadline, as an Outcome."""
        token = CancelToken(timeout_s=max((self.limit(e) for e in experts), default=self.timeout_s), parent=cancel)
        t0 = time.perf_counter()
        try:
            g = fn(token)
        except BaseException as exc:
            if not isinstance(exc, ExpertmixError):
                logger.warning("%s failed", label, exc_info=exc)
            typed = exc if isinstance(exc, ExpertmixError) else None
            return Outcome(label, None, _describe(exc), time.perf_counter() - t0, typed)
        return Outcome(label, g, None, time.perf_counter() - t0)

    # -- direct requests: typed errors raise ----------------------------------------------------------
    def generate(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Generation:
        """One expert, directly (server ``model=<expert>``, ``expertmix generate``); errors raise."""
        out = self.run([(expert, messages)], config, cancel=cancel)[0]
        if out.generation is None:
            raise _reraise(out, expert)
        return out.generation

    def stream(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        """Text chunks of one expert's answer under its deadline; closing the iterator cancels the work."""
        backend = self.backend_for(expert)
        token = self._token(expert, cancel)
        it = backend.stream(expert, messages, config, cancel=token)
        try:
            yield from it
        finally:
            token.cancel("stream closed")
            close = getattr(it, "close", None)
            if close is not None:
                close()

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
                    except Exception:
                        logger.debug("closing backend failed", exc_info=True)


def _reraise(out: Outcome, expert: str) -> ExpertmixError:
    """The typed error for a failed direct request (the Outcome keeps only its text)."""
    err = out.exception
    if err is not None:
        return err
    return ExpertUnavailable(out.error or "no output", expert=expert)
