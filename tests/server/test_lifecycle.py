"""Live lifecycle on a running server: /v1/route, router reload under load, feedback,
vLLM-shaped /v1/load_lora_adapter and /v1/unload_lora_adapter (validated, rooted, key required)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from srvutil import AUTH, KEY, Q_ENG, Q_FIN, err, msgs


def _post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + path, headers=AUTH, json=body, timeout=120, **kw)


def test_route_endpoint_routes_without_generating(server) -> None:
    r = _post(server, "/v1/route", {"input": Q_FIN})
    assert r.status_code == 200, r.text
    one = r.json()["data"][0]
    assert one["experts"][0]["name"] == "finance" and one["router_version"]
    many = _post(server, "/v1/route", {"input": [Q_FIN, Q_ENG], "k": 1}).json()["data"]
    assert [d["experts"][0]["name"] for d in many] == ["finance", "engineering"]
    assert all(len(d["experts"]) <= 1 for d in many)
    assert err(_post(server, "/v1/route", {"input": []}))["param"] == "input"
    assert _post(server, "/v1/route", {"input": "x", "bogus": 1}).status_code == 400
    assert httpx.post(server.url + "/v1/route", json={"input": "x"}).status_code == 401


def test_router_reload_during_concurrent_requests(server) -> None:
    def ask(_: int) -> int:
        return _post(server, "/v1/chat/completions", {"model": "expertmix", "messages": msgs(Q_FIN), "max_tokens": 4,
                                                      "strategy": "top1"}).status_code

    with cf.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(ask, i) for i in range(20)]
        reload = _post(server, "/admin/reload", {})
        codes = [f.result() for f in futures]
    assert reload.status_code == 200, reload.text
    assert reload.json()["version"] and set(reload.json()["labels"]) == {"finance", "engineering", "product"}
    assert codes == [200] * 20, codes
    assert _post(server, "/v1/route", {"input": Q_FIN}).json()["data"][0]["router_version"] == reload.json()["version"]


def test_feedback_is_appended_and_validated(server, client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    answer = client.chat.completions.create(model="expertmix", messages=msgs(Q_FIN), max_tokens=4,
                                            extra_body={"strategy": "top1"})
    r = _post(server, "/v1/feedback", {"id": answer.id, "rating": "bad", "expert": "engineering",
                                        "text": Q_FIN, "comment": "wrong department"})
    assert r.status_code == 200, r.text
    lines = (tmp_path / "feedback.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert rec["id"] == answer.id and rec["expert"] == "engineering" and rec["text"] == Q_FIN
    assert err(_post(server, "/v1/feedback", {"id": answer.id, "rating": "meh"}))["code"] == "invalid_input"
    assert "marketing" in err(_post(server, "/v1/feedback", {"id": answer.id, "rating": "bad",
                                                              "expert": "marketing"}))["message"]
    assert len((tmp_path / "feedback.jsonl").read_text().splitlines()) == len(lines)


def test_load_and_unload_lora_adapter(server, om, random_adapters, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(random_adapters["finance"], root / "legal")
    monkeypatch.setenv("EXPERTMIX_ADAPTER_ROOTS", str(root))
    models = lambda: {m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]}

    outside = tmp_path / "elsewhere"
    shutil.copytree(random_adapters["product"], outside)
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "legal", "lora_path": str(outside)})
    assert r.status_code == 400 and "outside the adapter roots" in err(r)["message"]
    assert "legal" not in models()
    (root / "broken").mkdir()
    shutil.copy(random_adapters["finance"] / "adapter_config.json", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(root / "broken")})
    assert r.status_code == 400, r.text
    assert "broken" not in models()

    def ask(i: int) -> int:
        return _post(server, "/v1/chat/completions", {"model": ("finance", "expertmix")[i % 2], "max_tokens": 4,
                                                      "messages": msgs(Q_FIN), "strategy": "top1"}).status_code

    with cf.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(ask, i) for i in range(10)]
        r = _post(server, "/v1/load_lora_adapter", {
            "lora_name": "legal", "lora_path": str(root / "legal"),
            "description": "Law: contracts, leases, lawsuits, court cases, attorneys and legal compliance.",
            "examples": ["Can my landlord keep my deposit?", "How do I sue someone in small claims court?"]})
        codes = [f.result() for f in futures]
    assert r.status_code == 200 and "legal" in r.text, r.text
    assert codes == [200] * 10, codes
    try:
        assert "legal" in models()
        # routable before any retraining: a question close to its examples goes to it, the trace says why
        routed = _post(server, "/v1/route", {"input": ["Can I sue my landlord for breaking the lease contract?",
                                                       Q_FIN]}).json()["data"]
        assert routed[0]["experts"][0]["name"] == "legal" and "live expert 'legal'" in routed[0]["reason"]
        assert routed[1]["experts"][0]["name"] == "finance"  # it does not steal a trained department's question
        answer = _post(server, "/v1/chat/completions", {"model": "legal", "messages": msgs(Q_FIN), "max_tokens": 4})
        assert answer.status_code == 200
        # the same weights as finance: the same greedy answer
        assert answer.json()["choices"][0]["message"]["content"] == om.generate("finance", msgs(Q_FIN),
                                                                                max_new_tokens=4).text
    finally:
        r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "legal"})
    assert r.status_code == 200, r.text
    assert "legal" not in models()
    gone = _post(server, "/v1/chat/completions", {"model": "legal", "messages": msgs(Q_FIN), "max_tokens": 4})
    assert gone.status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "legal"}).status_code == 404
    routed = _post(server, "/v1/route", {"input": "Can I sue my landlord for breaking the lease contract?"})
    assert "legal" not in {e["name"] for e in routed.json()["data"][0]["experts"]}


def test_removed_trained_expert_is_never_routed(router, om) -> None:
    from orchestrator.lifecycle import LiveRouter, live_router

    live = live_router(om, router, added={}, removed=frozenset({"product"}))
    assert isinstance(live, LiveRouter) and "product" not in live.labels
    for q in ("Write a user story for a login page.", "Prioritize the roadmap backlog for next quarter."):
        r = live.route(q, k=3)
        assert "product" not in {e.name for e in r.experts} and "product" not in r.probabilities
        assert abs(sum(e.weight for e in r.experts) - 1) < 1e-6


def test_lifecycle_endpoints_need_a_key(om, local_config) -> None:
    from dataclasses import replace

    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    with BackgroundServer(create_app(om, settings=replace(local_config.server, api_key=None))) as srv:
        r = httpx.post(srv.url + "/admin/reload", json={}, timeout=30)
        assert r.status_code == 403 and err(r)["code"] == "api_key_required"
        r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30)
        assert r.status_code == 403
    assert KEY
