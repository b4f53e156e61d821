"""Fit the router: linear classifier (C by cross-validation) → temperature → abstain rule.

    >>> fitted = fit_router(train, val=val, ood=ood_texts, encoder=Encoder())   # doctest: +SKIP
    >>> fitted.model.labels, fitted.model.abstain.threshold                    # doctest: +SKIP

The short, source-specific training texts (code intents, forum questions, user stories)
are also seen wrapped in neutral conversational frames ("Hi, quick question: …"), the
same frames for every label and for the off-topic rows, so the classifier learns that
the frame carries no label. Nothing is copied or stored: frames are applied in memory.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from expertmix.errors import DataError, RouterError
from router_training.artifact import AbstainRule, RouterModel, library_versions
from router_training.data import LabeledData
from router_training.embed import Encoder

__all__ = ["ESTIMATORS", "FittedRouter", "TrainConfig", "augment", "fit_router", "fit_temperature"]

ESTIMATORS = ("logreg", "linear_svm", "ridge", "centroid")

_FRAMES = (
    "Hi, quick question: {t}",
    "Could you help me with this? {t}",
    "I'm trying to understand something. {t} Could you explain?",
    "Hello! {t} Any advice would be appreciated.",
    "{t} Thanks in advance.",
    "Can you explain the following to me: {t}",
    "I have a question for you. {t} What should I look at?",
    "Hey, I was wondering about this: {t}",
)


@dataclass
class TrainConfig:
    """Classifier, calibration and abstain settings."""

    estimator: str = "logreg"
    """One of logreg (default), linear_svm, ridge, centroid."""
    c_grid: tuple[float, ...] = (1.0, 3.0, 10.0)
    """Inverse regularization strengths tried by cross-validation (macro-F1)."""
    cv_folds: int = 3
    class_weight: str | None = "balanced"
    calibration: str = "temperature"
    """temperature (fit on held-out rows) or none."""
    min_temperature: float = 1.0
    """Lower bound of the fitted temperature. Held-out rows from the training distribution are
    nearly separable, so the NLL-optimal temperature sharpens (here 0.43); that is overconfident on
    differently phrased queries and collapses every top-k mixture onto one expert. 1.0 = never
    sharpen beyond the classifier's own probabilities; 0 = unconstrained."""
    max_false_reject: float = 0.03
    """Abstain threshold: at most this share of in-domain held-out rows rejected."""
    abstain_score: str = "auto"
    """max_prob, in_domain (needs OOD rows), or auto (the better OOD recall on held-out rows)."""
    augment: int = 1
    """Conversational copies per training text (0 = off)."""
    subclasses: int = 0
    """k-means sub-clusters per label (a label often mixes several sources or intents);
    the classifier scores sub-clusters and a label's probability is their sum. 1 = off,
    0 = choose 1 or 8 by cross-validation (8 only when it gains at least 0.01 macro-F1)."""
    cv_max_rows: int = 6000
    """Cross-validation for C runs on at most this many (original) rows."""
    holdout_fraction: float = 0.2
    """Share of training rows held out for calibration when no validation file is given."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise RouterError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.calibration not in ("temperature", "none"):
            raise RouterError(f"unknown calibration {self.calibration!r}; choose temperature or none")
        if self.abstain_score not in ("auto", "max_prob", "in_domain"):
            raise RouterError(f"unknown abstain score {self.abstain_score!r}")
        if not 0.0 <= self.max_false_reject < 0.5:
            raise RouterError("max_false_reject must be in [0, 0.5)")


@dataclass
class FittedRouter:
    """The model plus the held-out arrays the report is computed on."""

    model: RouterModel
    cal_x: np.ndarray
    cal_y: np.ndarray
    cal_texts: list[str]
    ood_x: np.ndarray
    ood_texts: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def augment(texts: Sequence[str], copies: int, *, seed: int = 0) -> list[str]:
    """``copies`` framed variants per text, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(copies):
        for t in texts:
            frame = rng.choice(_FRAMES)
            body = t[0].lower() + t[1:] if frame.startswith(("Hey", "Hi")) and t[:2].istitle() else t
            out.append(frame.format(t=body))
    return out


