"""Out-of-domain scores on the router's embeddings (higher = more in-domain).

A learned in-domain-vs-off-topic classifier only knows the off-topic examples it was shown.
These scores need none: they measure how far a query is from the training data itself.

* ``knn``: cosine similarity to the k-th nearest training text (a stored bank of vectors);
* ``mahalanobis``: minus the smallest Mahalanobis distance to a class (or sub-cluster) mean,
  one covariance shared by all classes (Lee et al. 2018);
* ``energy``: ``T·logsumexp(logits/T)`` of the classifier (Liu et al. 2020);
* ``in_domain``: the logit of the learned in-domain detector (needs off-topic rows);
* ``combined``: the sum of several of these, each standardized on held-out in-domain rows.

    >>> s = component_scores(model, x, probs, ("knn", "mahalanobis"))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["COMPONENTS", "component_scores", "fit_mahalanobis", "knn_similarity", "mahalanobis_score"]

COMPONENTS = ("max_prob", "in_domain", "knn", "mahalanobis", "energy")


def knn_similarity(x: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Cosine similarity of each row of ``x`` to its k-th nearest row of ``bank`` (unit vectors)."""
    sims = np.asarray(x, dtype=np.float32) @ np.asarray(bank, dtype=np.float32).T
    k = max(1, min(k, sims.shape[1]))
    if k == 1:
        return sims.max(axis=1).astype(np.float64)
    return (-np.partition(-sims, k - 1, axis=1)[:, k - 1]).astype(np.float64)


def fit_mahalanobis(x: np.ndarray, unit: np.ndarray, n_units: int, *, shrinkage: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Unit means and the shared precision matrix (inverse of the pooled, slightly shrunk covariance)."""
    x = np.asarray(x, dtype=np.float64)
    means = np.stack([x[unit == u].mean(axis=0) for u in range(n_units)])
    resid = x - means[unit]
    cov = resid.T @ resid / max(1, len(x) - n_units)
    cov += shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return means, np.linalg.inv(cov)


def mahalanobis_score(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the smallest Mahalanobis distance (squared) from each row to a unit mean."""
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    xp = x @ p
    d = (xp * x).sum(axis=1)[:, None] - 2.0 * xp @ m.T + ((m @ p) * m).sum(axis=1)[None, :]
    return -d.min(axis=1)


def component_scores(model: Any, x: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The raw score of each named component for rows ``x`` (``probs``: calibrated label probabilities)."""
    rule = model.abstain
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "max_prob":
            out[name] = probs.max(axis=1)
        elif name == "in_domain":
            if rule.ood_coef is None:
                raise ValueError("in_domain needs the detector weights (ood_coef)")
            out[name] = np.asarray(x, dtype=np.float64) @ rule.ood_coef.astype(np.float64) + rule.ood_intercept
        elif name == "knn":
            if rule.bank is None:
                raise ValueError("knn needs the bank of training vectors")
            out[name] = knn_similarity(x, rule.bank, rule.knn_k)
        elif name == "mahalanobis":
            if rule.maha_means is None or rule.maha_precision is None:
                raise ValueError("mahalanobis needs the unit means and the precision matrix")
            out[name] = mahalanobis_score(x, rule.maha_means, rule.maha_precision)
        elif name == "energy":
            z = model.logits(x).astype(np.float64) / model.temperature
            top = z.max(axis=1)
            out[name] = model.temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))
        else:
            raise ValueError(f"unknown OOD score component {name!r}")
    return out
