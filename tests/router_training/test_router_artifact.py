"""Training on slices, artifact round trip, integrity checks, store and promote, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from expertmix.errors import DataError, RouterArtifactError, RouterError
from router_training.artifact import RouterStore, encoder_for, load_model, save_model
from router_training.data import load_labeled
from router_training.embed import Encoder
from router_training.train import TrainConfig, fit_router


def _probe_vectors() -> np.ndarray:
    return Encoder().encode(["How do I sort a dict by value?", "What is a bond yield?", "play music"], cache=False)


def test_training_writes_version_and_report(small_router: tuple[Path, dict]) -> None:
    path, metrics = small_router
    assert path.name == "v0001" and RouterStore(path.parent).current() == "v0001"
    for name in ("router.json", "weights.safetensors", "report.json", "report.md", "confusion_matrix.png"):
        assert (path / name).is_file(), name
    meta = json.loads((path / "router.json").read_text())
    assert meta["labels"] == ["engineering", "finance", "product"]
    assert meta["embedding"]["dim"] == 384 and meta["training"]["data_hash"].startswith("sha256:")
    for key in ("n", "accuracy", "macro_f1", "top2_accuracy", "ece", "ood_auroc", "ood_recall", "false_reject_rate"):
        assert metrics[key] is not None, key
    assert metrics["accuracy"] > 0.8
    assert "Most confused pairs" in (path / "report.md").read_text() or metrics["accuracy"] == 1.0
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.joblib"))


def test_round_trip_identical_probabilities(small_router: tuple[Path, dict], tmp_path: Path) -> None:
    model = load_model(small_router[0])
    copy = save_model(model, tmp_path / "copy")
    again = load_model(copy)
    x = _probe_vectors()
    assert np.array_equal(model.predict_proba(x), again.predict_proba(x))
    assert np.array_equal(model.confidence(x, model.predict_proba(x)), again.confidence(x, again.predict_proba(x)))
    assert again.labels == model.labels and again.abstain.threshold == model.abstain.threshold


@pytest.fixture()
def artifact_copy(small_router: tuple[Path, dict], tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_router[0], tmp_path / "art"))


def test_tampered_weights_detected(artifact_copy: Path) -> None:
    w = artifact_copy / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(RouterArtifactError, match="sha256"):
        load_model(artifact_copy)


def test_corrupted_json_and_missing_files(artifact_copy: Path) -> None:
    (artifact_copy / "weights.safetensors").unlink()
    with pytest.raises(RouterArtifactError, match="missing"):
        load_model(artifact_copy)
    (artifact_copy / "router.json").write_text("{ not json")
    with pytest.raises(RouterArtifactError, match="not valid JSON"):
        load_model(artifact_copy)
    (artifact_copy / "router.json").unlink()
    with pytest.raises(RouterArtifactError, match="no router.json"):
        load_model(artifact_copy)


def test_wrong_embedding_model(artifact_copy: Path, tmp_path: Path) -> None:
    meta = json.loads((artifact_copy / "router.json").read_text())
    meta["embedding"]["fingerprint"] = "0123456789abcdef"
    (artifact_copy / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterArtifactError, match="embedding model differs"):
        encoder_for(load_model(artifact_copy))
    meta["embedding"]["name"] = str(tmp_path / "no-such-model")
    (artifact_copy / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterArtifactError):
        encoder_for(load_model(artifact_copy))
    meta["embedding"]["dim"] = 768
    (artifact_copy / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterArtifactError, match="shape"):
        load_model(artifact_copy)


def test_two_labels_train_one_label_refused(small_files: dict[str, Path], tmp_path: Path) -> None:
    data = load_labeled(small_files["two"])
    fitted = fit_router(data, encoder=Encoder(), config=TrainConfig(augment=0, c_grid=(1.0,)))
    assert fitted.model.labels == ("engineering", "finance")
    assert fitted.model.coef.shape == (2, 384)
    p = fitted.model.predict_proba(_probe_vectors())
    assert np.allclose(p.sum(axis=1), 1.0) and p[0].argmax() == 0 and p[1].argmax() == 1
    one = tmp_path / "one.jsonl"
    one.write_text("".join(f'{{"text": "q {i}", "label": "finance"}}\n' for i in range(10)))
    with pytest.raises(DataError, match="at least 2 labels"):
        load_labeled(one)


def test_promote_refuses_worse_unless_forced(small_router: tuple[Path, dict], tmp_path: Path) -> None:
    store = RouterStore(tmp_path / "store")
    shutil.copytree(small_router[0], store.root / "v0001")
    shutil.copytree(small_router[0], store.root / "v0002")
    store.set_current("v0001")
    meta_file = store.root / "v0002" / "router.json"
    meta = json.loads(meta_file.read_text())
    meta["metrics"]["macro_f1"] -= 0.1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(RouterError, match="scores worse"):
        store.promote("v0002")
    assert store.current() == "v0001"
    assert "forced" in store.promote("v0002", force=True) and store.current() == "v0002"
    with pytest.raises(RouterError, match="no router version 'v0009'"):
        store.promote("v0009")
