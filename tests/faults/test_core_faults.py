"""Faults against the one execution path (real models; a real fault server on loopback for remote experts).

Regression tests for issue 9: decoding settings identical through every door, deadlines that
cancel work instead of abandoning it, dropped streams that free the backend, limits checked
before any work, adapters verified before they become experts, clean shutdown with remote
requests pending.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from expertmix.errors import AdapterError, ExpertTimeout, InputError, RequestCancelled
from experts.backends.base import CancelToken, GenerationConfig

Q = "How do I reverse a list in Python?"
#: one decoding step is ~0.1 s on an idle 2-core CPU; the bound leaves room for a loaded CI machine
LOCK_WAIT_S = 3.0


def _config(tmp: Path, adapters: dict[str, Path], extra: str = "") -> Path:
    text = ('[base]\nmodel = "smollm2-135m-instruct"\n[orchestrator]\nmax_new_tokens = 6\nrepetition_penalty = 1.3\n'
            'temperature = 0.0\n' + extra)
    for name, path in adapters.items():
        text += f'\n[[experts]]\nname = "{name}"\nadapter = "{path}"\n'
    p = tmp / "expertmix.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def om(random_adapters, tmp_path_factory):
    from orchestrator import Orchestrator

    o = Orchestrator.from_config(_config(tmp_path_factory.mktemp("faults"), random_adapters))
    yield o
    o.close()


class FixedRouter:
    """Routes every query to fixed weights (isolates the execution layer from the learned router)."""

    labels = ("finance", "engineering", "product")

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights

    def route(self, query: str, *, k: int = 2, min_weight: float = 0.0):
        from orchestrator.routing import ExpertWeight, Routing

        w = dict(list(self.weights.items())[:k])
        return Routing(tuple(ExpertWeight(n, v) for n, v in w.items()), False, dict(w), max(w.values()))

    def route_batch(self, queries, *, k: int = 2, min_weight: float = 0.0):
        return [self.route(q, k=k, min_weight=min_weight) for q in queries]


class Recording:
    """Wraps the real local backend and records the decoding settings of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, []
        self.local_weights = True

    def expert_names(self) -> list[str]:
        return self.inner.expert_names()

    def generate(self, requests, config, *, cancel=None):
        self.seen.append(("generate", config))
        return self.inner.generate(requests, config, cancel=cancel)

    def stream(self, expert, messages, config, *, cancel=None) -> Iterator[str]:
        self.seen.append(("stream", config))
        return self.inner.stream(expert, messages, config, cancel=cancel)

    def close(self) -> None:
        pass


def test_same_request_same_decoding_settings_through_every_door(om, tmp_path) -> None:
    """ask (top1, decompose), stream, generate, generate_stream and a remote backend all decode
    with the config's repetition_penalty and the request's own overrides."""
    from fault_server import FaultServer

    from experts.backends.openai import OpenAIBackend
    from experts.registry import ExpertSpec

    rec = Recording(om.local)
    saved = dict(om.pool.routes)
    om.pool.routes.update({n: rec for n in saved})
    try:
        kw = {"max_new_tokens": 5, "temperature": 0.0, "seed": 7, "stop": ["\n\n"]}
        om.ask(Q, strategy="top1", k=1, **kw)
        list(om.stream(Q, strategy="top1", k=1, **kw))
        om.generate("engineering", Q, **kw)
        list(om.generate_stream("engineering", Q, **kw))
        om.ask("What is EBITDA? Also, how do I reverse a list in Python?", strategy="decompose", **kw)
        # the HTTP server's direct door (model = an expert) goes through the same path
        from orchestrator.server.app import create_app
        from orchestrator.server.background import BackgroundServer

        with BackgroundServer(create_app(om)) as srv:
            import httpx

            r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "model": "engineering", "messages": [{"role": "user", "content": Q}], "max_tokens": 5,
                "temperature": 0.0, "seed": 7, "stop": ["\n\n"]})
            assert r.status_code == 200, r.text
    finally:
        om.pool.routes.clear()
        om.pool.routes.update(saved)
    configs = {replace(c, max_time_s=None) for _, c in rec.seen}
    assert len(rec.seen) >= 6 and len(configs) == 1, rec.seen
    (cfg,) = configs
    assert cfg.repetition_penalty == 1.3 and cfg.max_new_tokens == 5 and cfg.seed == 7 and cfg.stop == ("\n\n",)
    assert cfg == om.generation_config(**kw)

    srv = FaultServer({"finance": "ok"})
    try:
        remote = OpenAIBackend(srv.url, [ExpertSpec("finance", backend="openai", base_url=srv.url)])
        try:
            remote.generate([("finance", [{"role": "user", "content": Q}])], cfg)
        finally:
            remote.close()
        body = srv.last()["finance"]
    finally:
        srv.stop()
    assert body["repetition_penalty"] == 1.3 and body["max_tokens"] == 5 and body["seed"] == 7
    assert body["stop"] == ["\n\n"] and body["temperature"] == 0.0


