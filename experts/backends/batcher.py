"""Dynamic batching for the local backend: concurrent requests decode together in mixed-adapter batches.

:class:`DynamicBatcher` wraps a :class:`~experts.backends.local.LocalBackend` and is itself a
``Backend``. Each ``generate`` call (one request's expert rows, an aggregator row, a direct
expert call) becomes a job on a queue; one worker thread takes the first job, waits up to
``max_wait_ms`` for more jobs with the same decoding options, and runs them all as **one**
``generate`` call of at most ``max_batch_size`` rows (rows may use different adapters:
peft's ``adapter_names=``). A job is never split; a job bigger than the limit runs alone.

Jobs with different decoding options (``max_new_tokens``, temperature, top-p, stop, seed)
never share a batch, so every row gets exactly what it asked for. If a batch fails on one
job's input (unknown expert, prompt too long), its jobs are retried alone so only the
culprit fails.

Streaming is not batched: :meth:`DynamicBatcher.stream` decodes alone, under the backend's lock.

Each job carries its caller's :class:`~experts.backends.base.CancelToken`: a job cancelled
while queued never runs (its slot is free at once); a job cancelled mid-batch stops its
own rows at the next decoding step while the other rows go on.

The :class:`~orchestrator.core.Orchestrator` creates (and closes) the batcher when it is built
with ``batching=True``; nothing else rewires backends.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from expertmix.errors import ExpertmixError, ExpertUnavailable, InputError
from experts.backends.base import CancelToken, Generation, GenerationConfig
from experts.prompts import Message

if TYPE_CHECKING:
    from experts.backends.local import LocalBackend

__all__ = ["DynamicBatcher"]

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    requests: list[tuple[str, list[Message]]]
    config: GenerationConfig
    cancel: CancelToken | None = None
    future: cf.Future[list[Generation]] = field(default_factory=cf.Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> GenerationConfig:
        # the deadline is not a decoding option: jobs differing only there may share a batch
        return replace(self.config, max_time_s=None)


class DynamicBatcher:
    """A ``Backend`` that queues ``generate`` calls and runs them in shared mixed-adapter batches. Thread-safe.

    ``on_batch(rows, jobs, wait_s)`` is called after every batch (metrics).
    """

    local_weights = True

    def __init__(
        self,
        backend: LocalBackend,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise InputError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= 10_000):
            raise InputError(f"max_wait_ms must be a finite number in [0, 10000], got {max_wait_ms!r}")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: deque[_Job] = deque()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="expertmix-batcher", daemon=True)
        self._worker.start()

    # -- Backend protocol -------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        return self.backend.expert_names()

    def generate(
        self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> list[Generation]:
        if not requests:
            return []
        if self._closed.is_set() or not self._worker.is_alive():
            raise ExpertUnavailable("the batcher is shut down")
        job = _Job(list(requests), config, cancel)
        self._queue.put(job)
        # wait on the future, not on result(timeout): an ExpertTimeout result is a TimeoutError too
        while not cf.wait([job.future], timeout=0.05).done:
            if cancel is not None and cancel.cancelled:
                # a queued job is dropped by the worker; a running one stops its rows at the next step
                raise cancel.error(expert=requests[0][0] if len(requests) == 1 else None, what="generation")
            if not self._worker.is_alive() and not job.future.done():
                raise ExpertUnavailable("the batcher stopped")
        return job.future.result()

    def stream(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        return self.backend.stream(expert, messages, config, cancel=cancel)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        """Stop the worker; queued jobs fail with :class:`ExpertUnavailable`. The wrapped backend stays open."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)
        self._worker.join(timeout=30)

    # -- worker -----------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self, first: _Job) -> list[_Job]:
        """``first`` plus compatible jobs arriving within ``max_wait`` (already-queued ones join at once)."""
        batch, rows = [first], len(first.requests)
        deadline = time.perf_counter() + self.max_wait_s
        skipped: list[_Job] = []
        held, self._held = self._held, deque()
        job: _Job | None
        for job in held:  # jobs put aside by earlier batches go first
            if job.key == first.key and rows + len(job.requests) <= self.max_batch_size:
                batch.append(job)
                rows += len(job.requests)
            else:
                skipped.append(job)
        while rows < self.max_batch_size and not self._closed.is_set():
            try:
                left = deadline - time.perf_counter()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close() sentinel
                self._closed.set()
                break
            if job.key == first.key and rows + len(job.requests) <= self.max_batch_size:
                batch.append(job)
                rows += len(job.requests)
            else:
                skipped.append(job)
        self._held.extend(skipped)
        return batch

    def _loop(self) -> None:
        try:
            while True:
                job = self._next(None)
                if job is None or self._closed.is_set():
                    break
                batch = [j for j in self._collect(job) if not _abandoned(j)]
                if batch:
                    self._run(batch)
        except BaseException:
            logger.exception("the batcher worker failed")
            self._closed.set()
        err = ExpertUnavailable("the batcher is shut down")
        for j in [*self._held, *_drain(self._queue)]:
            if j is not None and not j.future.done():
                j.future.set_exception(err)

    def _run(self, batch: list[_Job]) -> None:
        rows = [r for j in batch for r in j.requests]
        limits = [j.config.max_time_s for j in batch]
        config = replace(batch[0].config, max_time_s=None if None in limits else max(x for x in limits if x is not None))
        waited = time.perf_counter() - min(j.enqueued for j in batch)
        cancels = [j.cancel for j in batch for _ in j.requests]
        try:
            gens = self.backend.generate_rows(rows, config, cancels)
        except BaseException as exc:  # noqa: BLE001 - handed to the callers
            if len(batch) > 1 and isinstance(exc, ExpertmixError):
                for j in batch:  # one bad job must not fail its neighbours
                    self._run([j])
                return
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(len(rows), len(batch), waited)
            except Exception:
                logger.debug("on_batch callback failed", exc_info=True)
        i = 0
        for j in batch:
            n = len(j.requests)
            if j.future.done():
                pass
            elif j.cancel is not None and j.cancel.cancelled:
                j.future.set_exception(j.cancel.error(what="generation"))
            else:
                j.future.set_result(gens[i : i + n])
            i += n


def _abandoned(job: _Job) -> bool:
    """A job whose caller cancelled it while it waited: fail it without running it."""
    if job.cancel is not None and job.cancel.cancelled:
        if not job.future.done():
            job.future.set_exception(job.cancel.error(what="generation"))
        return True
    return False


def _drain(q: queue.Queue[_Job | None]) -> Iterator[_Job | None]:
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return
