"""``expertmix serve`` on loopback, driven by the official ``openai`` client and raw httpx.

One session-scoped server over three random-adapter experts on the real SmolLM2 base;
tiny ``max_tokens`` keep it fast on 2 CPU cores. Fault injection against remote experts
lives in tests/experts/test_openai_backend.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from dataclasses import replace

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from srvutil import KEY, Q_ENG, Q_FIN, Q_PROD
from srvutil import err as _err
from srvutil import metric as _metric
from srvutil import msgs as _msgs


def _reference(om, expert: str, q: str, n: int) -> str:
    """The expert's greedy answer through the library (``om.generate``): the server must use the same settings."""
    return om.generate(expert, _msgs(q), max_new_tokens=n).text


# -- happy paths ---------------------------------------------------------------------------------------
def test_models_lists_base_experts_and_expertmix(client, om) -> None:
    models = {m.id: m for m in client.models.list().data}
    base = om.config.base.model
    assert set(models) == {base, "finance", "engineering", "product", "expertmix"}
    for name in ("finance", "engineering", "product"):
        assert models[name].model_extra["parent"] == base
    assert models[base].model_extra["parent"] is None


def test_chat_expertmix_routes_merges_and_reports(client) -> None:
    r = client.chat.completions.create(model="expertmix", messages=_msgs(Q_FIN), max_tokens=6,
                                       extra_body={"k": 2, "strategy": "synthesis"})
    assert r.object == "chat.completion" and r.model == "expertmix"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"  # 6 tokens: the parts were cut at their limit
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    trace = r.model_extra["expertmix"]
    assert trace["strategy"] == "synthesis"
    assert trace["routing"]["experts"][0]["name"] == "finance"
    assert len(trace["contributions"]) == 2 and all(c["error"] is None for c in trace["contributions"])
    assert abs(sum(trace["weights"].values()) - 1) < 1e-6


def test_chat_direct_expert_equals_the_expert_alone(client, om) -> None:
    r = client.chat.completions.create(model="engineering", messages=_msgs(Q_ENG), max_tokens=6)
    assert r.choices[0].message.content == _reference(om, "engineering", Q_ENG, 6)
    assert r.usage.completion_tokens <= 6
    assert r.choices[0].finish_reason in ("stop", "length")
    base = client.chat.completions.create(model="__base__", messages=_msgs(Q_ENG), max_tokens=6)
    assert base.choices[0].message.content == _reference(om, "__base__", Q_ENG, 6)
    alias = client.chat.completions.create(model=om.config.base.model, messages=_msgs(Q_ENG), max_tokens=6)
    assert alias.choices[0].message.content == base.choices[0].message.content


def test_stream_chunks_match_the_plain_answer(client, om) -> None:
    stream = client.chat.completions.create(model="product", messages=_msgs(Q_PROD), max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == _reference(om, "product", Q_PROD, 6)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage


def test_stream_expertmix_carries_the_trace(client) -> None:
    chunks = list(client.chat.completions.create(model="expertmix", messages=_msgs(Q_ENG), max_tokens=6, stream=True,
                                                 extra_body={"strategy": "top1"}))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    trace = final.model_extra["expertmix"]
    assert trace["strategy"] == "top1" and trace["routing"]["experts"][0]["name"] == "engineering"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stop_strings_cut_the_answer(client, om) -> None:
    full = _reference(om, "finance", Q_FIN, 12)
    stop = full.split()[1]  # a word the answer contains
    r = client.chat.completions.create(model="finance", messages=_msgs(Q_FIN), max_tokens=12, stop=[stop])
    assert stop not in r.choices[0].message.content
    assert full.startswith(r.choices[0].message.content.strip())
    assert r.choices[0].finish_reason == "stop"


# -- errors --------------------------------------------------------------------------------------------
def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="marketing", messages=_msgs("hi"), max_tokens=4)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found" and "marketing" in info.value.body["message"]