def _make_estimator(name: str, c: float, cfg: TrainConfig) -> Any:
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, class_weight=cfg.class_weight, max_iter=3000)
    if name == "linear_svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(C=c, class_weight=cfg.class_weight)
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(alpha=1.0 / c, class_weight=cfg.class_weight)


def _linear_params(est: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    coef, intercept = np.asarray(est.coef_, dtype=np.float64), np.asarray(est.intercept_, dtype=np.float64)
    if n_classes == 2 and coef.shape[0] == 1:  # binary sklearn models keep one row: split it
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def _fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, c: float, cfg: TrainConfig):  # noqa: ANN202
    if cfg.estimator == "centroid":
        cent = np.stack([x[y == k].mean(axis=0) for k in range(n_classes)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
        return cent * 20.0, np.zeros(n_classes)  # scaled cosine; temperature rescales it
    est = _make_estimator(cfg.estimator, c, cfg).fit(x, y)
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
    x: np.ndarray, y: np.ndarray, u: np.ndarray, unit_label: np.ndarray, groups: np.ndarray, cfg: TrainConfig
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
            w, b = _fit_linear(x[tr], u[tr], n_units, c, cfg)
            f1s.append(f1_score(y[te], _label_pred(x[te], w, b, unit_label, n_classes), average="macro"))
        if not f1s:
            return 1.0, {}
        scores[c] = float(np.mean(f1s))
    best = max(scores.values())
    # the smallest C (strongest regularization) within 0.002 of the best: generalizes better
    c = min(c for c, s in scores.items() if s >= best - 0.002)
    return c, {str(k): round(v, 4) for k, v in scores.items()}


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


def _split(n: int, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    tr, te = train_test_split(idx, test_size=frac, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def _fit_in_domain_detector(x_in: np.ndarray, x_ood: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    x = np.vstack([x_in, x_ood])
    y = np.r_[np.ones(len(x_in)), np.zeros(len(x_ood))]
    est = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000, random_state=seed).fit(x, y)
    return est.coef_[0].astype(np.float64), float(est.intercept_[0])


def fit_router(
    train: LabeledData,
    *,
    encoder: Encoder,
    val: LabeledData | None = None,
    ood: Sequence[str] = (),
    ood_val: Sequence[str] = (),
    config: TrainConfig | None = None,
    data_hash: str = "",
    progress: bool = False,
) -> FittedRouter:
    """Fit classifier, temperature and abstain rule; return the model and held-out arrays."""
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    labels = tuple(train.labels_set)
    index = {lab: i for i, lab in enumerate(labels)}
    y_all = np.array([index[lab] for lab in train.labels])
    if val is not None:
        unknown = sorted(set(val.labels) - set(labels))
        if unknown:
            raise DataError(f"validation labels not in training data: {', '.join(unknown)}", path=val.paths[0])
        fit_texts, y_fit = train.texts, y_all
        cal_texts, y_cal = val.texts, np.array([index[lab] for lab in val.labels])
    else:
        tr, te = _split(len(train.texts), y_all, cfg.holdout_fraction, cfg.seed)
        fit_texts, y_fit = [train.texts[i] for i in tr], y_all[tr]
        cal_texts, y_cal = [train.texts[i] for i in te], y_all[te]
    ood_fit = list(train.ood_texts) + list(ood)
    ood_cal = (list(val.ood_texts) if val is not None else []) + list(ood_val)
    if ood_fit and not ood_cal:  # hold out half of the only OOD rows we have
        rng = random.Random(cfg.seed)
        shuffled = ood_fit[:]
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        ood_fit, ood_cal = shuffled[:half], shuffled[half:]

    aug_fit = augment(fit_texts, cfg.augment, seed=cfg.seed)
    aug_cal = augment(cal_texts, 1, seed=cfg.seed + 1) if cfg.augment else []
    aug_ood = augment(ood_fit, cfg.augment, seed=cfg.seed + 2)
    enc = lambda texts: encoder.encode(texts, progress=progress)  # noqa: E731
    x_fit, x_cal, x_aug, x_aug_cal = enc(fit_texts), enc(cal_texts), enc(aug_fit), enc(aug_cal)
    x_ood_fit, x_ood_cal, x_aug_ood = enc(ood_fit), enc(ood_cal), enc(aug_ood)
    t_embed = time.perf_counter() - t0

    reps = 1 + cfg.augment
    x_train = np.vstack([x_fit, x_aug]) if len(x_aug) else x_fit
    y_train = np.tile(y_fit, reps)
    groups = np.tile(np.arange(len(y_fit)), reps)
    best: tuple[float, int, float, dict, np.ndarray, np.ndarray] | None = None
    cv_scores: dict[str, Any] = {}
    for k in ([1, 8] if cfg.subclasses == 0 else [cfg.subclasses]):
        sub_k, units_k = _subclusters(x_fit, y_fit, len(labels), k, cfg.seed)
        c_k, scores_k = _choose_c(x_train, y_train, np.tile(sub_k, reps), units_k, groups, cfg)
        cv_scores[f"subclasses={k}"] = scores_k
        # sub-clusters add capacity and within-source CV flatters them: demand a clear gain
        score = max(scores_k.values(), default=0.0) - (0.01 if k > 1 else 0.0)
        if best is None or score > best[0]:
            best = (score, k, c_k, scores_k, sub_k, units_k)
    assert best is not None
    _, _, c, _, sub_fit, unit_label = best
    u_train = np.tile(sub_fit, reps)
    coef, intercept = _fit_linear(x_train, u_train, len(unit_label), c, cfg)

    grouped = len(unit_label) != len(labels)
    model = RouterModel(
        labels=labels,
        coef=coef.astype(np.float32),
        intercept=intercept.astype(np.float32),
        groups=unit_label.astype(np.int32) if grouped else None,
    )
    temperature = 1.0
    if cfg.calibration == "temperature":
        temperature = fit_temperature(model.logits(x_cal).astype(np.float64), y_cal, model.groups)
        temperature = max(temperature, cfg.min_temperature)
    model.temperature = temperature

    # abstain rule: threshold from in-domain held-out rows (and their framed copies)
    x_in_cal = np.vstack([x_cal, x_aug_cal]) if len(x_aug_cal) else x_cal
    candidates = {"max_prob": AbstainRule(score="max_prob")}
    if len(x_ood_fit) and cfg.abstain_score in ("auto", "in_domain"):
        w, b = _fit_in_domain_detector(x_train, np.vstack([x_ood_fit, x_aug_ood]), cfg.seed)
        candidates["in_domain"] = AbstainRule(score="in_domain", ood_coef=w.astype(np.float32), ood_intercept=b)
    if cfg.abstain_score != "auto":
        candidates = {k: v for k, v in candidates.items() if k == cfg.abstain_score}
        if not candidates:
            raise RouterError("abstain score 'in_domain' needs out-of-domain rows (--ood or --ood-label)")
    choice: dict[str, float] = {}
    for name, rule in candidates.items():
        rule.target_false_reject = cfg.max_false_reject
        model.abstain = rule
        conf_in = model.confidence(x_in_cal, model.predict_proba(x_in_cal))
        rule.threshold = float(np.quantile(conf_in, cfg.max_false_reject)) if cfg.max_false_reject > 0 else 0.0
        if len(x_ood_cal):
            conf_ood = model.confidence(x_ood_cal, model.predict_proba(x_ood_cal))
            choice[name] = float((conf_ood < rule.threshold).mean())
    best = max(choice, key=lambda k: (choice[k], k == "max_prob")) if choice else "max_prob"
    model.abstain = candidates[best]

    model.embedding = {
        "name": encoder.name,
        "dim": int(encoder.dim),
        "fingerprint": encoder.fingerprint(),
        "max_seq_length": encoder.config.max_seq_length,
        "normalize": encoder.config.normalize,
    }
    model.classifier = {
        "type": cfg.estimator,
        "C": c,
        "class_weight": cfg.class_weight,
        "cv_macro_f1": cv_scores,
        "augment_copies": cfg.augment,
        "units": len(unit_label),
    }
    model.calibration = {"method": cfg.calibration, "fit_on": "validation" if val is not None else "holdout"}
    model.training = {
        "data_hash": data_hash,
        "config": asdict(cfg),
        "counts": train.counts(),
        "n_ood_fit": len(ood_fit),
        "n_ood_heldout": len(ood_cal),
        "abstain_candidates_ood_recall": choice,
        "issues": list(train.issues) + (list(val.issues) if val is not None else []),
    }
    model.versions = library_versions()
    info = {"train_seconds": round(time.perf_counter() - t0, 2), "embed_seconds": round(t_embed, 2)}
    return FittedRouter(model, x_cal, y_cal, list(cal_texts), x_ood_cal, list(ood_cal), info)


def train_and_save(
    data: str,
    *,
    val: str | None = None,
    ood: str | None = None,
    ood_val: str | None = None,
    data_config: Any = None,
    train_config: TrainConfig | None = None,
    embed_config: Any = None,
    store: str | None = None,
    artifact_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Load files, fit, evaluate on the held-out rows and write artifact + report.

    Writes a new version into ``store`` (the first one becomes current), or a plain
    artifact directory at ``artifact_dir``. Returns (path written, metrics).
    """
    from router_training.artifact import RouterStore, save_model
    from router_training.data import DataConfig, data_hash, load_labeled, load_texts
    from router_training.embed import EmbedConfig
    from router_training.evaluate import evaluate_arrays, report_files

    dcfg = data_config or DataConfig()
    train = load_labeled(data, dcfg)
    val_data = load_labeled(val, dcfg, allowed_labels=train.labels_set, require_classes=False) if val else None
    ood_rows = load_texts(ood, text_field=dcfg.text_field) if ood else []
    ood_val_rows = load_texts(ood_val, text_field=dcfg.text_field) if ood_val else []
    encoder = Encoder(embed_config or EmbedConfig())
    fitted = fit_router(
        train,
        encoder=encoder,
        val=val_data,
        ood=ood_rows,
        ood_val=ood_val_rows,
        config=train_config,
        data_hash=data_hash([data, val, ood, ood_val]),
        progress=progress,
    )
    model = fitted.model
    metrics = evaluate_arrays(model, fitted.cal_x, fitted.cal_y, fitted.cal_texts, ood_x=fitted.ood_x)
    metrics["eval_data_hash"] = data_hash([val, ood_val]) if val else "holdout:" + data_hash([data, ood])
    metrics["eval_data"] = "validation file" if val else "held-out share of the training file"
    metrics.update(fitted.info)
    model.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "confused_pairs")}
    notes = [
        f"Labels: {', '.join(model.labels)}. Classifier: {model.classifier['type']} (C={model.classifier['C']}), "
        f"temperature {model.temperature:.3f}, abstain on {model.abstain.score} < {model.abstain.threshold:.4f}.",
        f"Evaluated on the {metrics['eval_data']}; the temperature and threshold were fitted on it too, "
        "so false_reject_rate is the target by construction.",
    ]
    extra = report_files(metrics, model.labels, title="Router training report", notes=notes)
    if artifact_dir:
        out = save_model(model, artifact_dir, extra_files=extra, overwrite=overwrite)
    else:
        st = RouterStore(store)
        version = st.next_version()
        out = save_model(model, st.root / version, extra_files=extra)
        if st.current() is None:
            st.set_current(version)
    return str(out), metrics
