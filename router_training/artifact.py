"""The fitted router as data, its safe on-disk form, and the versioned store.

An artifact is a directory::

    router.json            labels, embedding model, classifier, calibration, abstain rule,
                           library versions, training-data hash, metrics, sha256 of weights
    weights.safetensors    coef (labels x dim), intercept, ood_coef, ood_intercept
    report.json / report.md / confusion_matrix.png   (evaluation, optional)

Nothing is ever unpickled. A store is a directory of versions plus a ``CURRENT`` file::

    <store>/v0001/router.json ...   <store>/CURRENT  ("v0001")

    >>> model = load_model(default_router_path())        # doctest: +SKIP
    >>> model.labels
    ('engineering', 'finance', 'product')
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertmix.errors import RouterArtifactError, RouterError
from expertmix.io import atomic_dir, atomic_write_bytes, atomic_write_text, expertmix_home, file_sha256

__all__ = [
    "FORMAT_VERSION",
    "AbstainRule",
    "RouterModel",
    "RouterStore",
    "RouterVersionWarning",
    "default_router_path",
    "default_store_root",
    "library_versions",
    "load_model",
    "resolve_router_path",
    "save_model",
]

FORMAT_VERSION = 1
ROUTER_JSON = "router.json"
WEIGHTS = "weights.safetensors"


class RouterVersionWarning(UserWarning):
    """The artifact was written with other library versions than the ones installed."""


def default_router_path() -> Path:
    """The router shipped inside the installed package (``router_training/default``)."""
    return Path(__file__).resolve().parent / "default"


def default_store_root() -> Path:
    """Where ``expertmix router train`` writes versions unless told otherwise."""
    return expertmix_home() / "routers"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("numpy", "scikit-learn", "sentence-transformers", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def group_sum(p: np.ndarray, groups: np.ndarray | None, n_labels: int) -> np.ndarray:
    """Sum unit probabilities into label probabilities."""
    if groups is None:
        return p
    out = np.zeros((p.shape[0], n_labels), dtype=p.dtype)
    np.add.at(out.T, np.asarray(groups, dtype=np.int64), p.T)
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class AbstainRule:
    """Reject (fall back to the base model) when ``confidence < threshold``.

    ``score`` is one of ``router_training.schema.ABSTAIN_SCORES``: ``max_prob`` (the top
    calibrated probability), ``in_domain`` (``max_prob`` times a linear in-domain-vs-off-topic
    probability fitted on OOD rows), one distance score of ``router_training.ood`` (``knn``,
    ``mahalanobis``, ``energy``), or ``combined``: the sum of ``components``, each
    standardized as ``(s - mean) / scale`` on held-out in-domain rows.
    """

    score: str = "max_prob"
    threshold: float = 0.0
    target_false_reject: float = 0.03
    ood_coef: np.ndarray | None = None
    ood_intercept: float = 0.0
    components: tuple[str, ...] = ()
    mean: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    knn_k: int = 1
    bank: np.ndarray | None = None
    """(n, dim) unit vectors of training texts for the ``knn`` score."""
    maha_means: np.ndarray | None = None
    maha_precision: np.ndarray | None = None

    def describe(self) -> str:
        if self.score == "combined":
            return "in-domain score (" + " + ".join(self.components) + ")"
        return {"max_prob": "max probability", "in_domain": "in-domain score"}.get(self.score, f"{self.score} score")

    def needed(self) -> tuple[str, ...]:
        """The score components this rule computes."""
        if self.score == "combined":
            return self.components
        return ("max_prob", "in_domain") if self.score == "in_domain" else (self.score,)


@dataclass
class RouterModel:
    """A fitted linear router over sentence embeddings; pure numpy at run time."""

    labels: tuple[str, ...]
    coef: np.ndarray
    """(units, dim): one row per label, or per sub-cluster of a label when ``groups`` is set."""
    intercept: np.ndarray
    temperature: float = 1.0
    groups: np.ndarray | None = None
    """Label index of each row of ``coef``; probabilities of a label's rows are summed."""
    abstain: AbstainRule = field(default_factory=AbstainRule)
    embedding: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) @ self.coef.T + self.intercept

    def predict_proba(self, x: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        """Class probabilities, columns in ``labels`` order."""
        z = self.logits(x).astype(np.float64)
        p = _softmax(z / (self.temperature if calibrated else 1.0))
        return group_sum(p, self.groups, len(self.labels))

    def confidence(self, x: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The score the abstain rule compares with its threshold (higher = more in-domain)."""
        from router_training.ood import component_scores

        rule = self.abstain
        parts = component_scores(self, x, probs, rule.needed())
        if rule.score == "in_domain":
            return parts["max_prob"] / (1.0 + np.exp(-parts["in_domain"]))
        if rule.score == "combined":
            return sum(((parts[c] - rule.mean.get(c, 0.0)) / rule.scale.get(c, 1.0) for c in rule.components),
                       np.zeros(len(probs)))
        return parts[rule.score]

    def _abstain_json(self) -> dict[str, Any]:
        rule = self.abstain
        out: dict[str, Any] = {
            "score": rule.score,
            "threshold": rule.threshold,
            "target_false_reject": rule.target_false_reject,
        }
        if rule.score == "combined":
            out.update(components=list(rule.components), mean=dict(rule.mean), scale=dict(rule.scale))
        if "knn" in rule.needed():
            out["knn_k"] = rule.knn_k
        return out

    def to_json(self, weights_sha256: str) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "labels": list(self.labels),
            "embedding": self.embedding,
            "classifier": self.classifier,
            "calibration": {**self.calibration, "temperature": self.temperature},
            "abstain": self._abstain_json(),
            "training": self.training,
            "metrics": self.metrics,
            "versions": self.versions,
            "weights": {"file": WEIGHTS, "sha256": weights_sha256},
        }


def _rule_tensors(rule: AbstainRule) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if rule.ood_coef is not None:
        out["ood_coef"] = np.ascontiguousarray(rule.ood_coef, dtype=np.float32)
        out["ood_intercept"] = np.asarray([rule.ood_intercept], dtype=np.float32)
    if rule.bank is not None:
        out["knn_bank"] = np.ascontiguousarray(rule.bank, dtype=np.float16)
    if rule.maha_means is not None and rule.maha_precision is not None:
        out["maha_means"] = np.ascontiguousarray(rule.maha_means, dtype=np.float32)
        out["maha_precision"] = np.ascontiguousarray(rule.maha_precision, dtype=np.float32)
    return out


def save_model(
    model: RouterModel,
    path: str | Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` atomically as directory ``path`` (replaced only with ``overwrite``)."""
    from safetensors.numpy import save

    tensors = {
        "coef": np.ascontiguousarray(model.coef, dtype=np.float32),
        "intercept": np.ascontiguousarray(model.intercept, dtype=np.float32),
    }
    if model.groups is not None:
        tensors["groups"] = np.ascontiguousarray(model.groups, dtype=np.int32)
    tensors.update(_rule_tensors(model.abstain))
    path = Path(path)
    if path.exists() and not overwrite:
        raise RouterError(f"{path} already exists; pass overwrite (--overwrite) to replace it")
    with atomic_dir(path, overwrite=overwrite) as tmp:
        atomic_write_bytes(tmp / WEIGHTS, save(tensors))
        meta = model.to_json(file_sha256(tmp / WEIGHTS))
        atomic_write_text(tmp / ROUTER_JSON, json.dumps(meta, indent=2, sort_keys=False) + "\n")
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, data)
        for f in tmp.iterdir():  # temp files are private; an artifact is meant to be shared
            f.chmod(0o644)
        tmp.chmod(0o755)
    return path


def load_model(path: str | Path) -> RouterModel:
    """Load and verify an artifact directory; every problem is a RouterArtifactError."""
    path = Path(path)
    meta_file, weights_file = path / ROUTER_JSON, path / WEIGHTS
    if not meta_file.is_file():
        raise RouterArtifactError(f"no {ROUTER_JSON} here; train one with `expertmix router train`", path=path)
    try:
        meta = json.loads(meta_file.read_text("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RouterArtifactError(f"{ROUTER_JSON} is not valid JSON ({exc})", path=path) from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise RouterArtifactError(
            f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}; retrain the router",
            path=path,
        )
    from router_training.schema import check_meta, fail

    check_meta(meta, path=path)
    if not weights_file.is_file():
        raise RouterArtifactError(f"weights file {WEIGHTS} is missing", path=path)
    expected = (meta.get("weights") or {}).get("sha256")
    actual = file_sha256(weights_file)
    if expected != actual:
        raise RouterArtifactError(
            f"{WEIGHTS} sha256 {actual[:12]}… does not match router.json ({str(expected)[:12]}…): "
            "the weights were modified or corrupted; retrain or restore the artifact",
            path=path,
        )
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(weights_file))
        labels = tuple(str(x) for x in meta["labels"])
        emb, cal, ab = meta["embedding"], meta["calibration"], meta["abstain"]
        coef, intercept = tensors["coef"], tensors["intercept"]
        bank = tensors.get("knn_bank")
        rule = AbstainRule(
            score=str(ab["score"]),
            threshold=float(ab["threshold"]),
            target_false_reject=float(ab.get("target_false_reject", 0.03)),
            ood_coef=tensors.get("ood_coef"),
            ood_intercept=float(tensors["ood_intercept"][0]) if "ood_intercept" in tensors else 0.0,
            components=tuple(str(c) for c in ab.get("components", ())),
            mean={str(k): float(v) for k, v in (ab.get("mean") or {}).items()},
            scale={str(k): float(v) for k, v in (ab.get("scale") or {}).items()},
            knn_k=int(ab.get("knn_k", 1)),
            bank=bank.astype(np.float32) if bank is not None else None,
            maha_means=tensors.get("maha_means"),
            maha_precision=tensors.get("maha_precision"),
        )
        model = RouterModel(
            labels=labels,
            coef=coef,
            intercept=intercept,
            temperature=float(cal["temperature"]),
            groups=tensors.get("groups"),
            abstain=rule,
            embedding=dict(emb),
            classifier=dict(meta.get("classifier", {})),
            calibration={k: v for k, v in cal.items() if k != "temperature"},
            training=dict(meta.get("training", {})),
            metrics=dict(meta.get("metrics", {})),
            versions=dict(meta.get("versions", {})),
        )
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise RouterArtifactError(f"artifact is malformed ({type(exc).__name__}: {exc})", path=path) from exc
    dim = int(emb["dim"])
    units = len(labels) if model.groups is None else len(model.groups)
    if coef.ndim != 2 or coef.shape[1] != dim:
        fail(path, "embedding.dim", f"{dim} does not match the weights (coef has shape {coef.shape})")
    if coef.shape != (units, dim) or intercept.shape != (units,):
        raise RouterArtifactError(
            f"weights have shape {coef.shape}/{intercept.shape}, expected ({units}, {dim})", path=path
        )
    if model.groups is not None and (
        model.groups.min(initial=0) < 0 or set(model.groups.tolist()) != set(range(len(labels)))
    ):
        raise RouterArtifactError("weights 'groups' do not map onto the labels", path=path)
    _check_rule_tensors(rule, dim, path)
    _warn_versions(model.versions, path)
    return model


