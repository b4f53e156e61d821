"""``router promote`` reaches a running server by itself ([server] router_watch_s): promoted during
20 concurrent ``model=expertmix`` requests → 0 failures and later answers' trace names the new
version, without POST /admin/reload; a broken promoted router is logged, counted, and the old one kept.
The experts are served by a loopback stand-in for vLLM (no local model needed); the router is real."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

pytest.importorskip("fastapi")

from srvutil import AUTH, KEY, Q_FIN, metric, msgs
from vllm_fake import fake_vllm_app


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default store (followed by a config without [router] path): two copies of the shipped router."""
    from router_training.artifact import default_router_path
    from router_training.store import RouterStore

    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    root = tmp_path / "routers"
    for version in ("v0001", "v0002"):
        shutil.copytree(default_router_path(), root / version)
    RouterStore(root).set_current("v0001")
    return root


def _config(url: str, *, watch_s: float, router_path: str | None = None):
    from experts.registry import ExpertSpec
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings, RouterSettings, ServerSettings

    return ExpertmixConfig(
        path=None,
        experts=tuple(
            ExpertSpec(name=n, backend="openai", base_url=url, description=f"{n} questions")
            for n in ("finance", "engineering", "product")
        ),
        router=RouterSettings(path=router_path),
        orchestrator=OrchestratorSettings(max_new_tokens=4, strategy="top1", planner="none"),
        server=ServerSettings(api_key=KEY, router_watch_s=watch_s),
    )


def _version(srv) -> str:
    r = httpx.post(
        srv.url + "/v1/chat/completions",
        headers=AUTH,
        timeout=60,
        json={"model": "expertmix", "messages": msgs(Q_FIN), "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["expertmix"]["router_version"])


def _wait_for(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_promote_is_followed_during_concurrent_requests(store: Path) -> None:
    from orchestrator.core import Orchestrator
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer
    from router_training.store import RouterStore

    with (
        BackgroundServer(fake_vllm_app(static=("finance", "engineering", "product"), delay_s=0.3)) as vllm,
        Orchestrator(_config(vllm.url + "/v1", watch_s=0.2)) as om,
        BackgroundServer(create_app(om)) as srv,
    ):
        assert _version(srv) == "v0001"

        def ask(i: int) -> int:
            time.sleep(i * 0.05)  # spread over ~1 s: some start before the swap, some during, some after
            return httpx.post(
                srv.url + "/v1/chat/completions",
                headers=AUTH,
                timeout=60,
                json={"model": "expertmix", "messages": msgs(Q_FIN), "max_tokens": 4},
            ).status_code

        promoted = threading.Event()

        def promote() -> None:  # what `expertmix router promote v0002` does to the store
            time.sleep(0.05)
            RouterStore(store).promote("v0002", force=True)
            promoted.set()

        with cf.ThreadPoolExecutor(21) as pool:
            futures = [pool.submit(ask, i) for i in range(20)]
            pool.submit(promote).result()
            codes = [f.result() for f in futures]
        assert codes == [200] * 20, codes
        assert promoted.is_set()
        assert _wait_for(lambda: _version(srv) == "v0002"), "the server did not follow the promoted router"
        text = httpx.get(srv.url + "/metrics", headers=AUTH).text
        assert metric(text, "expertmix_router_reloads_total", '{result="reloaded"}') == 1

        # a broken router promoted: logged, counted, the running one kept, requests still answered
        (store / "v0003").mkdir()
        (store / "v0003" / "router.json").write_text("{not json", encoding="utf-8")
        RouterStore(store).set_current("v0003")
        assert _wait_for(
            lambda: (
                'expertmix_router_reloads_total{result="failed"} 1.0'
                in httpx.get(srv.url + "/metrics", headers=AUTH).text
            )
        )
        assert _version(srv) == "v0002"


def test_a_pinned_version_or_zero_is_not_watched(store: Path) -> None:
    from expertmix.errors import ConfigError
    from orchestrator.config import load_config
    from orchestrator.lifecycle import router_pointer, router_watch

    assert router_pointer(_config("http://127.0.0.1:9/v1", watch_s=2)) == store / "CURRENT"
    assert (
        router_pointer(_config("http://127.0.0.1:9/v1", watch_s=2, router_path=str(store)))
        == store / "CURRENT"
    )
    pinned = _config("http://127.0.0.1:9/v1", watch_s=2, router_path=str(store / "v0001"))
    assert router_pointer(pinned) is None and router_watch(SimpleNamespace(config=pinned), 2) is None
    follows = _config("http://127.0.0.1:9/v1", watch_s=2)
    om = SimpleNamespace(config=follows, router=SimpleNamespace(path=store / "v0001"))
    assert router_watch(om, 0) is None and router_watch(om, 2) is not None
    # a router handed over from elsewhere is not replaced by the store's versions
    elsewhere = SimpleNamespace(path=store.parent / "mine" / "v0001")
    assert router_watch(SimpleNamespace(config=follows, router=elsewhere), 2) is None
    bad = store.parent / "bad.toml"
    bad.write_text("[server]\nrouter_watch_s = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="router_watch_s"):
        load_config(bad)
