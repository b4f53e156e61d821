"""One real orchestrator (SmolLM2 base + three random-adapter experts) and one loopback server per session.

Tiny ``max_tokens`` keep the tests fast on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from srvutil import KEY

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


@pytest.fixture(scope="session")
def router():
    from orchestrator.routing import Router

    return Router.load()


@pytest.fixture(scope="session")
def local_config(random_adapters: dict[str, Path]):
    from experts.registry import ExpertSpec
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings, ServerSettings

    return ExpertmixConfig(
        path=None,
        experts=tuple(ExpertSpec(name=n, adapter=p, description=f"{n} expert") for n, p in random_adapters.items()),
        orchestrator=OrchestratorSettings(max_new_tokens=6, expert_timeout_s=120),
        server=ServerSettings(api_key=KEY, max_batch_size=16, max_wait_ms=20, max_request_bytes=100_000,
                              max_tokens_limit=64, max_queue=256),
    )


def _orchestrator(config, router):
    import inspect

    from orchestrator.core import Orchestrator

    if "batching" in inspect.signature(Orchestrator.__init__).parameters:
        return Orchestrator(config, router=router, batching=True)
    return Orchestrator(config, router=router)


@pytest.fixture(scope="session")
def om(local_config, router):
    with _orchestrator(local_config, router) as o:
        yield o


@pytest.fixture(scope="session")
def server(om):
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    app = create_app(om)
    with BackgroundServer(app) as srv:
        srv.app = app  # type: ignore[attr-defined]
        yield srv


@pytest.fixture()
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c