def _check_rule_tensors(rule: AbstainRule, dim: int, path: Path) -> None:
    from router_training.ood import COMPONENTS
    from router_training.schema import fail

    if rule.score == "combined":
        if not rule.components or any(c not in COMPONENTS for c in rule.components):
            fail(path, "abstain.components", f"must list some of {', '.join(COMPONENTS)}, got {list(rule.components)}")
        for c in rule.components:
            if c not in rule.mean or c not in rule.scale:
                fail(path, "abstain.mean", f"component {c!r} lacks its mean/scale")
    needed = rule.needed()
    if "in_domain" in needed and (rule.ood_coef is None or rule.ood_coef.shape != (dim,)):
        raise RouterArtifactError(f"abstain rule '{rule.score}' lacks its ood_coef weights", path=path)
    if "knn" in needed and (rule.bank is None or rule.bank.ndim != 2 or rule.bank.shape[1] != dim):
        raise RouterArtifactError(f"abstain rule '{rule.score}' lacks its knn_bank ({dim} columns)", path=path)
    if "mahalanobis" in needed and (
        rule.maha_means is None
        or rule.maha_precision is None
        or rule.maha_means.ndim != 2
        or rule.maha_means.shape[1] != dim
        or rule.maha_precision.shape != (dim, dim)
    ):
        raise RouterArtifactError(f"abstain rule '{rule.score}' lacks maha_means/maha_precision", path=path)


