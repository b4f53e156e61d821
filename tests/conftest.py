"""Shared fixtures: real SmolLM2 base (converted once, cached), small random LoRA adapters, env isolation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# The converted base model is cached across test runs (CI sets its own EXPERTMIX_HOME).
os.environ.setdefault("EXPERTMIX_HOME", str(REPO / ".expertmix-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test processes share the CPU: OpenBLAS's busy-waiting threads (scikit-learn's fits in
    # `router train`) ran ~1.5x slower next to a busy torch process than single-threaded ones
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SHARED_DATA = Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))
# The model-backed fixtures run on another base or device when these are set (the GPU check runs
# the backend tests on CUDA in float32 this way); unset, the embedded default on "auto".
TEST_BASE = os.environ.get("EXPERTMIX_TEST_BASE")
TEST_DEVICE = os.environ.get("EXPERTMIX_TEST_DEVICE", "auto")
TEST_DTYPE = os.environ.get("EXPERTMIX_TEST_DTYPE", "auto")


# Tests that take tens of seconds to minutes (docs pages run every command; benches load models in
# a fresh process; not whole modules whose fixture starts a server, which would then start on every
# worker). Under pytest-xdist (`make test`) they are spread over the workers first, so
# none is left running alone at the end; the README page is the longest.
_LONG = ("test_docs.py::test_command_blocks_run[README.md]", "test_docs.py::test_command_blocks_run",
         "test_benches.py::test_bench_smoke", "test_models.py::test_concurrent_first_loads",
         "test_models.py::test_cached_load")


def _rank(item: pytest.Item) -> int:
    for i, key in enumerate(_LONG):
        if key in item.nodeid:
            return i
    return len(_LONG) if item.get_closest_marker("slow") else -1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist's ``worksteal`` (each worker first gets one contiguous share of the list), start
    every share with its part of the long tests."""
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if n < 2:
        return
    ranked = [(r, i, it) for i, it in enumerate(items) if (r := _rank(it)) >= 0]
    long = [it for _, _, it in sorted(ranked, key=lambda t: (t[0], t[1]))]
    chosen = {id(it) for it in long}
    rest = [it for it in items if id(it) not in chosen]
    out: list[pytest.Item] = []
    left = len(items)
    for w in range(n):
        size = left // (n - w)
        left -= size
        share = long[w::n]
        take = max(0, size - len(share))
        out += share + rest[:take]
        rest = rest[take:]
    items[:] = out + rest


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may set environment variables freely; they are restored afterwards."""
    for key in list(os.environ):
        if key.startswith("EXPERTMIX_") and key != "EXPERTMIX_HOME":
            monkeypatch.setenv(key, os.environ[key])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set EXPERTMIX_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def base_path() -> str:
    from experts.models import resolve_base

    return resolve_base(TEST_BASE)[1] if TEST_BASE else resolve_base()[1]


@pytest.fixture(scope="session")
def random_adapters(base_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three LoRA adapters with non-zero random weights, named like the shipped experts."""
    from helpers import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_random_adapter(base_path, root / name, seed=i, scale=0.05)
        for i, name in enumerate(["finance", "engineering", "product"])
    }


@pytest.fixture(scope="session")
def local_backend(base_path: str, random_adapters: dict[str, Path]):
    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec

    base = load_base(TEST_BASE, device=TEST_DEVICE, dtype=TEST_DTYPE) if TEST_BASE else load_base(
        device=TEST_DEVICE, dtype=TEST_DTYPE)
    return LocalBackend(base, [ExpertSpec(name=n, adapter=p) for n, p in random_adapters.items()])
