"""Fit the abstain rule: candidate OOD scores, thresholds at a false-reject target, choice on held-out rows.

Every candidate's threshold is the ``max_false_reject`` quantile of its score on held-out
in-domain rows (original, conversationally framed and question-form rewrites, so a
rephrased in-domain question is not rejected for its phrasing). The preferred score is the
combined distance score ``knn + mahalanobis + energy``: it needs no off-topic examples, so
it does not overfit a few of them. Another candidate replaces it only when it rejects
clearly more held-out off-topic rows: by more than two standard errors of the difference
(binomial, on the held-out count; at least 2 points). With 50 held-out off-topic rows that is
about 10 points; with 900, about 4. Without held-out off-topic rows the preferred score is
kept.

    >>> rule, recalls = fit_abstain(model, ctx, config=cfg)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from expertmix.errors import RouterError
from router_training.artifact import AbstainRule, RouterModel

__all__ = ["PREFERRED", "AbstainData", "candidate_rules", "choose", "fit_abstain"]

#: The default abstain score; others must beat it clearly on held-out off-topic rows.
PREFERRED = "combined:knn+mahalanobis+energy"

#: Combined candidates, tried when their parts are available (in_domain needs off-topic rows).
COMBOS: tuple[tuple[str, ...], ...] = (
    ("knn", "mahalanobis"),
    ("knn", "mahalanobis", "energy"),
    ("knn", "in_domain"),
    ("mahalanobis", "in_domain"),
    ("knn", "mahalanobis", "in_domain"),
    ("knn", "mahalanobis", "energy", "in_domain"),
)


@dataclass
class AbstainData:
    """Embeddings the abstain rule is fitted on."""

    x_fit: np.ndarray
    """In-domain training rows (the classifier's training rows)."""
    unit: np.ndarray
    """Classifier unit (label or sub-cluster) of each row of ``x_fit``."""
    x_bank: np.ndarray
    """Rows the ``knn`` score compares with (original training texts)."""
    x_in_cal: np.ndarray
    """Held-out in-domain rows (thresholds, standardization)."""
    x_ood_fit: np.ndarray
    """Off-topic rows to fit the in-domain detector (may be empty)."""
    x_ood_cal: np.ndarray
    """Held-out off-topic rows (choice between candidates; may be empty)."""


def _fit_in_domain_detector(x_in: np.ndarray, x_ood: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    x = np.vstack([x_in, x_ood])
    y = np.r_[np.ones(len(x_in)), np.zeros(len(x_ood))]
    est = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000, random_state=seed).fit(x, y)
    return est.coef_[0].astype(np.float64), float(est.intercept_[0])


def _maha_units(x: np.ndarray, y_unit: np.ndarray, n_units: int, per_label: int, seed: int) -> tuple[np.ndarray, int]:
    """Sub-clusters for the Mahalanobis means: ``per_label`` k-means clusters inside each unit."""
    from router_training.classifier import _subclusters

    if per_label <= 1:
        return y_unit, n_units
    sub, units = _subclusters(x, y_unit, n_units, per_label, seed)
    return sub, len(units)


def candidate_rules(model: RouterModel, data: AbstainData, config: Any) -> dict[str, AbstainRule]:
    """Every abstain rule that can be built from ``data`` (``config.abstain_score`` filters)."""
    from router_training.ood import fit_mahalanobis

    cfg = config
    has_ood = len(data.x_ood_fit) > 0
    base = AbstainRule(target_false_reject=cfg.max_false_reject, knn_k=cfg.knn_k)
    if cfg.abstain_score == "max_prob":  # nothing else to fit (e.g. LOSO folds, which score argmax only)
        return {"max_prob": _with(base, score="max_prob")}
    base.bank = data.x_bank.astype(np.float32)
    n_units = int(data.unit.max()) + 1
    sub, n_sub = _maha_units(data.x_fit, data.unit, n_units, cfg.ood_units, cfg.seed)
    base.maha_means, base.maha_precision = fit_mahalanobis(data.x_fit, sub, n_sub)
    if has_ood:
        w, b = _fit_in_domain_detector(data.x_fit, data.x_ood_fit, cfg.seed)
        base.ood_coef, base.ood_intercept = w.astype(np.float32), b
    names = ["max_prob", "knn", "mahalanobis", "energy"] + (["in_domain"] if has_ood else [])
    rules = {n: _with(base, score=n) for n in names}
    for combo in COMBOS:
        if "in_domain" in combo and not has_ood:
            continue
        rules["combined:" + "+".join(combo)] = _with(base, score="combined", components=combo)
    want = cfg.abstain_score
    if want != "auto":
        rules = {k: v for k, v in rules.items() if k == want or k.startswith(want + ":")}
        if not rules:
            raise RouterError(f"abstain score {want!r} needs out-of-domain rows (--ood or --ood-label)")
    return rules


def _with(base: AbstainRule, **changes: Any) -> AbstainRule:
    return replace(base, mean={}, scale={}, **changes)


def _standardize(model: RouterModel, rule: AbstainRule, x_in: np.ndarray) -> None:
    from router_training.ood import component_scores

    parts = component_scores(model, x_in, model.predict_proba(x_in), rule.components)
    for c, s in parts.items():
        rule.mean[c] = float(np.median(s))
        rule.scale[c] = float(np.std(s)) or 1.0


def _strip(rule: AbstainRule) -> AbstainRule:
    """Drop the tensors the chosen score does not use (smaller artifact)."""
    need = rule.needed()
    if "knn" not in need:
        rule.bank = None
    if "mahalanobis" not in need:
        rule.maha_means = rule.maha_precision = None
    if "in_domain" not in need:
        rule.ood_coef, rule.ood_intercept = None, 0.0
    return rule


def choose(recall: dict[str, float], names: list[str], n_ood: int) -> str:
    """The abstain score to keep: ``PREFERRED`` unless a candidate's held-out off-topic recall
    beats it by more than two standard errors of the difference (and at least 0.02).

        >>> other = "combined:knn+in_domain"
        >>> choose({PREFERRED: 0.92, other: 0.94}, [PREFERRED, other], 50)
        'combined:knn+mahalanobis+energy'
        >>> choose({PREFERRED: 0.40, other: 0.85}, [PREFERRED, other], 900)
        'combined:knn+in_domain'
    """
    if not recall:
        if PREFERRED in names:
            return PREFERRED
        return "max_prob" if "max_prob" in names else names[0]
    # ties go to the simpler rule (fewer parts), then to the name order of the candidates
    best = max(recall, key=lambda k: (round(recall[k], 4), -k.count("+"), -names.index(k)))
    if PREFERRED not in recall or best == PREFERRED:
        return best
    p, q, n = recall[PREFERRED], recall[best], max(1, n_ood)
    margin = max(0.02, 2.0 * float(np.sqrt((p * (1 - p) + q * (1 - q)) / n)))
    return best if q - p > margin else PREFERRED


def fit_abstain(
    model: RouterModel, data: AbstainData, *, config: Any
) -> tuple[AbstainRule, dict[str, float], dict[str, AbstainRule]]:
    """The chosen rule (threshold set), each candidate's held-out off-topic recall, and all
    candidates (thresholds set; for benchmarks)."""
    cfg = config
    rules = candidate_rules(model, data, cfg)
    recall: dict[str, float] = {}
    saved = model.abstain
    try:
        for name, rule in rules.items():
            model.abstain = rule
            if rule.score == "combined":
                _standardize(model, rule, data.x_in_cal)
            conf_in = model.confidence(data.x_in_cal, model.predict_proba(data.x_in_cal))
            rule.threshold = float(np.quantile(conf_in, cfg.max_false_reject)) if cfg.max_false_reject > 0 else -1e30
            if len(data.x_ood_cal):
                conf_ood = model.confidence(data.x_ood_cal, model.predict_proba(data.x_ood_cal))
                recall[name] = float((conf_ood < rule.threshold).mean())
    finally:
        model.abstain = saved
    best = choose(recall, list(rules), len(data.x_ood_cal))
    chosen = _strip(replace(rules[best], mean=dict(rules[best].mean), scale=dict(rules[best].scale)))
    return chosen, recall, rules
