"""Live add/remove of ``backend = "openai"`` experts: forwarded to vLLM's /v1/load_lora_adapter and
/v1/unload_lora_adapter (a loopback stand-in for vLLM, tests/server/vllm_fake.py), through our server
and through ``expertmix experts add/remove --backend openai``. No local model: every expert is remote."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
typer_testing = pytest.importorskip("typer.testing")

from srvutil import AUTH, KEY, Q_FIN, err, msgs
from vllm_fake import fake_vllm_app

LEGAL = "/srv/loras/legal"  # paths "on the vLLM host"
LEGAL_DESCR = "Law: contracts, leases, lawsuits, court cases, attorneys and legal compliance."
LEGAL_EXAMPLES = ["Can my landlord keep my deposit?", "How do I sue someone in small claims court?"]
Q_LEGAL = "Can I sue my landlord for breaking the lease contract?"


@pytest.fixture(scope="module")
def vllm():
    """Two vLLM servers: A allows runtime LoRA updating (finance, product), B does not (engineering)."""
    from orchestrator.server.background import BackgroundServer

    a = fake_vllm_app(
        static=("finance", "product"), host_paths=(LEGAL, "/srv/loras/corrupt", "/srv/loras/hr")
    )
    b = fake_vllm_app(static=("engineering",), host_paths=(LEGAL,), runtime_updating=False)
    with BackgroundServer(a) as sa, BackgroundServer(b) as sb:
        sa.app, sb.app = a, b  # type: ignore[attr-defined]
        sa.v1, sb.v1 = sa.url + "/v1", sb.url + "/v1"  # type: ignore[attr-defined]
        yield sa, sb


@pytest.fixture(scope="module")
def remote_server(vllm, router):
    from experts.registry import ExpertSpec
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings, ServerSettings
    from orchestrator.core import Orchestrator
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    a, b = vllm
    experts = [
        ExpertSpec(name=n, backend="openai", base_url=url, description=f"{n} questions")
        for n, url in (("finance", a.v1), ("engineering", b.v1), ("product", a.v1))
    ]
    config = ExpertmixConfig(
        path=None,
        experts=tuple(experts),
        orchestrator=OrchestratorSettings(max_new_tokens=4, strategy="top1", planner="none"),
        server=ServerSettings(api_key=KEY, router_watch_s=0),
    )
    with Orchestrator(config, router=router) as om, BackgroundServer(create_app(om)) as srv:
        srv.om = om  # type: ignore[attr-defined]
        yield srv


def _post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, headers=AUTH, json=body, timeout=60)


def _models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH, timeout=10).json()["data"]}


def test_remote_load_is_forwarded_listed_routed_and_unloaded(remote_server, vllm) -> None:
    a, _ = vllm
    load = {
        "lora_name": "legal",
        "lora_path": LEGAL,
        "backend": "openai",
        "description": LEGAL_DESCR,
        "examples": LEGAL_EXAMPLES,
    }

    def ask(_: int) -> int:
        return _post(
            remote_server,
            "/v1/chat/completions",
            {"model": "expertmix", "messages": msgs(Q_FIN), "max_tokens": 4},
        ).status_code

    with cf.ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(ask, i) for i in range(10)]
        r = _post(remote_server, "/v1/load_lora_adapter", {**load, "base_url": a.v1})
        codes = [f.result() for f in futures]
    assert r.status_code == 200 and "legal" in r.text, r.text
    assert codes == [200] * 10, codes
    assert (
        "load",
        {"lora_name": "legal", "lora_path": LEGAL},
    ) in a.app.state.calls  # vLLM's shape, forwarded
    assert "legal" in _models(remote_server.url) and "legal" in _models(a.url)
    try:
        answer = _post(remote_server, "/v1/chat/completions", {"model": "legal", "messages": msgs(Q_FIN)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "answer from legal"  # by the remote
        routed = _post(remote_server, "/v1/route", {"input": [Q_LEGAL, Q_FIN]}).json()["data"]
        assert routed[0]["experts"][0]["name"] == "legal" and "live expert 'legal'" in routed[0]["reason"]
        assert routed[1]["experts"][0]["name"] == "finance"
        routed_answer = _post(
            remote_server, "/v1/chat/completions", {"model": "expertmix", "messages": msgs(Q_LEGAL)}
        )
        assert routed_answer.json()["choices"][0]["message"]["content"] == "answer from legal"
        again = _post(remote_server, "/v1/load_lora_adapter", {**load, "base_url": a.v1})
        assert again.status_code == 400 and "already loaded" in err(again)["message"]
    finally:
        r = _post(remote_server, "/v1/unload_lora_adapter", {"lora_name": "legal"})
    assert r.status_code == 200, r.text
    assert ("unload", {"lora_name": "legal"}) in a.app.state.calls
    assert "legal" not in _models(remote_server.url) and "legal" not in _models(a.url)
    gone = _post(remote_server, "/v1/chat/completions", {"model": "legal", "messages": msgs(Q_FIN)})
    assert gone.status_code == 404
    routed = _post(remote_server, "/v1/route", {"input": Q_LEGAL}).json()["data"][0]
    assert "legal" not in {e["name"] for e in routed["experts"]}


def test_remote_refusals_are_typed_4xx_and_leave_nothing_visible(remote_server, vllm) -> None:
    a, b = vllm
    om = remote_server.om
    before = (list(om.expert_names), dict(om.routes), om.router)
    base = {"lora_name": "legal", "backend": "openai", "description": LEGAL_DESCR}
    cases = [
        # B runs without VLLM_ALLOW_RUNTIME_LORA_UPDATING: the route itself is missing there
        ({**base, "lora_path": LEGAL, "base_url": b.v1}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
        ({**base, "lora_path": "/srv/loras/missing", "base_url": a.v1}, "No adapter found"),
        ({**base, "lora_path": "/srv/loras/corrupt", "base_url": a.v1}, "invalid adapter_config.json"),
        ({**base, "lora_path": LEGAL}, "say which with base_url"),  # two expert servers: which one?
        (
            {**base, "lora_path": LEGAL, "base_url": "http://10.0.0.1:9/v1"},
            "not an expert server of this config",
        ),
        ({**base, "lora_name": "Legal Dept", "lora_path": LEGAL, "base_url": a.v1}, "invalid expert name"),
        ({**base, "lora_path": LEGAL, "base_url": a.v1, "backend": "local"}, "base_url names a remote"),
    ]
    for body, says in cases:
        r = _post(remote_server, "/v1/load_lora_adapter", body)
        assert r.status_code == 400, (body, r.text)
        assert says in err(r)["message"], (says, r.text)
    assert (list(om.expert_names), dict(om.routes), om.router) == before
    assert "legal" not in _models(remote_server.url) and "legal" not in _models(a.url)
    assert (
        _post(remote_server, "/v1/chat/completions", {"model": "legal", "messages": msgs(Q_FIN)}).status_code
        == 404
    )
    # unloading a config-time expert on B (no runtime updating there) is refused and it stays
    r = _post(remote_server, "/v1/unload_lora_adapter", {"lora_name": "engineering"})
    assert r.status_code == 400 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in err(r)["message"]
    assert "engineering" in _models(remote_server.url)


def test_backend_adapter_calls_are_typed(vllm) -> None:
    from expertmix.errors import AdapterError, ExpertUnavailable, UnknownExpert
    from experts.backends.openai import OpenAIBackend

    a, b = vllm
    on = OpenAIBackend(a.v1, [], check=False)
    off = OpenAIBackend(b.v1, [], check=False)
    gone = OpenAIBackend("http://127.0.0.1:9/v1", [], check=False, connect_timeout_s=1)
    try:
        with pytest.raises(AdapterError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            off.load_adapter("hr", LEGAL)
        with pytest.raises(AdapterError, match="No adapter found"):
            on.load_adapter("hr", "/srv/loras/nope")
        with pytest.raises(UnknownExpert):
            on.unload_adapter("hr")
        with pytest.raises(ExpertUnavailable):
            gone.load_adapter("hr", LEGAL)
        assert on.expert_names() == []
        on.load_adapter("hr", "/srv/loras/hr")
        assert on.expert_names() == ["hr"] and "hr" in _models(a.url)
        on.unload_adapter("hr")
        assert on.expert_names() == [] and "hr" not in _models(a.url)
    finally:
        for x in (on, off, gone):
            x.close()


# -- expertmix experts add/remove --backend openai -----------------------------------------------------------
@pytest.fixture()
def remote_config(tmp_path: Path, vllm, monkeypatch: pytest.MonkeyPatch) -> Path:
    a, _ = vllm
    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path / "home"))  # no port file of another server
    monkeypatch.delenv("EXPERTMIX_SERVER", raising=False)
    p = tmp_path / "expertmix.toml"
    p.write_text(
        "# vLLM-served departments (this comment must survive edits)\n"
        + "".join(
            f'[[experts]]\nname = "{n}"\ndescription = "{n} questions"\n'
            f'backend = "openai"\nbase_url = "{a.v1}"\n\n'
            for n in ("finance", "product")
        ),
        encoding="utf-8",
    )
    return p


def _run(*args: str) -> typer_testing.Result:
    from orchestrator.cli import app

    return typer_testing.CliRunner().invoke(app, list(args))


def test_cli_add_remote_writes_the_config_only_when_vllm_loaded_it(remote_config: Path, vllm) -> None:
    from orchestrator.config import load_config

    a, b = vllm
    original = remote_config.read_text()
    for extra, says in (
        (["--adapter", "/srv/loras/missing"], "No adapter found"),
        (["--adapter", LEGAL, "--base-url", b.v1], "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    ):
        r = _run(
            "experts",
            "add",
            "legal",
            "--backend",
            "openai",
            "--description",
            LEGAL_DESCR,
            *extra,
            "--config",
            str(remote_config),
        )
        assert r.exit_code == 1 and says in r.output, r.output
        assert remote_config.read_text() == original  # refused: the file is untouched
    assert "legal" not in _models(a.url)

    r = _run(
        "experts",
        "add",
        "legal",
        "--backend",
        "openai",
        "--adapter",
        LEGAL,
        "--description",
        LEGAL_DESCR,
        "--config",
        str(remote_config),
    )  # base_url: the one the config's openai experts use
    assert r.exit_code == 0, r.output
    assert a.app.state.loaded.get("legal") == LEGAL
    legal = {e.name: e for e in load_config(remote_config).experts}["legal"]
    assert (legal.backend, legal.base_url, legal.description) == ("openai", a.v1, LEGAL_DESCR)
    text = remote_config.read_text()
    assert "this comment must survive edits" in text and f"--lora-modules legal={LEGAL}" in text

    r = _run("experts", "remove", "legal", "--config", str(remote_config))
    assert r.exit_code == 0 and "unloaded" in r.output, r.output
    assert "legal" not in a.app.state.loaded
    assert [e.name for e in load_config(remote_config).experts] == ["finance", "product"]


def test_cli_add_remote_goes_through_a_running_server(
    remote_config: Path, remote_server, vllm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.config import load_config

    a, _ = vllm
    monkeypatch.setenv("EXPERTMIX_API_KEY", KEY)
    original = remote_config.read_text()
    r = _run(
        "experts",
        "add",
        "hr",
        "--backend",
        "openai",
        "--adapter",
        "/srv/loras/nope",
        "--description",
        "People: hiring, payroll",
        "--base-url",
        a.v1,
        "--config",
        str(remote_config),
        "--server",
        remote_server.url,
    )
    assert r.exit_code == 1 and "No adapter found" in r.output and remote_config.read_text() == original
    r = _run(
        "experts",
        "add",
        "hr",
        "--backend",
        "openai",
        "--adapter",
        "/srv/loras/hr",
        "--description",
        "People: hiring, payroll",
        "--base-url",
        a.v1,
        "--config",
        str(remote_config),
        "--server",
        remote_server.url,
    )
    assert r.exit_code == 0, r.output
    try:
        assert "hr" in _models(remote_server.url) and "hr" in _models(a.url)
        assert "hr" in [e.name for e in load_config(remote_config).experts]
    finally:
        r = _run("experts", "remove", "hr", "--config", str(remote_config), "--server", remote_server.url)
    assert r.exit_code == 0, r.output
    assert "hr" not in _models(remote_server.url) and "hr" not in _models(a.url)
    assert "hr" not in [e.name for e in load_config(remote_config).experts]
