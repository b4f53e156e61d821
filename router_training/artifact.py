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
import re
import warnings
from collections.abc import Callable
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
_VERSION_RE = re.compile(r"^v\d{4,}$")


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

    ``score`` is ``max_prob`` (the top calibrated probability) or ``in_domain``
    (``max_prob`` times a linear in-domain-vs-off-topic probability fitted on OOD rows).
    """

    score: str = "max_prob"
    threshold: float = 0.0
    target_false_reject: float = 0.03
    ood_coef: np.ndarray | None = None
    ood_intercept: float = 0.0

    def describe(self) -> str:
        return "max probability" if self.score == "max_prob" else "in-domain score"


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
        conf = probs.max(axis=1)
        rule = self.abstain
        if rule.score == "in_domain" and rule.ood_coef is not None:
            z = np.asarray(x, dtype=np.float64) @ rule.ood_coef.astype(np.float64) + rule.ood_intercept
            conf = conf / (1.0 + np.exp(-z))
        return conf

    def to_json(self, weights_sha256: str) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "labels": list(self.labels),
            "embedding": self.embedding,
            "classifier": self.classifier,
            "calibration": {**self.calibration, "temperature": self.temperature},
            "abstain": {
                "score": self.abstain.score,
                "threshold": self.abstain.threshold,
                "target_false_reject": self.abstain.target_false_reject,
            },
            "training": self.training,
            "metrics": self.metrics,
            "versions": self.versions,
            "weights": {"file": WEIGHTS, "sha256": weights_sha256},
        }


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
    if model.abstain.ood_coef is not None:
        tensors["ood_coef"] = np.ascontiguousarray(model.abstain.ood_coef, dtype=np.float32)
        tensors["ood_intercept"] = np.asarray([model.abstain.ood_intercept], dtype=np.float32)
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
        rule = AbstainRule(
            score=str(ab["score"]),
            threshold=float(ab["threshold"]),
            target_false_reject=float(ab.get("target_false_reject", 0.03)),
            ood_coef=tensors.get("ood_coef"),
            ood_intercept=float(tensors["ood_intercept"][0]) if "ood_intercept" in tensors else 0.0,
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
    if rule.score == "in_domain" and (rule.ood_coef is None or rule.ood_coef.shape != (dim,)):
        raise RouterArtifactError("abstain rule 'in_domain' lacks its ood_coef weights", path=path)
    _warn_versions(model.versions, path)
    return model


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


class RouterStore:
    """Versioned routers under one root; ``CURRENT`` names the promoted one."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _VERSION_RE.match(p.name) and p.is_dir())

    def current(self) -> str | None:
        f = self.root / "CURRENT"
        if not f.is_file():
            return None
        name = f.read_text("utf-8").strip()
        return name or None

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version) or not (self.root / version / ROUTER_JSON).is_file():
            known = ", ".join(self.versions()) or "none"
            raise RouterError(f"no router version {version!r} in {self.root} (versions: {known})")
        return self.root / version

    def next_version(self) -> str:
        nums = [int(v[1:]) for v in self.versions()]
        return f"v{max(nums, default=0) + 1:04d}"

    def set_current(self, version: str) -> None:
        self.path(version)
        atomic_write_text(self.root / "CURRENT", version + "\n")

    def promote(
        self,
        version: str,
        *,
        force: bool = False,
        score: Callable[[Path], float] | None = None,
    ) -> str:
        """Make ``version`` current; refuse one that scores worse than the current one.

        Scores are macro-F1 on the same evaluation data: the metrics stored in both
        artifacts when their evaluation-data hashes agree, else ``score(path)`` when
        given. Returns a one-line summary.
        """
        cand_path = self.path(version)
        cur = self.current()
        if cur is None or cur == version or force:
            self.set_current(version)
            return f"{version} is now current" + (" (forced)" if force and cur not in (None, version) else "")
        cur_path = self.path(cur)
        if score is not None:
            s_cand, s_cur = score(cand_path), score(cur_path)
        else:
            m_cand, m_cur = _metrics(cand_path), _metrics(cur_path)
            if not m_cand.get("eval_data_hash") or m_cand.get("eval_data_hash") != m_cur.get("eval_data_hash"):
                raise RouterError(
                    f"{version} and current {cur} were evaluated on different data; "
                    "pass --data FILE to compare them on the same data, or --force"
                )
            s_cand, s_cur = float(m_cand["macro_f1"]), float(m_cur["macro_f1"])
        if s_cand + 1e-9 < s_cur:
            raise RouterError(
                f"{version} scores worse than current {cur} (macro-F1 {s_cand:.4f} < {s_cur:.4f}); "
                "use --force to promote it anyway"
            )
        self.set_current(version)
        return f"{version} is now current (macro-F1 {s_cand:.4f} vs {s_cur:.4f} for {cur})"


def _metrics(path: Path) -> dict[str, Any]:
    meta = json.loads((path / ROUTER_JSON).read_text("utf-8"))
    return dict(meta.get("metrics") or {})


def resolve_router_path(path: str | Path | None = None) -> Path:
    """An artifact directory from: None (store's current, else shipped), an artifact, or a store."""
    if path is None:
        store = RouterStore()
        cur = store.current()
        return store.path(cur) if cur else default_router_path()
    p = Path(path).expanduser()
    if (p / ROUTER_JSON).is_file():
        return p
    if (p / "CURRENT").is_file():
        store = RouterStore(p)
        cur = store.current()
        if cur:
            return store.path(cur)
    raise RouterArtifactError("not a router artifact (no router.json) nor a store with a CURRENT version", path=p)


def encoder_for(model: RouterModel, *, embedding_model: str | None = None, path: str | Path | None = None):  # noqa: ANN201
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
