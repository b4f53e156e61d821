"""The main job: route → run the top-k experts → merge into one answer.

>>> from orchestrator import Orchestrator
>>> with Orchestrator.from_config() as om:            # the shipped defaults   # doctest: +SKIP
...     answer = om.ask("How do I profile a slow Python service?", k=2)
...     print(answer.text, answer.routing.experts)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from expertmix.errors import AllExpertsFailed, ConfigError
from experts.backends.base import Backend, CancelToken, Generation, GenerationConfig
from experts.prompts import Message, Query, last_user_text, normalize_messages
from experts.registry import BASE_EXPERT, ExpertSpec
from orchestrator.config import ExpertmixConfig, load_config
from orchestrator.execution import ExpertPool
from orchestrator.merge import get_strategy
from orchestrator.merge.base import MergeContext, MergeResult, MergeStrategy
from orchestrator.planning import Plan, PlanContext, get_planner
from orchestrator.request import RequestOptions
from orchestrator.trace import Answer, AnswerLog, Contribution, Timings

if TYPE_CHECKING:
    from experts.backends.batcher import DynamicBatcher
    from experts.backends.local import LocalBackend
    from orchestrator.routing import Router, Routing

__all__ = ["Orchestrator"]

logger = logging.getLogger(__name__)


def _build_backends(config: ExpertmixConfig, overrides: Mapping[str, Backend]) -> tuple[dict[str, Backend], LocalBackend | None]:
    routes: dict[str, Backend] = {}
    local_specs = [e for e in config.experts if e.backend == "local" and e.name not in overrides]
    remote_specs = [e for e in config.experts if e.backend == "openai" and e.name not in overrides]
    local: LocalBackend | None = None
    if local_specs or not remote_specs:
        from experts.backends.local import LocalBackend

        local = LocalBackend.from_specs(config.base, local_specs)
        for e in local_specs:
            routes[e.name] = local
        routes[BASE_EXPERT] = local
    if remote_specs:
        from experts.backends.openai import OpenAIBackend

        groups: dict[tuple[str, str | None], list[ExpertSpec]] = {}
        for e in remote_specs:
            groups.setdefault((e.base_url or "", e.api_key), []).append(e)
        for (url, key), specs in groups.items():
            remote = OpenAIBackend(url, specs, api_key=key)
            for e in specs:
                routes[e.name] = remote
            routes.setdefault(BASE_EXPERT, remote)
    routes.update(overrides)
    return routes, local


def _router_version(router: Router) -> str:
    from orchestrator.lifecycle import router_version

    return router_version(router)


@dataclass
class _Job:
    """One query in flight: its options, decoding settings, strategy, messages, plan and routing."""

    t0: float
    opts: RequestOptions
    gen: GenerationConfig
    strategy: str
    impl: MergeStrategy
    messages: list[Message]
    question: str
    plan: Plan
    t_route: float
    cancel: CancelToken | None
    router_version: str | None = None

    @property
    def routing(self) -> Routing:
        return self.plan.routing


class Orchestrator:
    """Routes a query to the top-k experts, runs them, and merges their answers. Thread-safe.

    Every door (``ask``, ``stream``, ``generate``, the CLI, the HTTP server) builds its decoding
    settings in one place (:class:`~orchestrator.request.RequestOptions`) and generates through one
    execution layer (:class:`~orchestrator.execution.ExpertPool`: deadlines, cancellation, error
    policy). ``batching=True`` decodes concurrent requests together (the server turns it on); the
    orchestrator then owns the batcher and closes it.
    """

    def __init__(
        self,
        config: ExpertmixConfig,
        *,
        router: Router | None = None,
        backends: Mapping[str, Backend] | None = None,
        batching: bool = False,
    ) -> None:
        from orchestrator.routing import Router, check_labels

        self.config = config
        self.settings = config.orchestrator
        self.router = router if router is not None else Router.load(config.router.path)
        self.router = self._live_or_check(self.router, [e.name for e in config.experts], check_labels)
        routes, self.local = _build_backends(config, backends or {})
        self.batcher: DynamicBatcher | None = None
        if batching and self.local is not None:
            from experts.backends.batcher import DynamicBatcher

            s = config.server
            self.batcher = DynamicBatcher(self.local, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms)
            routes = {n: (self.batcher if b is self.local else b) for n, b in routes.items()}
        self.routes = routes
        agg = self.settings.aggregator
        if agg not in self.routes:
            raise ConfigError(f"aggregator {agg!r} has no backend", path=config.path, key="orchestrator.aggregator")
        self.pool = ExpertPool(
            self.routes,
            timeout_s=self.settings.expert_timeout_s,
            timeouts={e.name: e.timeout_s for e in config.experts if e.timeout_s is not None},
            max_workers=max(16, config.server.max_queue),
            local=self.local,
        )
        if self.local is not None:
            self.local.merged.max_size = self.settings.merge_cache_size
        self.log = AnswerLog(self.settings.log_file, log_text=self.settings.log_query_text) if self.settings.log_file else None
        self._closed = threading.Event()

    def _live_or_check(self, router: Router, names: list[str], check: Any) -> Router:
        """The router as trained, or — when the config added experts (with a description) or removed
        some since the router was trained — a live router that routes to an added expert by its
        description and never to a removed one, until a router trained on these experts is promoted."""
        labels = set(getattr(router, "labels", ()))
        added = [e for e in self.config.experts if e.name not in labels]
        removed = frozenset(labels - set(names))
        if (not added and not removed) or not hasattr(router, "_embed") or any(not e.description for e in added):
            check(router, names)  # nothing to bridge, or no description to route by: RouterMismatch names it
            return router
        from orchestrator import lifecycle

        logger.warning(
            "router %s was trained without %s%s: routing to added experts by their description until a router "
            "trained on these experts is promoted (expertmix router train ...)",
            getattr(router, "path", None) or "default", ", ".join(e.name for e in added) or "-",
            f" and still knows removed {', '.join(sorted(removed))}" if removed else "",
        )
        centroids = {e.name: lifecycle._unit(router._embed([e.description]))[0] for e in added}
        return lifecycle.live_router(self, router, added=centroids, removed=removed)

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> Orchestrator:
        """Build from an ``expertmix.toml``; no argument = the shipped defaults."""
        return cls(load_config(path), **kwargs)

    # -- lifetime ---------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the batcher, the worker pool and every backend (idempotent)."""
        if not self._closed.is_set():
            self._closed.set()
            if self.batcher is not None:
                self.batcher.close()
            self.pool.close()

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.config.experts]

    # -- pieces -------------------------------------------------------------------------------------------
    def _prepare(self, query: Query, gen: GenerationConfig) -> tuple[list[Message], str]:
        messages = normalize_messages(query)
        if self.local is not None:
            self.local.check_prompt(messages, gen.max_new_tokens)
        return messages, last_user_text(messages)

    def route(self, query: Query, *, k: int | None = None, min_weight: float | None = None) -> Routing:
        """Score the experts for a query (no generation); ``min_weight`` applies exactly as in ``ask``."""
        opts = RequestOptions(k=k, min_weight=min_weight)
        return self.router.route(last_user_text(normalize_messages(query)), **self._routing_args(opts))

    def _routing_args(self, opts: RequestOptions, router: Router | None = None) -> dict[str, Any]:
        k = self.config.router.k if opts.k is None else opts.k
        mw = self.config.router.min_weight if opts.min_weight is None else opts.min_weight
        return {"k": min(k, len((router or self.router).labels)), "min_weight": mw}

    def plan(self, query: Query, *, planner: str | None = None, k: int | None = None,
             min_weight: float | None = None) -> Plan:
        """Split the request into parts, each with its own routing (no expert generation)."""
        opts = RequestOptions(planner=planner, k=k, min_weight=min_weight)
        return self._plan(last_user_text(normalize_messages(query)), opts, None, uses_plan=True)

    def _plan(self, question: str, opts: RequestOptions, cancel: CancelToken | None, *, uses_plan: bool,
              router: Router | None = None) -> Plan:
        name = (opts.planner or self.settings.planner) if uses_plan else "none"
        router = router or self.router  # read once: a reload mid-request does not mix two routers
        ra = self._routing_args(opts, router)
        ctx = PlanContext(router=router, k=ra["k"], min_weight=ra["min_weight"],
                          max_parts=self.settings.max_parts, experts=self.expert_names,
                          generate=self._plan_generator(cancel) if name == "llm" else None)
        return get_planner(name).plan(question, ctx)

    def _plan_generator(self, cancel: CancelToken | None) -> Any:
        def generate(prompt: str) -> str:
            gen = RequestOptions(max_new_tokens=160, temperature=0.0).generation(self.settings)
            return self.pool.generate(self.settings.aggregator, [{"role": "user", "content": prompt}], gen,
                                      cancel=cancel).text
        return generate

    def _context(self, job: _Job) -> MergeContext:
        weights = [(e.name, e.weight) for e in job.routing.experts]
        return MergeContext(job.messages, job.question, weights, job.gen, self.settings, self.pool,
                            plan=job.plan, cancel=job.cancel)

    def _base_answer(self, job: _Job, *, failures: dict[str, str]) -> MergeResult:
        out = self.pool.run([(BASE_EXPERT, job.messages)], job.gen, cancel=job.cancel)[0]
        if not out.ok or out.generation is None:
            failures = {**failures, BASE_EXPERT: out.error or "no output"}
            raise AllExpertsFailed(
                "every selected expert and the base-model fallback failed: "
                + "; ".join(f"{k}: {v}" for k, v in failures.items()),
                errors=failures,
            )
        g = out.generation
        return MergeResult(
            text=g.text,
            contributions=[out.contribution(1.0)],
            experts_s=out.latency_s,
            tokens=g.tokens,
            prompt_tokens=g.prompt_tokens,
            used_weights={BASE_EXPERT: 1.0},
            finish_reason=g.finish_reason,
        )

    def _finish(self, job: _Job, res: MergeResult, fallback: str | None, extra: list[Contribution] | None = None) -> Answer:
        contributions = (extra or []) + res.contributions
        plan = None
        if job.impl.uses_plan:
            plan = job.plan.to_dict()
            if res.parts:
                plan["parts"] = [p.to_dict() for p in res.parts]
        answer = Answer(
            text=res.text.strip(),
            strategy=job.strategy,
            routing=job.routing,
            contributions=contributions,
            timings=Timings(route=job.t_route, experts=res.experts_s, merge=res.merge_s,
                            total=time.perf_counter() - job.t0),
            weights=res.used_weights,
            fallback=fallback,
            tokens=res.tokens,
            prompt_tokens=res.prompt_tokens,
            finish_reason="length" if res.finish_reason == "length" else "stop",
            chosen=res.chosen or job.strategy,
            plan=plan,
            notes=list(res.notes),
            router_version=job.router_version,
        )
        if self.log is not None:
            try:
                self.log.write(job.question, answer)
            except OSError:
                logger.warning("cannot write answer log %s", self.log.path, exc_info=True)
        return answer

    # -- the main job -------------------------------------------------------------------------------------
    def _begin(self, query: Query, opts: RequestOptions, cancel: CancelToken | None) -> _Job:
        t0 = time.perf_counter()
        gen = opts.generation(self.settings)
        strat = get_strategy(opts.strategy or self.settings.strategy)
        messages, question = self._prepare(query, gen)
        router = self.router
        plan = self._plan(question, opts, cancel, uses_plan=getattr(strat, "uses_plan", False), router=router)
        return _Job(t0, opts, gen, strat.name, strat, messages, question, plan, time.perf_counter() - t0,
                    cancel, _router_version(router))

    def _abstains(self, job: _Job) -> bool:
        """The base model answers when the router abstains on a request that is not split across experts."""
        return job.routing.abstained and not (job.impl.uses_plan and job.plan.multi)

    def _abstain(self, job: _Job) -> Answer:
        res = self._base_answer(job, failures={})
        return self._finish(job, res, "abstained")

    def _conclude(self, job: _Job, res: MergeResult) -> Answer:
        if res.all_failed or not res.text.strip():
            if job.cancel is not None and job.cancel.cancelled:
                raise job.cancel.error(what="request")
            failures = {c.expert: c.error or "empty answer" for c in res.contributions}
            base = self._base_answer(job, failures=failures)
            return self._finish(job, base, "all experts failed", res.contributions)
        return self._finish(job, res, None)

    def ask(
        self,
        query: Query,
        *,
        k: int | None = None,
        strategy: str | None = None,
        planner: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        min_weight: float | None = None,
        repetition_penalty: float | None = None,
        cancel: CancelToken | None = None,
    ) -> Answer:
        """Plan, route, run the experts, merge. A failing expert never raises out of here; only
        bad input (:class:`~expertmix.errors.InputError`), a cancelled ``cancel`` or every path
        failing (:class:`~expertmix.errors.AllExpertsFailed`) does."""
        opts = RequestOptions(k=k, strategy=strategy, planner=planner, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(stop) if isinstance(stop, list) else stop, min_weight=min_weight,
                              repetition_penalty=repetition_penalty)
        job = self._begin(query, opts, cancel)
        if self._abstains(job):
            return self._abstain(job)
        return self._conclude(job, job.impl.run(self._context(job)))

    async def aask(self, query: Query, **kwargs: Any) -> Answer:
        """Async :meth:`ask` (runs in a worker thread; cancelling the task cancels the work)."""
        cancel = kwargs.pop("cancel", None) or CancelToken()
        try:
            return await asyncio.to_thread(self.ask, query, cancel=cancel, **kwargs)
        except asyncio.CancelledError:
            cancel.cancel("caller cancelled")
            raise

    def stream(
        self,
        query: Query,
        *,
        k: int | None = None,
        strategy: str | None = None,
        planner: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        min_weight: float | None = None,
        repetition_penalty: float | None = None,
        cancel: CancelToken | None = None,
    ) -> Iterator[str | Answer]:
        """Yield the answer's text chunks as they are decoded, then the final :class:`Answer`.
        Closing the iterator early cancels the work still running."""
        opts = RequestOptions(k=k, strategy=strategy, planner=planner, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(stop) if isinstance(stop, list) else stop, min_weight=min_weight,
                              repetition_penalty=repetition_penalty)
        own = CancelToken(parent=cancel)
        job = self._begin(query, opts, own)
        try:
            if self._abstains(job):
                answer = self._abstain(job)
                yield answer.text
                yield answer
                return
            final: MergeResult | None = None
            for item in job.impl.stream(self._context(job)):
                if isinstance(item, MergeResult):
                    final = item
                else:
                    yield item
            assert final is not None
            answer = self._conclude(job, final)
            if answer.fallback:  # nothing was streamed from the experts: send the base model's answer
                yield answer.text
            yield answer
        finally:
            own.cancel("stream closed")

    async def astream(self, query: Query, **kwargs: Any) -> AsyncIterator[str | Answer]:
        """Async :meth:`stream`: chunks arrive as they are decoded; leaving the loop cancels the work."""
        import queue as _queue

        cancel = CancelToken(parent=kwargs.pop("cancel", None))
        q: _queue.Queue[Any] = _queue.Queue()
        end = object()

        def pump() -> None:
            try:
                for item in self.stream(query, cancel=cancel, **kwargs):
                    q.put(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                q.put(exc)
            q.put(end)

        task = asyncio.get_running_loop().run_in_executor(None, pump)
        try:
            while True:
                item = await asyncio.to_thread(q.get)
                if item is end:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.cancel("stream closed")
            await task

    def generate(self, expert: str, query: Query, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, repetition_penalty: float | None = None,
                 cancel: CancelToken | None = None) -> Generation:
        """Ask one named expert directly (``__base__`` = the base model), with the same decoding
        settings as ``ask``. Errors propagate, typed."""
        messages, gen = self._direct(expert, query, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, stop=stop, repetition_penalty=repetition_penalty)
        return self.pool.generate(expert, messages, gen, cancel=cancel)

    def generate_stream(self, expert: str, query: Query, *, max_new_tokens: int | None = None,
                        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                        stop: Sequence[str] | str | None = None, repetition_penalty: float | None = None,
                        cancel: CancelToken | None = None) -> Iterator[str]:
        """Stream one named expert's answer directly; closing the iterator cancels the work."""
        messages, gen = self._direct(expert, query, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, stop=stop, repetition_penalty=repetition_penalty)
        return self.pool.stream(expert, messages, gen, cancel=cancel)

    def _direct(self, expert: str, query: Query, **overrides: Any) -> tuple[list[Message], GenerationConfig]:
        """The prologue of a direct request: decoding settings, checked prompt, known expert."""
        gen = RequestOptions(**overrides).generation(self.settings)
        messages, _ = self._prepare(query, gen)
        self.pool.backend_for(expert)
        return messages, gen

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """The decoding settings a request with these overrides gets (every door uses this)."""
        return RequestOptions(**overrides).generation(self.settings)

    # -- live changes (the logic lives in orchestrator/lifecycle.py) ----------------------------------
    def reload_router(self, path: str | Path | None = None) -> Router:
        """Load the router again (``path``, else the config's, else the store's current version), check its
        labels against the experts and swap it in; requests in flight keep the router they started with."""
        from orchestrator import lifecycle

        return lifecycle.reload_router(self, path)

    def add_expert(self, spec: ExpertSpec) -> None:
        """Load a local expert's adapter (validated against the base first) and answer as ``spec.name``."""
        from orchestrator import lifecycle

        lifecycle.add_expert(self, spec)

    def remove_expert(self, name: str) -> None:
        """Stop answering as ``name``; work already running on it finishes."""
        from orchestrator import lifecycle

        lifecycle.remove_expert(self, name)
