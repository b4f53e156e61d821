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

SHARED_DATA = Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))


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

    return resolve_base()[1]


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

    base = load_base()
    return LocalBackend(base, [ExpertSpec(name=n, adapter=p) for n, p in random_adapters.items()])