def test_auth_is_required(server) -> None:
    for key in ("wrong", None):
        kw = {"api_key": key} if key else {"api_key": "x", "default_headers": {"Authorization": ""}}
        with openai.OpenAI(base_url=server.url + "/v1", max_retries=0, **kw) as c:
            with pytest.raises(openai.AuthenticationError) as info:
                c.models.list()
        assert info.value.status_code == 401
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and _err(r)["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "expertmix", "messages": [', 400, None),                       # malformed JSON
        (b'{"model": "expertmix"}', 400, "messages"),                                 # missing field
        (json.dumps({"model": "finance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}), 400, "max_tokens"),
        (json.dumps({"model": "finance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 999}), 400, "max_tokens"),
        (json.dumps({"model": "finance", "messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, "n"),
        (json.dumps({"model": "finance", "messages": [{"role": "wizard", "content": "hi"}]}), 400, None),
        (json.dumps({"model": "finance", "messages": [{"role": "assistant", "content": "hi"}]}), 400, None),
        (json.dumps({"model": "expertmix", "messages": [{"role": "user", "content": "hi"}], "strategy": "vote"}), 400, "strategy"),
        (json.dumps({"model": "finance", "messages": [{"role": "user", "content": "x" * 120_000}]}), 413, None),
    ],
    ids=["malformed-json", "missing-messages", "max-tokens-0", "max-tokens-over-limit", "n-2", "bad-role",
         "last-not-user", "unknown-strategy", "oversized-body"],
)
def test_bad_requests_get_openai_error_bodies(server, body, status, param) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = _err(r)
    if param:
        assert err["param"] is not None and err["param"].startswith(param)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still up


def test_unknown_route_and_prompt_too_long(server) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    assert _err(httpx.get(server.url + "/v1/nothing", headers=h))["type"] == "not_found_error"
    long = " ".join(["word"] * 8300)  # fits the body limit, not the 8k-token context
    big = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=60,
                     json={"model": "finance", "messages": _msgs(long), "max_tokens": 4})
    assert big.status_code == 400, big.text
    assert "context" in _err(big)["message"]


# -- load, batching, metrics ---------------------------------------------------------------------------
def test_100_concurrent_requests_none_lost_and_batched(server, om) -> None:
    questions = [(("finance", Q_FIN), ("engineering", Q_ENG), ("product", Q_PROD), ("__base__", Q_ENG))[i % 4]
                 for i in range(100)]
    refs = {(m, q): _reference(om, m, q, 4) for m, q in set(questions)}
    h = {"Authorization": f"Bearer {KEY}"}

    def one(i: int) -> tuple[int, str, str]:
        model, q = questions[i]
        if i % 10 == 9:  # some routed + merged requests in the mix
            model = "expertmix"
        r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=300,
                       json={"model": model, "messages": _msgs(q), "max_tokens": 4,
                             **({"strategy": "top1"} if model == "expertmix" else {})})
        return r.status_code, model, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text

    with httpx.Client() as _, cf.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert [s for s, _, _ in results] == [200] * 100, [r for r in results if r[0] != 200][:3]
    for i, (_, model, text) in enumerate(results):
        if model != "expertmix":  # batched rows equal each expert decoded alone
            assert text == refs[questions[i]], (i, model)
    metrics = httpx.get(server.url + "/metrics", headers=h).text
    rows = _metric(metrics, "expertmix_batch_rows_sum")
    batches = _metric(metrics, "expertmix_batch_rows_count")
    assert rows / batches > 2, (rows, batches)  # concurrent requests really shared batches


def test_metrics_count_requests_selections_tokens(server, client) -> None:
    client.chat.completions.create(model="expertmix", messages=_msgs(Q_PROD), max_tokens=4, extra_body={"k": 2})
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert _metric(text, "expertmix_requests_total", '{endpoint="chat",model="expertmix",status="200"}') >= 1
    assert _metric(text, "expertmix_expert_selections_total", '{expert="product"}') >= 1
    assert _metric(text, "expertmix_expert_weight_count", '{expert="product"}') >= 1
    assert _metric(text, "expertmix_tokens_total", '{kind="completion",model="expertmix"}') > 0
    assert "expertmix_request_latency_seconds_bucket" in text
    assert "expertmix_abstentions_total" in text and "expertmix_expert_failures_total" in text


def test_abstention_is_counted(server, client) -> None:
    r = client.chat.completions.create(model="expertmix", messages=_msgs("hello"), max_tokens=4)
    assert r.model_extra["expertmix"]["routing"]["abstained"] is True
    assert r.model_extra["expertmix"]["fallback"] == "abstained"
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert _metric(text, "expertmix_abstentions_total") >= 1


def test_overload_is_429_and_the_server_stays_up(om, local_config) -> None:
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    settings = replace(local_config.server, max_queue=1, api_key=None)
    with BackgroundServer(create_app(om, settings=settings, batching=False)) as srv:
        def one(_: int) -> int:
            return httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                              json={"model": "finance", "messages": _msgs(Q_FIN), "max_tokens": 24}).status_code

        with cf.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, range(4)))
        assert 200 in codes and 429 in codes, codes
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                       json={"model": "finance", "messages": _msgs(Q_FIN), "max_tokens": 2})
        assert r.status_code == 200


def test_serve_cli_help_is_light_and_port_errors_are_one_line(tmp_path) -> None:
    import socket
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--api-key" in out.stdout and "--no-batching" in out.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1
    assert busy.stderr.startswith("error: ") and busy.stderr.count("\n") == 1 and str(port) in busy.stderr
