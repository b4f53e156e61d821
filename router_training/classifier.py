"""The router's classifier: linear model over (sub-clusters of) labels, C by grouped CV, temperature.

    >>> coef, intercept, units, c, scores = fit_classifier(x, y, groups, n_labels=3, config=cfg)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["fit_classifier", "fit_temperature"]


def _make_estimator(name: str, c: float, cfg: Any) -> Any:
    cw = cfg.class_weight if getattr(cfg, "balance", "label") == "label" else None
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, class_weight=cw, max_iter=3000)
    if name == "linear_svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(C=c, class_weight=cw)
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(alpha=1.0 / c, class_weight=cw)


def _linear_params(est: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    coef, intercept = np.asarray(est.coef_, dtype=np.float64), np.asarray(est.intercept_, dtype=np.float64)
    if n_classes == 2 and coef.shape[0] == 1:  # binary sklearn models keep one row: split it
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def _fit_linear(
    x: np.ndarray, y: np.ndarray, n_classes: int, c: float, cfg: Any, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    if cfg.estimator == "centroid":
        ww = np.ones(len(y)) if w is None else w
        cent = np.stack([np.average(x[y == k], axis=0, weights=ww[y == k]) for k in range(n_classes)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
        return cent * 20.0, np.zeros(n_classes)  # scaled cosine; temperature rescales it
    est = _make_estimator(cfg.estimator, c, cfg).fit(x, y, sample_weight=w)
    return _linear_params(est, n_classes)


def _subclusters(x: np.ndarray, y: np.ndarray, n_classes: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit index per row and the label of each unit (k-means within each label)."""
    if k <= 1:
        return y.copy(), np.arange(n_classes)
    from sklearn.cluster import KMeans

    sub = np.zeros(len(y), dtype=np.int64)
    unit_label: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        kc = max(1, min(k, len(idx) // 10))
        ids = KMeans(kc, n_init=1, random_state=seed).fit(x[idx]).labels_ if kc > 1 else np.zeros(len(idx), int)
        sub[idx] = len(unit_label) + ids
        unit_label += [c] * kc
    return sub, np.array(unit_label)


def _label_pred(x: np.ndarray, w: np.ndarray, b: np.ndarray, unit_label: np.ndarray, n: int) -> np.ndarray:
    from router_training.artifact import _softmax, group_sum

    return group_sum(_softmax(x @ w.T + b), unit_label, n).argmax(1)


def _choose_c(
    x: np.ndarray, y: np.ndarray, u: np.ndarray, unit_label: np.ndarray, groups: np.ndarray, cfg: Any,
    w: np.ndarray | None = None,
) -> tuple[float, dict]:
    """C by grouped stratified CV on label macro-F1 (a text and its framed copies share a fold)."""
    if cfg.estimator == "centroid" or len(cfg.c_grid) == 1:
        return cfg.c_grid[0] if cfg.c_grid else 1.0, {}
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    n_classes, n_units = int(unit_label.max()) + 1, len(unit_label)
    uniq = np.unique(groups)
    if len(uniq) > cfg.cv_max_rows:
        rng = np.random.default_rng(cfg.seed)
        uniq = np.sort(rng.choice(uniq, cfg.cv_max_rows, replace=False))
        keep = np.isin(groups, uniq)
        x, y, u, groups = x[keep], y[keep], u[keep], groups[keep]
        w = None if w is None else w[keep]
    gy = np.array([y[groups == g][0] for g in uniq])
    folds = min(cfg.cv_folds, int(np.bincount(gy).min()))
    if folds < 2:
        return 1.0, {}
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    scores: dict[float, float] = {}
    for c in cfg.c_grid:
        f1s = []
        for tr_g, te_g in skf.split(uniq, gy):
            tr, te = np.isin(groups, uniq[tr_g]), np.isin(groups, uniq[te_g])
            if len(np.unique(u[tr])) < n_units:
                continue  # a sub-cluster missing from this fold: skip the fold
            coef, b = _fit_linear(x[tr], u[tr], n_units, c, cfg, None if w is None else w[tr])
            f1s.append(f1_score(y[te], _label_pred(x[te], coef, b, unit_label, n_classes), average="macro"))
        if not f1s:
            return 1.0, {}
        scores[c] = float(np.mean(f1s))
    best = max(scores.values())
    # the smallest C (strongest regularization) within 0.002 of the best: generalizes better
    c = min(c for c, s in scores.items() if s >= best - 0.002)
    return c, {str(k): round(v, 4) for k, v in scores.items()}


def source_pairs(y: np.ndarray, sources: np.ndarray, orig: np.ndarray) -> list[tuple[int, str]]:
    """(label, source) pairs that can be held out: sources of labels with two or more sources
    among the original rows (not the extra texts)."""
    pairs = []
    for lab in np.unique(y[orig]):
        names = sorted({str(s) for s in sources[orig & (y == lab)]})
        if len(names) >= 2:
            pairs += [(int(lab), s) for s in names]
    return pairs


def _choose_c_by_source(
    x: np.ndarray, y: np.ndarray, u: np.ndarray, unit_label: np.ndarray, sources: np.ndarray,
    orig: np.ndarray, weigh: Callable[[np.ndarray], np.ndarray | None], cfg: Any,
) -> tuple[float, dict]:
    """C by leave-one-source-out inside the training data: for each C, train without one
    source (all its copies) and score the argmax on that source's original rows; the mean
    accuracy over held-out sources decides. This is the generalization a router needs (a new
    kind of text), which within-source CV does not measure (it prefers large C)."""
    n_classes, n_units = int(unit_label.max()) + 1, len(unit_label)
    pairs = source_pairs(y, sources, orig)
    scores: dict[float, float] = {}
    for c in cfg.c_grid:
        accs = []
        for lab, src in pairs:
            out = (y == lab) & (sources == src)
            tr, te = ~out, out & orig
            if len(np.unique(u[tr])) < n_units:
                continue
            coef, b = _fit_linear(x[tr], u[tr], n_units, c, cfg, weigh(tr))
            accs.append(float((_label_pred(x[te], coef, b, unit_label, n_classes) == lab).mean()))
        if not accs:
            return cfg.c_grid[0], {}
        scores[c] = float(np.mean(accs))
    best = max(scores.values())
    c = min(c for c, s in scores.items() if s >= best - 0.002)
    return c, {f"source_cv:{k}": round(v, 4) for k, v in scores.items()}


def fit_temperature(logits: np.ndarray, y: np.ndarray, unit_label: np.ndarray | None = None) -> float:
    """Temperature minimizing the held-out negative log-likelihood of the label probabilities."""
    from scipy.optimize import minimize_scalar

    from router_training.artifact import _softmax, group_sum

    n = int(y.max()) + 1 if unit_label is None else int(unit_label.max()) + 1

    def nll(log_t: float) -> float:
        p = group_sum(_softmax(logits / np.exp(log_t)), unit_label, n)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(res.x))


def fit_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    groups: np.ndarray,
    *,
    x_orig: np.ndarray,
    y_orig: np.ndarray,
    n_labels: int,
    config: Any,
    sample_weight: np.ndarray | None = None,
    sources: Sequence[str] | None = None,
    weigh: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, dict[str, Any]]:
    """(coef, intercept, unit_label, C, cv scores). ``groups[i]`` is the original row of
    training row ``i`` (copies share a CV fold); sub-clusters come from the original rows
    ``x_orig`` and are carried to their copies through ``groups`` (-1 = no original row: the
    extra labeled texts, which take the first unit of their label). ``sample_weight``: per
    training row (e.g. ``train.source_weights``), None = the estimator's class weights.
    ``sources`` (per training row) and ``weigh`` (row mask -> weights of those rows): when some
    label has two or more sources, C is chosen by leave-one-source-out (``_choose_c_by_source``)
    instead of stratified CV."""
    cfg = config
    best: tuple[float, int, float, dict, np.ndarray, np.ndarray] | None = None
    cv_scores: dict[str, Any] = {}

    def units_of(sub: np.ndarray, units: np.ndarray) -> np.ndarray:
        first = np.array([int(np.flatnonzero(units == lab)[0]) for lab in range(n_labels)])
        return np.where(groups >= 0, sub[np.clip(groups, 0, None)], first[y_train])

    src = np.asarray(list(sources), dtype=object) if sources is not None else None
    orig = np.zeros(len(y_train), dtype=bool)
    orig[: len(y_orig)] = True  # the original rows come first
    by_source = src is not None and len(cfg.c_grid) > 1 and bool(source_pairs(y_train, src, orig))
    # auto (0): sub-clusters only when there are no sources to hold out; on the shared routing
    # data they fit one source's register (LOSO: conala 94% -> 73% when 8 were chosen)
    ks = [cfg.subclasses] if cfg.subclasses else ([1] if by_source else [1, 8])
    for k in ks:
        sub_k, units_k = _subclusters(x_orig, y_orig, n_labels, k, cfg.seed)
        u_k = units_of(sub_k, units_k)
        if by_source and src is not None:
            wf = weigh or (lambda m: None if sample_weight is None else sample_weight[m])
            c_k, scores_k = _choose_c_by_source(x_train, y_train, u_k, units_k, src, orig, wf, cfg)
        else:
            c_k, scores_k = _choose_c(x_train, y_train, u_k, units_k, groups, cfg, sample_weight)
        cv_scores[f"subclasses={k}"] = scores_k
        # sub-clusters add capacity and within-source CV flatters them: demand a clear gain
        score = max(scores_k.values(), default=0.0) - (0.01 if k > 1 else 0.0)
        if best is None or score > best[0]:
            best = (score, k, c_k, scores_k, sub_k, units_k)
    assert best is not None
    _, _, c, _, sub_fit, unit_label = best
    units = units_of(sub_fit, unit_label)
    coef, intercept = _fit_linear(x_train, units, len(unit_label), c, cfg, sample_weight)
    return coef, intercept, unit_label, c, cv_scores
