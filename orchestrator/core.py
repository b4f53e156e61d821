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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experts.backends.base import Backend, Generation, GenerationConfig
from experts.prompts import Query, last_user_text, normalize_messages
from experts.registry import BASE_EXPERT, ExpertSpec
from expertmix.errors import AllExpertsFailed, ConfigError, InputError
from orchestrator.config import ExpertmixConfig, load_config
from orchestrator.execution import ExpertPool
from orchestrator.merge import get_strategy
from orchestrator.merge.base import MergeContext, MergeResult, MergeStrategy
from orchestrator.trace import Answer, AnswerLog, Contribution, Timings

if TYPE_CHECKING:
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


@dataclass
class _Job:
    """One query in flight: decoding options, strategy, messages and the routing decision."""

    t0: float
    gen: GenerationConfig
    strategy: str
    impl: MergeStrategy
    messages: list[dict[str, str]]
    question: str
    routing: Routing
    t_route: float


class Orchestrator:
    """Routes a query to the top-k experts, runs them, and merges their answers. Thread-safe."""

    def __init__(
        self,
        config: ExpertmixConfig,
        *,
        router: Router | None = None,
        backends: Mapping[str, Backend] | None = None,
    ) -> None:
        from orchestrator.routing import Router, check_labels

        self.config = config
        self.settings = config.orchestrator
        self.router = router if router is not None else Router.load(config.router.path)
        names = [e.name for e in config.experts]
        check_labels(self.router, names)
        self.routes, self.local = _build_backends(config, backends or {})
        agg = self.settings.aggregator
        if agg not in self.routes:
            raise ConfigError(f"aggregator {agg!r} has no backend", path=config.path, key="orchestrator.aggregator")
        self.pool = ExpertPool(
            self.routes,
            timeout_s=self.settings.expert_timeout_s,
            timeouts={e.name: e.timeout_s for e in config.experts if e.timeout_s is not None},
            max_workers=max(16, config.server.max_queue),
        )
        if self.local is not None:
            self.local.merged.max_size = self.settings.merge_cache_size
        self.log = AnswerLog(self.settings.log_file, log_text=self.settings.log_query_text) if self.settings.log_file else None
        self._closed = threading.Event()

    @classmethod
    def from_config(cls, path: str | Path | None = None, **kwargs: Any) -> Orchestrator:
        """Build from an ``expertmix.toml``; no argument = the shipped defaults."""
        return cls(load_config(path), **kwargs)

    # -- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self.pool.close()

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.config.experts]

    # -- pieces ---------------------------------------------------------------------------------------
    def _gen_config(self, max_new_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None) -> GenerationConfig:
        try:
            return GenerationConfig(
                max_new_tokens=max_new_tokens if max_new_tokens is not None else self.settings.max_new_tokens,
                temperature=temperature if temperature is not None else self.settings.temperature,
                top_p=top_p if top_p is not None else 1.0,
                seed=seed,
                repetition_penalty=self.settings.repetition_penalty,
            )
        except ValueError as exc:
            raise InputError(str(exc)) from exc

    def _prepare(self, query: Query, gen: GenerationConfig) -> tuple[list[dict[str, str]], str]:
        messages = normalize_messages(query)
        if self.local is not None:
            n = len(self.local.encode_prompt(messages))
            self.local._check_length(n, gen.max_new_tokens)
        return messages, last_user_text(messages)

    def route(self, query: Query, *, k: int | None = None, min_weight: float | None = None) -> Routing:
        """Score the experts for a query (no generation)."""
        messages = normalize_messages(query)
        k = self.config.router.k if k is None else k
        if k < 1:
            raise InputError("k must be >= 1")
        return self.router.route(
            last_user_text(messages),
            k=min(k, len(self.router.labels)),
            min_weight=self.config.router.min_weight if min_weight is None else min_weight,
        )

    def _context(self, job: _Job) -> MergeContext:
        weights = [(e.name, e.weight) for e in job.routing.experts]
        return MergeContext(job.messages, job.question, weights, job.gen, self.settings, self.pool, self.local)

    def _base_answer(self, messages: list[dict[str, str]], gen: GenerationConfig, *, failures: dict[str, str]) -> MergeResult:
        out = self.pool.run([(BASE_EXPERT, messages)], gen)[0]
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
        )

    def _finish(self, question: str, strategy: str, routing: Routing, res: MergeResult, fallback: str | None,
                t_route: float, t0: float, extra: list[Contribution] | None = None) -> Answer:
        contributions = (extra or []) + res.contributions
        answer = Answer(
            text=res.text.strip(),
            strategy=strategy,
            routing=routing,
            contributions=contributions,
            timings=Timings(route=t_route, experts=res.experts_s, merge=res.merge_s, total=time.perf_counter() - t0),
            weights=res.used_weights,
            fallback=fallback,
            tokens=res.tokens,
            prompt_tokens=res.prompt_tokens,
        )
        if self.log is not None:
            try:
                self.log.write(question, answer)
            except OSError:
                logger.warning("cannot write answer log %s", self.log.path, exc_info=True)
        return answer

    # -- the main job ---------------------------------------------------------------------------------
    def _begin(self, query: Query, opts: dict[str, Any]) -> _Job:
        t0 = time.perf_counter()
        gen = self._gen_config(opts.get("max_new_tokens"), opts.get("temperature"), opts.get("top_p"), opts.get("seed"))
        strat = get_strategy(opts.get("strategy") or self.settings.strategy)
        messages, question = self._prepare(query, gen)
        routing = self.route(messages, k=opts.get("k"), min_weight=opts.get("min_weight"))
        return _Job(t0, gen, strat.name, strat, messages, question, routing, time.perf_counter() - t0)

    def _abstain(self, job: _Job) -> Answer:
        res = self._base_answer(job.messages, job.gen, failures={})
        return self._finish(job.question, job.strategy, job.routing, res, "abstained", job.t_route, job.t0)

    def _conclude(self, job: _Job, res: MergeResult) -> Answer:
        if res.all_failed or not res.text.strip():
            failures = {c.expert: c.error or "empty answer" for c in res.contributions}
            base = self._base_answer(job.messages, job.gen, failures=failures)
            return self._finish(job.question, job.strategy, job.routing, base, "all experts failed",
                                job.t_route, job.t0, res.contributions)
        return self._finish(job.question, job.strategy, job.routing, res, None, job.t_route, job.t0)

    def ask(
        self,
        query: Query,
        *,
        k: int | None = None,
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        min_weight: float | None = None,
    ) -> Answer:
        """Route, run the top-k experts, merge. A failing expert never raises out of here."""
        job = self._begin(query, dict(k=k, strategy=strategy, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, min_weight=min_weight))
        if job.routing.abstained:
            return self._abstain(job)
        return self._conclude(job, job.impl.run(self._context(job)))

    async def aask(self, query: Query, **kwargs: Any) -> Answer:
        """Async :meth:`ask` (runs in a worker thread; the backends are thread-safe)."""
        return await asyncio.to_thread(self.ask, query, **kwargs)

    def stream(
        self,
        query: Query,
        *,
        k: int | None = None,
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        min_weight: float | None = None,
    ) -> Iterator[str | Answer]:
        """Yield the answer's text chunks as they are decoded, then the final :class:`Answer`."""
        job = self._begin(query, dict(k=k, strategy=strategy, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, min_weight=min_weight))
        if job.routing.abstained:
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

    def generate(self, expert: str, query: Query, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> Generation:
        """Ask one named expert directly (``__base__`` = the base model). Errors propagate."""
        gen = self._gen_config(max_new_tokens, temperature, top_p, seed)
        messages, _ = self._prepare(query, gen)
        backend = self.pool.backend_for(expert)
        return backend.generate([(expert, messages)], replace(gen))[0]
