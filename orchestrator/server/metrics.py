"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from orchestrator.trace import Answer

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_WEIGHT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """Requests, latency histograms, tokens, per-expert selections, weights and failures, abstentions, batching."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("expertmix_requests", "HTTP requests by endpoint, model and status code.",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("expertmix_request_latency_seconds", "Request latency (to the last byte for streams).",
                                 ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("expertmix_stage_seconds", "Orchestrated answers: time in route, experts and merge.",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("expertmix_tokens", "Tokens by kind (prompt, completion) and model.",
                              ["kind", "model"], registry=r)
        self.selections = Counter("expertmix_expert_selections", "Times the router selected an expert.",
                                  ["expert"], registry=r)
        self.weights = Histogram("expertmix_expert_weight", "Routed weight of a selected expert.",
                                 ["expert"], buckets=_WEIGHT_BUCKETS, registry=r)
        self.failures = Counter("expertmix_expert_failures", "Expert calls that failed (timeout, error); the answer went on without them.",
                                ["expert"], registry=r)
        self.abstentions = Counter("expertmix_abstentions", "Queries the router abstained on (the base model answered).",
                                   registry=r)
        self.fallbacks = Counter("expertmix_fallbacks", "Answers given by the base model, by reason.", ["reason"], registry=r)
        self.events = Counter("expertmix_answer_events", "Answer events, e.g. synthesis_guard (the aggregator wrote "
                              "about the experts; the parts were joined as sections instead).", ["event"], registry=r)
        self.strategies = Counter("expertmix_strategy_runs", "Strategy that ran per answer (auto picks one).",
                                  ["strategy"], registry=r)
        self.plan_parts = Histogram("expertmix_plan_parts", "Parts per planned request.", buckets=(1, 2, 3, 4, 6, 8),
                                    registry=r)
        self.in_flight = Gauge("expertmix_requests_in_flight", "Chat requests being served now.", registry=r)
        self.rejected = Counter("expertmix_rejected", "Requests refused before running, by reason.", ["reason"], registry=r)
        self.router_reloads = Counter("expertmix_router_reloads", "Router store changes followed (router_watch_s): "
                                      "reloaded, or failed (the old router kept).", ["result"], registry=r)
        self.batch_rows = Histogram("expertmix_batch_rows", "Rows per decoded batch (dynamic batching).",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.batch_jobs = Histogram("expertmix_batch_jobs", "Queued generate calls merged into one batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_wait = Histogram("expertmix_batch_wait_seconds", "Queue wait of the oldest job in a batch.",
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)

    def on_batch(self, rows: int, jobs: int, wait_s: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_jobs.observe(jobs)
        self.batch_wait.observe(wait_s)

    def observe_answer(self, answer: Answer) -> None:
        r = answer.routing
        if r.abstained:
            self.abstentions.inc()
        else:
            for e in r.experts:
                self.selections.labels(e.name).inc()
                self.weights.labels(e.name).observe(e.weight)
        if answer.fallback:
            self.fallbacks.labels(answer.fallback).inc()
        for c in answer.contributions:
            if c.error:
                self.failures.labels(c.expert).inc()
        for note in answer.notes:
            self.events.labels(note.split(":")[0]).inc()
        self.strategies.labels(answer.chosen or answer.strategy).inc()
        if answer.plan is not None:
            self.plan_parts.observe(len(answer.plan.get("parts") or []))
        t = answer.timings
        for stage, v in (("route", t.route), ("experts", t.experts), ("merge", t.merge)):
            self.stage.labels(stage).observe(v)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt", model).inc(prompt)
        self.tokens.labels("completion", model).inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
