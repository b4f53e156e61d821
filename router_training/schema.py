"""Typed checks of ``router.json`` at load time: every field a router uses, typed and range-checked.

A hand-edited or truncated ``router.json`` fails here with a RouterArtifactError that names
the artifact and the field (``err.path``, ``err.field``), instead of routing with a NaN
temperature or a label no expert can carry.

    >>> check_meta(json.loads(Path("router.json").read_text()), path="router")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from expertmix.errors import RouterArtifactError
from expertmix.names import BASE_EXPERT, NAME_PATTERN, name_problem

__all__ = ["ABSTAIN_SCORES", "NAME_PATTERN", "check_meta", "fail", "label_problem"]

#: The one name rule for expert names and router labels: ``expertmix.names`` (shared with experts).
RESERVED = BASE_EXPERT

#: Abstain scores a router may use (higher = more in-domain); see artifact.RouterModel.confidence.
ABSTAIN_SCORES = ("max_prob", "in_domain", "knn", "mahalanobis", "energy", "combined")


def label_problem(label: object) -> str | None:
    """Why ``label`` cannot name an expert, or None when it can (the one name rule)."""
    return name_problem(label, what="label")


def fail(path: str | Path | None, field: str, message: str) -> NoReturn:
    """Raise RouterArtifactError for ``field`` of router.json (``err.field`` is set)."""
    err = RouterArtifactError(f"router.json field '{field}': {message}; retrain or restore the artifact", path=path)
    setattr(err, "field", field)  # noqa: B010 - context attribute, like DataError.field
    raise err


def _obj(meta: Mapping[str, Any], key: str, path: Any, *, required: bool = True) -> dict[str, Any]:
    v = meta.get(key)
    if v is None and not required:
        return {}
    if not isinstance(v, dict):
        fail(path, key, f"must be an object, got {type(v).__name__}")
    return v


def _number(v: Any, field: str, path: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        fail(path, field, f"must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        fail(path, field, f"must be finite, got {v!r}")
    return float(v)


def _int(v: Any, field: str, path: Any, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        fail(path, field, f"must be an integer, got {type(v).__name__} {v!r}")
    if v < minimum:
        fail(path, field, f"must be at least {minimum}, got {v}")
    return int(v)


def check_meta(meta: Mapping[str, Any], *, path: str | Path | None = None) -> None:
    """Check types and ranges of every field the router reads; raise on the first problem."""
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels:
        fail(path, "labels", f"must be a non-empty list of expert names, got {labels!r}")
    for i, lab in enumerate(labels):
        why = label_problem(lab)
        if why:
            fail(path, f"labels[{i}]", why)
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        fail(path, "labels", f"names must be unique, repeated: {', '.join(dup)}")

    emb = _obj(meta, "embedding", path)
    if not isinstance(emb.get("name"), str) or not emb["name"]:
        fail(path, "embedding.name", f"must be the embedding model's name, got {emb.get('name')!r}")
    _int(emb.get("dim"), "embedding.dim", path)
    if "max_seq_length" in emb:
        _int(emb["max_seq_length"], "embedding.max_seq_length", path)
    if "normalize" in emb and not isinstance(emb["normalize"], bool):
        fail(path, "embedding.normalize", f"must be true or false, got {emb['normalize']!r}")

    cal = _obj(meta, "calibration", path)
    t = _number(cal.get("temperature"), "calibration.temperature", path)
    if t <= 0:
        fail(path, "calibration.temperature", f"must be > 0, got {t}")

    ab = _obj(meta, "abstain", path)
    if ab.get("score") not in ABSTAIN_SCORES:
        fail(path, "abstain.score", f"must be one of {', '.join(ABSTAIN_SCORES)}, got {ab.get('score')!r}")
    _number(ab.get("threshold"), "abstain.threshold", path)
    if "target_false_reject" in ab:
        frr = _number(ab["target_false_reject"], "abstain.target_false_reject", path)
        if not 0.0 <= frr < 1.0:
            fail(path, "abstain.target_false_reject", f"must be in [0, 1), got {frr}")
    for key in ("knn_k",):
        if key in ab:
            _int(ab[key], f"abstain.{key}", path)
    for key in ("mean", "scale"):
        vals = ab.get(key)
        if vals is None:
            continue
        if not isinstance(vals, dict):
            fail(path, f"abstain.{key}", f"must be an object of numbers, got {type(vals).__name__}")
        for name, v in vals.items():
            s = _number(v, f"abstain.{key}.{name}", path)
            if key == "scale" and s <= 0:
                fail(path, f"abstain.{key}.{name}", f"must be > 0, got {s}")
    weights = _obj(meta, "weights", path)
    if not isinstance(weights.get("sha256"), str):
        fail(path, "weights.sha256", "must be the sha256 hex digest of weights.safetensors")
    for key in ("classifier", "training", "metrics", "versions"):
        _obj(meta, key, path, required=False)