@pytest.mark.parametrize(
    "kw",
    [
        {"stop": ["x"] * 1000},
        {"stop": ["y" * 5000]},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": math.nan},
        {"seed": 2**63},
        {"seed": -1},
        {"max_new_tokens": 0},
        {"k": 0},
        {"min_weight": math.nan},
    ],
)
def test_request_limits_refused_before_any_work(om, kw) -> None:
    t0 = time.perf_counter()
    with pytest.raises(InputError):
        om.ask(Q, **kw)
    assert time.perf_counter() - t0 < 1.0


def test_dropped_stream_frees_the_backend_within_a_second(om) -> None:
    it = om.generate_stream("engineering", Q, max_new_tokens=300)
    next(it)
    next(it)
    t0 = time.perf_counter()
    it.close()
    assert om.local._lock.acquire(timeout=LOCK_WAIT_S), "the backend is still busy after the stream was dropped"
    om.local._lock.release()
    assert time.perf_counter() - t0 < LOCK_WAIT_S
    # the next request is served at once
    assert om.generate("engineering", Q, max_new_tokens=2).tokens <= 2


def test_dropped_orchestrated_stream_cancels_its_work(om) -> None:
    it = om.stream(Q, strategy="top1", k=1, max_new_tokens=300)
    next(it)
    it.close()
    assert om.local._lock.acquire(timeout=LOCK_WAIT_S)
    om.local._lock.release()


def test_cancel_token_stops_ask_quickly(om) -> None:
    token = CancelToken()
    threading.Timer(0.3, token.cancel, args=("client went away",)).start()
    t0 = time.perf_counter()
    with pytest.raises(RequestCancelled):
        om.ask(Q, strategy="top1", k=1, max_new_tokens=400, cancel=token)
    assert time.perf_counter() - t0 < 3.0


def test_expert_deadline_stops_local_decoding(om) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ExpertTimeout):
        om.pool.generate("engineering", [{"role": "user", "content": Q}], GenerationConfig(max_new_tokens=400),
                         cancel=CancelToken(timeout_s=0.3))
    assert time.perf_counter() - t0 < 3.0
    # the decoding itself stopped at a step boundary (not after 400 tokens): the backend is free again
    assert om.local._lock.acquire(timeout=LOCK_WAIT_S)
    om.local._lock.release()
    token = CancelToken(timeout_s=0.5)
    g = om.local.generate_rows([("engineering", [{"role": "user", "content": Q}])],
                               replace(GenerationConfig(max_new_tokens=400), stop=()), [token])[0]
    assert g.finish_reason == "cancelled" and g.tokens < 400


def test_batcher_drops_cancelled_queued_jobs_and_rejects_bad_settings(om) -> None:
    from experts.backends.batcher import DynamicBatcher

    for bad in (math.inf, math.nan, -1):
        with pytest.raises(InputError):
            DynamicBatcher(om.local, max_wait_ms=bad)
    b = DynamicBatcher(om.local, max_batch_size=1, max_wait_ms=0)
    try:
        msgs = [{"role": "user", "content": Q}]
        long = threading.Thread(target=lambda: b.generate([("engineering", msgs)], GenerationConfig(max_new_tokens=60)))
        long.start()
        time.sleep(0.3)
        token = CancelToken()
        threading.Timer(0.2, token.cancel).start()
        t0 = time.perf_counter()
        with pytest.raises(RequestCancelled):
            b.generate([("finance", msgs)], GenerationConfig(max_new_tokens=60), cancel=token)
        assert time.perf_counter() - t0 < 1.0  # the queued job's caller is released at once
        long.join()
        assert b.generate([("finance", msgs)], GenerationConfig(max_new_tokens=2))[0].tokens <= 2
    finally:
        b.close()


