"""End to end against a real vLLM (CPU build) serving the experts as LoRA adapters.

Needs ``make vllm-env`` (.venv-vllm); skipped otherwise. CI does not run it: vLLM takes
~40 s to start and its install ~5 min, on a 2-core runner whose 90 minutes are spent on
the main suite. Run it with ``pytest -m vllm tests/integration`` (about 1–2 min).

Uses the shipped adapters when they exist, else random adapters of the same shape.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
EXPERTS = ("finance", "engineering", "product")
Q_FIN = "What is EBITDA and how do I compute it from an income statement?"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PY.exists(), reason="vLLM virtualenv .venv-vllm absent (make vllm-env)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_command(base_path: str, adapters: dict[str, Path], port: int) -> list[str]:
    """The command docs/serving.md documents, for these adapters (``__base__`` = an all-zero adapter)."""
    return [
        str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_path, "--dtype", "float32",
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(adapters)),
        "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
        "--host", "127.0.0.1", "--port", str(port),
    ]


def start_vllm(base_path: str, adapters: dict[str, Path], *, log: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(vllm_command(base_path, adapters, port), stdout=fh, stderr=subprocess.STDOUT, env=env,
                            cwd=str(log.parent))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vLLM did not start; log tail:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def adapters(random_adapters: dict[str, Path]) -> dict[str, Path]:
    shipped = REPO / "experts" / "default" / "adapters"
    if all((shipped / n / "adapter_config.json").is_file() for n in EXPERTS):
        return {n: shipped / n for n in EXPERTS}
    return random_adapters


@pytest.fixture(scope="module")
def vllm(base_path: str, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from helpers import make_random_adapter

    work = tmp_path_factory.mktemp("vllm")
    zero = make_random_adapter(base_path, work / "zero", seed=0, scale=0.0)
    log = work / "vllm.log"
    proc, url = start_vllm(base_path, {**adapters, "__base__": zero}, log=log)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_vllm_serves_the_adapters_by_name(vllm: str, base_path: str) -> None:
    models = {m["id"]: m for m in httpx.get(vllm + "/models").json()["data"]}
    assert set(EXPERTS) <= set(models)
    assert all(models[n]["parent"] == base_path for n in EXPERTS)


def test_orchestrator_on_vllm_end_to_end(vllm: str, adapters: dict[str, Path]) -> None:
    from experts.backends.base import GenerationConfig
    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings
    from orchestrator.core import Orchestrator
    from orchestrator.routing import Router

    specs = tuple(ExpertSpec(name=n, backend="openai", base_url=vllm) for n in EXPERTS)
    cfg = ExpertmixConfig(path=None, experts=specs, orchestrator=OrchestratorSettings(max_new_tokens=16))
    with Orchestrator(cfg, router=Router.load()) as om:
        answer = om.ask(Q_FIN, k=2)
        assert answer.text and answer.fallback is None
        assert [c.error for c in answer.contributions] == [None, None]
        assert answer.contributions[0].expert == "finance"
        top1 = om.ask(Q_FIN, k=1, strategy="top1")
        # vLLM's greedy decode of the adapter equals transformers + peft, token for token
        local = LocalBackend(load_base(), [ExpertSpec(name="finance", adapter=adapters["finance"])])
        ref = local.generate([("finance", [{"role": "user", "content": Q_FIN}])], GenerationConfig(max_new_tokens=16))[0]
        assert top1.text == ref.text


def test_base_rows_stay_base_when_batched_with_adapters(vllm: str) -> None:
    """vLLM-cpu 0.32.0 decodes a root-model row with an adapter when batched with LoRA rows;
    the zero adapter served as ``__base__`` (docs/serving.md) keeps it the base model."""
    from experts.backends.base import GenerationConfig
    from experts.backends.local import LocalBackend
    from experts.backends.openai import OpenAIBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec

    msgs = [{"role": "user", "content": Q_FIN}]
    gen = GenerationConfig(max_new_tokens=16)
    remote = OpenAIBackend(vllm, [ExpertSpec(name=n, backend="openai", base_url=vllm) for n in EXPERTS])
    try:
        assert remote._base_model == "__base__"
        outs = remote.generate([("__base__", msgs), ("finance", msgs), ("engineering", msgs)], gen)
    finally:
        remote.close()
    ref = LocalBackend(load_base()).generate([("__base__", msgs)], gen)[0]
    assert outs[0].text == ref.text