def _warn_versions(saved: dict[str, str], path: Path) -> None:
    now = library_versions()
    # Only the libraries that change the numbers matter: the encoder stack.
    diffs = [
        f"{k} {saved[k]} (now {now[k]})"
        for k in ("sentence-transformers", "transformers", "torch")
        if k in saved and saved[k].split(".")[:2] != now.get(k, "").split(".")[:2]
    ]
    if diffs:
        warnings.warn(
            f"router {path} was trained with {', '.join(diffs)}; embeddings may differ slightly",
            RouterVersionWarning,
            stacklevel=3,
        )


def encoder_for(model: RouterModel, *, embedding_model: str | None = None, path: str | Path | None = None):
    """The encoder an artifact was trained with; a different model is a RouterArtifactError.

    ``embedding_model`` overrides where the model is read from (same model, other place);
    its name, config fingerprint and dimension must still match what the router recorded.
    """
    from router_training.embed import DEFAULT_MODEL_NAME, EmbedConfig, Encoder

    emb = model.embedding
    want = str(emb.get("name", ""))
    source = embedding_model or (None if want == DEFAULT_MODEL_NAME else want)
    try:
        enc = Encoder(
            EmbedConfig(
                model=source,
                max_seq_length=int(emb.get("max_seq_length", 256)),
                normalize=bool(emb.get("normalize", True)),
            )
        )
    except RouterError as exc:
        raise RouterArtifactError(f"cannot find the router's embedding model {want!r}: {exc}", path=path) from exc
    looks_local = source is not None and (Path(source).is_absolute() or source.startswith((".", "~")))
    if enc.path is None and looks_local:
        raise RouterArtifactError(f"embedding model directory {source} does not exist", path=path)
    fp_want, fp_have = str(emb.get("fingerprint", "")), enc.fingerprint()
    if embedding_model is None and enc.name != want:
        raise RouterArtifactError(f"router needs embedding model {want!r}, got {enc.name!r}", path=path)
    if fp_want and fp_have and fp_want != fp_have:
        raise RouterArtifactError(
            f"embedding model differs from the one the router was trained with "
            f"({want!r}, config fingerprint {fp_want} vs {fp_have} at {enc.path}); retrain the router",
            path=path,
        )
    if enc.path is None and enc.name != want:
        raise RouterArtifactError(f"router needs embedding model {want!r}, got {enc.name!r}", path=path)
    return enc


def check_encoder_dim(model: RouterModel, dim: int, *, path: str | Path | None = None) -> None:
    want = int(model.embedding.get("dim", -1))
    if dim != want:
        raise RouterArtifactError(
            f"embedding model {model.embedding.get('name')!r} gives {dim}-dim vectors, router expects {want}",
            path=path,
        )


from router_training.store import RouterStore, resolve_router_path