def test_adapters_verified_before_they_become_experts(om, random_adapters, tmp_path) -> None:
    from experts.backends.local import LocalBackend
    from experts.registry import ExpertSpec

    src = random_adapters["finance"]
    truncated = tmp_path / "truncated"
    shutil.copytree(src, truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    renamed = tmp_path / "renamed"
    shutil.copytree(src, renamed)
    from safetensors.torch import load_file, save_file

    t = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace(".layers.", ".blocks."): v for k, v in t.items()}, str(renamed / "adapter_model.safetensors"))
    backend = LocalBackend(om.local.base)  # the same base in memory; no experts yet
    for path, msg in ((truncated, "not a readable safetensors"), (renamed, "modules the base model does not have")):
        with pytest.raises(AdapterError, match=msg):
            backend.add_expert(ExpertSpec(name="broken", adapter=path))
    assert backend.expert_names() == []


def test_remote_timeout_then_close_never_hangs(random_adapters, tmp_path) -> None:
    """A remote expert that sleeps: ask answers from the other expert, and closing returns promptly."""
    from fault_server import FaultServer

    from orchestrator import Orchestrator

    srv = FaultServer({"product": "slow"})
    try:
        cfg = _config(tmp_path, {k: v for k, v in random_adapters.items() if k != "product"},
                      f'\n[[experts]]\nname = "product"\nbackend = "openai"\nbase_url = "{srv.url}"\ntimeout_s = 1.0\n')
        router = FixedRouter({"product": 0.6, "engineering": 0.4})
        o = Orchestrator.from_config(cfg, router=router)
        t0 = time.perf_counter()
        ans = o.ask(Q, strategy="synthesis", k=2)
        assert ans.text and any(c.expert == "product" and "Timeout" in (c.error or "") for c in ans.contributions)
        assert time.perf_counter() - t0 < 15
        t1 = time.perf_counter()
        o.close()
        assert time.perf_counter() - t1 < 6
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["nonjson", "list"])
def test_malformed_remote_model_list_is_typed(mode) -> None:
    from fault_server import FaultServer

    from expertmix.errors import ExpertUnavailable
    from experts.backends.openai import OpenAIBackend
    from experts.registry import ExpertSpec

    srv = FaultServer({"finance": "ok"}, models_mode=mode)
    try:
        b = OpenAIBackend(srv.url, [ExpertSpec("finance", backend="openai", base_url=srv.url)], check=False)
        try:
            with pytest.raises(ExpertUnavailable, match="OpenAI model list"):
                b.generate([("__base__", [{"role": "user", "content": Q}])], GenerationConfig(max_new_tokens=2))
        finally:
            b.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["fail500", "wrongschema", "nonjson", "closed"])
def test_remote_expert_faults_never_take_the_answer_down(random_adapters, tmp_path, mode) -> None:
    """ask and stream with a remote expert that errors, answers garbage, or is not there at all."""
    from fault_server import FaultServer, _free_port

    from orchestrator import Answer, Orchestrator

    srv = None if mode == "closed" else FaultServer({"product": mode})
    url = srv.url if srv else f"http://127.0.0.1:{_free_port()}/v1"
    try:
        cfg = _config(tmp_path, {k: v for k, v in random_adapters.items() if k != "product"},
                      f'\n[[experts]]\nname = "product"\nbackend = "openai"\nbase_url = "{url}"\ntimeout_s = 5.0\n')
        with Orchestrator.from_config(cfg, router=FixedRouter({"product": 0.6, "engineering": 0.4})) as o:
            ans = o.ask(Q, strategy="top1", k=2)
            failed = [c for c in ans.contributions if c.expert == "product"]
            assert ans.text and failed and failed[0].error and ans.weights == {"engineering": 1.0}
            assert failed[0].error.split(":")[0] in ("ExpertUnavailable", "InputError", "ExpertTimeout")
            items = list(o.stream(Q, strategy="top1", k=2))
            assert isinstance(items[-1], Answer) and items[-1].text
            assert any(c.expert == "product" and c.error for c in items[-1].contributions)
    finally:
        if srv:
            srv.stop()
