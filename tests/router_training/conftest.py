"""Fixtures for router tests: real MiniLM, small slices of the shared routing data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    return Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "routing" / "train.jsonl").is_file():
        pytest.skip(f"shared data not found at {d} (set EXPERTMIX_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def router_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("expertmix-home")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, router_home: Path) -> None:
    """Caches and stores go to a per-session directory; no user state leaks in."""
    monkeypatch.setenv("EXPERTMIX_HOME", str(router_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _slice(src: Path, dst: Path, per_label: int, *, label_field: str = "label", labels: tuple[str, ...] = ()) -> Path:
    counts: dict[str, int] = {}
    out = []
    for line in src.read_text("utf-8").splitlines():
        rec = json.loads(line)
        lab = rec.get(label_field, "__ood__")
        if labels and lab not in labels:
            continue
        if counts.get(lab, 0) < per_label:
            counts[lab] = counts.get(lab, 0) + 1
            out.append(json.dumps(rec))
    dst.write_text("\n".join(out) + "\n", "utf-8")
    return dst


@pytest.fixture(scope="session")
def small_files(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Slices: 40/label train, 15/label val, 40 OOD train, 20 OOD val."""
    d = tmp_path_factory.mktemp("slices")
    r = shared_data / "routing"
    return {
        "train": _slice(r / "train.jsonl", d / "train.jsonl", 40),
        "val": _slice(r / "val.jsonl", d / "val.jsonl", 15),
        "ood": _slice(r / "ood_train.jsonl", d / "ood.jsonl", 40),
        "ood_val": _slice(r / "ood_val.jsonl", d / "ood_val.jsonl", 20),
        "two": _slice(r / "train.jsonl", d / "two.jsonl", 25, labels=("finance", "engineering")),
    }


@pytest.fixture(scope="session")
def small_router(small_files: dict[str, Path], router_home: Path) -> tuple[Path, dict]:
    """A router trained once per session on the slices (no augmentation, for speed)."""
    os.environ["EXPERTMIX_HOME"] = str(router_home)
    from router_training.train import TrainConfig, train_and_save

    path, metrics = train_and_save(
        str(small_files["train"]),
        val=str(small_files["val"]),
        ood=str(small_files["ood"]),
        ood_val=str(small_files["ood_val"]),
        train_config=TrainConfig(augment=0, c_grid=(1.0, 10.0)),
        store=str(router_home / "store"),
    )
    return Path(path), metrics
