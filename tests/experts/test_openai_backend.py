"""The HTTP expert backend against real servers on loopback.

* a fault-injecting OpenAI-protocol server (its own process: it can die mid-request)
  that answers, returns 500s, flakes, refuses with 400, or answers too slowly;
* a second live ``expertmix serve`` over random-adapter experts acting as the expert
  server (two tiers: orchestrator → HTTP → orchestrator's local backend).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from experts.backends.base import GenerationConfig  # noqa: E402
from experts.registry import ExpertSpec  # noqa: E402
from expertmix.errors import ExpertTimeout, ExpertUnavailable, InputError, StrategyError  # noqa: E402

from fault_server import FaultServer, _free_port  # noqa: E402

Q_FIN = "What is EBITDA and how do I compute it from an income statement?"
GEN = GenerationConfig(max_new_tokens=4)

MODES = {"good": "ok", "good2": "ok", "fail500": "fail500", "slow": "slow", "flaky": "flaky", "bad400": "bad400"}


@pytest.fixture(scope="module")
def faults():
    srv = FaultServer(MODES)
    yield srv
    srv.stop()


def _spec(name: str, url: str, remote: str | None = None, timeout_s: float | None = None) -> ExpertSpec:
    return ExpertSpec(name=name, backend="openai", base_url=url, remote_name=remote, timeout_s=timeout_s)


def _backend(url: str, *specs: ExpertSpec, **kw):
    from experts.backends.openai import OpenAIBackend

    return OpenAIBackend(url, list(specs), backoff_s=0.05, **kw)


def _m(q: str = Q_FIN) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


# -- the backend alone against the fault server ---------------------------------------------------------
def test_generate_sends_the_adapter_name_and_reads_usage(faults) -> None:
    b = _backend(faults.url, _spec("finance", faults.url, "good"), _spec("engineering", faults.url, "good2"))
    try:
        assert b.local_weights is False and b.expert_names() == ["finance", "engineering"]
        outs = b.generate([("finance", _m()), ("engineering", _m()), ("__base__", _m())], GEN)
        assert [o.text for o in outs] == ["answer from good", "answer from good2", "answer from tiny-base"]
        assert outs[0].tokens == 3 and outs[0].prompt_tokens == 11 and outs[0].finish_reason == "stop"
        assert "".join(b.stream("finance", _m(), GEN)).strip() == "answer from good"
    finally:
        b.close()


def test_5xx_is_retried_with_backoff_then_typed(faults) -> None:
    b = _backend(faults.url, _spec("engineering", faults.url, "fail500"), _spec("finance", faults.url, "flaky"),
                 max_retries=2)
    try:
        before = faults.calls().get("fail500", 0)
        with pytest.raises(ExpertUnavailable) as info:
            b.generate([("engineering", _m())], GEN)
        assert info.value.status_code == 500 and "injected failure" in str(info.value)
        assert info.value.expert == "engineering"
        assert faults.calls()["fail500"] - before == 3  # first try + 2 retries
        assert b.generate([("finance", _m())], GEN)[0].text == "answer from flaky"  # 503 once, then fine
        # several rows: errors travel one way — the first failure raises, typed (the orchestrator sends
        # remote rows one per call, so one expert's failure stays its own)
        with pytest.raises(ExpertUnavailable):
            b.generate([("engineering", _m()), ("__base__", _m())], GEN)
    finally:
        b.close()


def test_timeout_400_and_unknown_model_are_typed(faults) -> None:
    b = _backend(faults.url, _spec("product", faults.url, "slow", timeout_s=0.5), _spec("finance", faults.url, "bad400"))
    try:
        t0 = time.monotonic()
        with pytest.raises(ExpertTimeout):
            b.generate([("product", _m())], GEN)
        assert time.monotonic() - t0 < 3
        with pytest.raises(InputError, match="prompt too long"):
            b.generate([("finance", _m())], GEN)
    finally:
        b.close()


def test_startup_check_names_every_missing_expert(faults) -> None:
    with pytest.raises(ExpertUnavailable) as info:
        _backend(faults.url, _spec("finance", faults.url, "good"), _spec("legal", faults.url), _spec("hr", faults.url))
    msg = str(info.value)
    assert "legal" in msg and "hr" in msg and "--lora-modules" in msg and "good" in msg


def test_unreachable_server_starts_then_fails_typed(caplog) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    b = _backend(url, _spec("finance", url), max_retries=1)
    try:
        assert "not reachable" in caplog.text
        with pytest.raises(ExpertUnavailable, match="ConnectError"):
            b.generate([("finance", _m())], GEN)
    finally:
        b.close()


def test_server_killed_mid_request_is_an_expert_failure() -> None:
    dying = FaultServer({"doomed": "die"})
    b = _backend(dying.url, _spec("finance", dying.url, "doomed"), max_retries=1)
    try:
        with pytest.raises(ExpertUnavailable) as info:
            b.generate([("finance", _m())], GEN)
        assert info.value.expert == "finance"
        assert dying.proc.wait(timeout=10) == 1  # it really died
    finally:
        b.close()
        dying.stop()


# -- the orchestrator over faulty experts, served over HTTP ---------------------------------------------
@pytest.fixture(scope="module")
def router():
    from orchestrator.routing import Router

    return Router.load()


def _config(specs: list[ExpertSpec], **orch):
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings

    return ExpertmixConfig(path=None, experts=tuple(specs),
                           orchestrator=OrchestratorSettings(max_new_tokens=4, expert_timeout_s=30, **orch))


def _serve_and_ask(om, **extra):
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    with BackgroundServer(create_app(om)) as srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
        r = c.chat.completions.create(model="expertmix", messages=_m(), max_tokens=4, extra_body=extra)
        metrics = httpx.get(srv.url + "/metrics").text
    return r, metrics


def test_answer_survives_500s_and_a_slow_expert(faults, router) -> None:
    from orchestrator.core import Orchestrator

    url = faults.url
    cfg = _config([_spec("finance", url, "good"), _spec("engineering", url, "fail500"),
                   _spec("product", url, "slow", timeout_s=1.0)], strategy="synthesis")
    with Orchestrator(cfg, router=router) as om:
        r, metrics = _serve_and_ask(om, k=3)
    trace = r.model_extra["expertmix"]
    assert r.choices[0].message.content == "answer from good"
    assert trace["weights"] == {"finance": 1.0}  # renormalized over the survivor
    errors = {c["expert"]: c["error"] for c in trace["contributions"]}
    assert errors["finance"] is None
    assert "ExpertUnavailable" in errors["engineering"] and "500" in errors["engineering"]
    assert "ExpertTimeout" in errors["product"]
    assert 'expertmix_expert_failures_total{expert="engineering"} 1.0' in metrics
    assert 'expertmix_expert_failures_total{expert="product"} 1.0' in metrics


def test_answer_survives_an_expert_server_killed_mid_request(faults, router) -> None:
    from orchestrator.core import Orchestrator

    dying = FaultServer({"doomed": "die"})
    try:
        cfg = _config([_spec("engineering", faults.url, "good"), _spec("product", faults.url, "good2"),
                       _spec("finance", dying.url, "doomed")], strategy="synthesis")
        with Orchestrator(cfg, router=router) as om:
            r, _ = _serve_and_ask(om, k=3)
    finally:
        dying.stop()
    trace = r.model_extra["expertmix"]
    errors = {c["expert"]: c["error"] for c in trace["contributions"]}
    assert errors["finance"] and errors["engineering"] is None and errors["product"] is None
    assert set(trace["weights"]) == {"engineering", "product"}
    assert abs(sum(trace["weights"].values()) - 1) < 1e-9
    assert r.choices[0].message.content == "answer from tiny-base"  # the aggregator (remote base) merged them


# -- two tiers: the HTTP backend against a live expertmix serve ------------------------------------------
@pytest.fixture(scope="module")
def expert_tier(random_adapters: dict[str, Path], router):
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings
    from orchestrator.core import Orchestrator
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    cfg = ExpertmixConfig(path=None, experts=tuple(ExpertSpec(name=n, adapter=p) for n, p in random_adapters.items()),
                          orchestrator=OrchestratorSettings(max_new_tokens=4))
    with Orchestrator(cfg, router=router) as om, BackgroundServer(create_app(om)) as srv:
        yield om, srv.url + "/v1"


def test_two_tiers_remote_experts_equal_local_ones(expert_tier, router) -> None:
    from orchestrator.core import Orchestrator

    local_om, url = expert_tier
    cfg = _config([_spec(n, url) for n in ("finance", "engineering", "product")])
    with Orchestrator(cfg, router=router) as om:
        assert om.local is None  # nothing loaded in the front tier
        backend = om.routes["finance"]
        assert backend._base_model == local_om.config.base.model  # __base__ = the experts' parent
        answer = om.ask(Q_FIN, k=2, max_new_tokens=4, strategy="synthesis")
        assert answer.text and answer.fallback is None
        assert [c.error for c in answer.contributions] == [None, None]
        # the remote expert says exactly what it says locally with the same decoding settings
        # (the front tier's repetition_penalty travels with the request, not the defaults)
        same = om.generation_config(max_new_tokens=4)
        assert same.repetition_penalty == 1.1
        for c in answer.contributions:
            assert c.text == local_om.local.generate([(c.expert, _m())], same)[0].text
        streamed = [x for x in om.stream(Q_FIN, k=1, max_new_tokens=4, strategy="top1") if isinstance(x, str)]
        assert "".join(streamed).strip() == local_om.local.generate([("finance", _m())], same)[0].text
        with pytest.raises(StrategyError, match="needs local adapter weights"):
            om.ask(Q_FIN, strategy="mixture", max_new_tokens=4)
