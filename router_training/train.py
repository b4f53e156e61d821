"""Fit the router: training texts (+ register-changing augmentation) → linear classifier
(C by cross-validation) → temperature → abstain rule on distance and learned OOD scores.

    >>> fitted = fit_router(train, val=val, ood=ood_texts, encoder=Encoder())   # doctest: +SKIP
    >>> fitted.model.labels, fitted.model.abstain.threshold                    # doctest: +SKIP

Augmentation (``router_training.augment``) is applied in memory; nothing is copied or stored.
Extra labeled texts (``extra``: e.g. the department descriptions in
``router_training/recipes/departments.jsonl``) are added to the training rows ``extra_weight``
times; they are never used for calibration or evaluation.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from expertmix.errors import DataError, RouterError
from router_training.artifact import RouterModel, library_versions
from router_training.augment import cross_forms, frame, question_forms
from router_training.classifier import fit_classifier, fit_temperature
from router_training.data import LabeledData
from router_training.embed import Encoder
from router_training.schema import ABSTAIN_SCORES

__all__ = ["ESTIMATORS", "FittedRouter", "TrainConfig", "augment", "fit_router", "fit_temperature"]

ESTIMATORS = ("logreg", "linear_svm", "ridge", "centroid")


def augment(texts: Sequence[str], copies: int, *, seed: int = 0) -> list[str]:
    """``copies`` conversationally framed variants per text (see ``augment.frame``)."""
    return frame(texts, copies, seed=seed)


@dataclass
class TrainConfig:
    """Classifier, augmentation, calibration and abstain settings."""

    estimator: str = "logreg"
    """One of logreg (default), linear_svm, ridge, centroid."""
    c_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
    """Inverse regularization strengths tried by cross-validation. One value = no CV. When the
    data has a source field and a label with two or more sources, the CV holds out one source
    at a time (the accuracy on a kind of text not seen: within-source CV prefers large C, which
    generalizes worse to new sources); otherwise stratified CV on macro-F1."""
    cv_folds: int = 3
    class_weight: str | None = "balanced"
    """Used with ``balance="label"`` only (sklearn's class_weight)."""
    balance: str = "source"
    """Row weights: ``source`` = every label the same total weight, shared equally by the
    label's sources (the ``source`` field; the extra labeled texts count as one source, the
    feedback rows weigh like an average row), so a big source does not make its register the
    label's; ``label`` = class-balanced only; ``none``."""
    calibration: str = "temperature"
    """temperature (fit on held-out rows) or none."""
    min_temperature: float = 0.5
    """Lower bound of the fitted temperature. Held-out rows from the training distribution are
    nearly separable, so the NLL-optimal temperature sharpens (0.36 on the shared val); that is
    overconfident on differently phrased queries and collapses every top-k mixture onto one
    expert. 0.5 has the lowest calibration error on leave-one-source-out predictions of the
    default recipe (ECE 0.016 pooled; 0.14 at 1.0, which is underconfident with C=0.1);
    0 = unconstrained."""
    max_false_reject: float = 0.03
    """Abstain threshold: at most this share of in-domain held-out rows rejected."""
    abstain_score: str = "auto"
    """auto (the best held-out off-topic recall), or one of max_prob, in_domain, knn,
    mahalanobis, energy, combined (any combination; ``combined:knn+in_domain`` names one)."""
    augment: int = 1
    """Conversational copies per training text (0 = off)."""
    question_forms: int = 2
    """Question/request rewrites per statement or imperative training text (0 = off)."""
    cross_forms: int = 3
    """User story <-> requirement rewrites per story or requirement training text (0 = off)."""
    rewrite_weight: float = 3.0
    """Weight of a question-form or cross-form rewrite relative to an original row of the same
    source (with ``balance="source"``): the rewrites are what users type."""
    extra_weight: int = 3
    """How many times each extra labeled text (descriptions) is added to the training rows."""
    subclasses: int = 0
    """k-means sub-clusters per label (a label often mixes several sources or intents);
    the classifier scores sub-clusters and a label's probability is their sum. 1 = off,
    0 = auto: off when the data has sources to hold out (C is then chosen by
    leave-one-source-out, where sub-clusters lost: they fit a source's register), else 1 or
    8 by cross-validation (8 only when it gains at least 0.01 macro-F1), e.g. CLINC150's
    domains made of many intents."""
    knn_k: int = 5
    """The knn OOD score is the similarity to the k-th nearest training text."""
    ood_units: int = 16
    """k-means means per classifier unit for the Mahalanobis OOD score (1 = class means)."""
    cv_max_rows: int = 6000
    """Cross-validation for C runs on at most this many (original) rows."""
    holdout_fraction: float = 0.2
    """Share of training rows held out for calibration when no validation file is given."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise RouterError(f"unknown estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.balance not in ("source", "label", "none"):
            raise RouterError(f"unknown balance {self.balance!r}; choose source, label or none")
        if self.calibration not in ("temperature", "none"):
            raise RouterError(f"unknown calibration {self.calibration!r}; choose temperature or none")
        head = self.abstain_score.split(":", 1)[0]
        if self.abstain_score != "auto" and head not in ABSTAIN_SCORES:
            raise RouterError(
                f"unknown abstain score {self.abstain_score!r}; choose auto or one of {', '.join(ABSTAIN_SCORES)}"
            )
        if not 0.0 <= self.max_false_reject < 0.5:
            raise RouterError("max_false_reject must be in [0, 0.5)")
        for name in ("augment", "question_forms", "cross_forms", "extra_weight", "rewrite_weight"):
            if getattr(self, name) < 0:
                raise RouterError(f"{name} must be >= 0")
        if self.knn_k < 1 or self.ood_units < 1:
            raise RouterError("knn_k and ood_units must be >= 1")


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
    candidates: dict[str, Any] = field(default_factory=dict)
    """Every abstain rule tried (threshold set), by name; the chosen one is ``model.abstain``."""


@dataclass
class _Split:
    fit_texts: list[str]
    y_fit: np.ndarray
    src_fit: list[str]
    cal_texts: list[str]
    y_cal: np.ndarray
    ood_fit: list[str]
    ood_cal: list[str]


def _split_rows(n: int, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    tr, te = train_test_split(idx, test_size=frac, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


def _split(
    train: LabeledData, val: LabeledData | None, ood: Sequence[str], ood_val: Sequence[str], labels: tuple[str, ...],
    cfg: TrainConfig,
) -> _Split:
    """Training vs held-out rows (validation file, else a stratified share), in- and off-topic."""
    index = {lab: i for i, lab in enumerate(labels)}
    y_all = np.array([index[lab] for lab in train.labels])
    src_all = list(train.sources) if len(train.sources) == len(train.texts) else [""] * len(train.texts)
    if val is not None:
        unknown = sorted(set(val.labels) - set(labels))
        if unknown:
            raise DataError(f"validation labels not in training data: {', '.join(unknown)}", path=val.paths[0])
        fit_texts, y_fit, src_fit = list(train.texts), y_all, src_all
        cal_texts, y_cal = list(val.texts), np.array([index[lab] for lab in val.labels], dtype=int)
    else:
        tr, te = _split_rows(len(train.texts), y_all, cfg.holdout_fraction, cfg.seed)
        fit_texts, y_fit, src_fit = [train.texts[i] for i in tr], y_all[tr], [src_all[i] for i in tr]
        cal_texts, y_cal = [train.texts[i] for i in te], y_all[te]
    ood_fit = list(train.ood_texts) + list(ood)
    ood_cal = (list(val.ood_texts) if val is not None else []) + list(ood_val)
    if ood_fit and not ood_cal:  # hold out half of the only OOD rows we have
        rng = random.Random(cfg.seed)
        shuffled = ood_fit[:]
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        ood_fit, ood_cal = shuffled[:half], shuffled[half:]
    return _Split(fit_texts, y_fit, src_fit, cal_texts, y_cal, ood_fit, ood_cal)


def _rewrites(texts: Sequence[str], copies: int, seed: int, cross: int = 0) -> tuple[list[str], list[int]]:
    out, src = [], []
    for i, t in enumerate(texts):
        for q in question_forms(t, copies=copies, seed=seed) + cross_forms(t, copies=cross, seed=seed):
            out.append(q)
            src.append(i)
    return out, src


def _training_rows(
    sp: _Split, extra: LabeledData | None, labels: tuple[str, ...], cfg: TrainConfig
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Texts, labels, CV groups (original row index; extra texts get unique negative ids) and
    the source of each row (copies inherit their original's)."""
    texts = list(sp.fit_texts) + augment(sp.fit_texts, cfg.augment, seed=cfg.seed)
    n = len(sp.fit_texts)
    groups = list(range(n)) * (1 + cfg.augment)
    q_texts, q_src = _rewrites(sp.fit_texts, cfg.question_forms, cfg.seed, cfg.cross_forms)
    texts += q_texts
    groups += q_src
    y = list(np.tile(sp.y_fit, 1 + cfg.augment)) + [int(sp.y_fit[i]) for i in q_src]
    if extra is not None and cfg.extra_weight:
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted(set(extra.labels) - set(labels))
        if unknown:
            raise DataError(f"extra labels not in training data: {', '.join(unknown)}", path=extra.paths[0])
        for _ in range(cfg.extra_weight):
            texts += extra.texts
            y += [index[lab] for lab in extra.labels]
        groups += [-(1 + i) for i in range(len(extra.texts))] * cfg.extra_weight
    g = np.asarray(groups, dtype=int)
    has_src = extra is not None and len(extra.sources) == len(extra.texts)
    extra_src = [s or "extra" for s in extra.sources] if extra is not None and has_src else []
    sources = [sp.src_fit[i] if i >= 0 else (extra_src[-i - 1] if extra_src else "extra") for i in g]
    return texts, np.asarray(y, dtype=int), g, sources


def source_weights(
    y: np.ndarray, sources: Sequence[str], *, multiplier: np.ndarray | None = None,
    light: tuple[str, ...] = ("feedback",),
) -> np.ndarray:
    """Row weights: every label the same total, shared equally by its sources (inside a source,
    rows weigh ``multiplier``, default 1); rows of a ``light`` source (feedback) weigh like an
    average row of their label. Mean weight 1.

        >>> source_weights(np.array([0, 0, 0, 1]), ["a", "a", "b", "c"]).round(2).tolist()
        [0.5, 0.5, 1.0, 2.0]
    """
    src = np.asarray(list(sources), dtype=object)
    w = np.zeros(len(y), dtype=np.float64)
    mult = np.ones(len(y)) if multiplier is None else np.asarray(multiplier, dtype=np.float64)
    for lab in np.unique(y):
        in_lab = y == lab
        heavy = in_lab & ~np.isin(src, light)
        names = np.unique(src[heavy])
        for s in names:
            m = heavy & (src == s)
            w[m] = mult[m] / (len(names) * mult[m].sum())
        rest = in_lab & ~heavy
        w[rest] = w[heavy].mean() if heavy.any() else 1.0
        w[in_lab] /= w[in_lab].sum()
    return w * len(y) / w.sum()


def _held_out_in_domain(sp: _Split, cfg: TrainConfig) -> list[str]:
    """Held-out in-domain texts for thresholds: originals, framed and rewritten copies."""
    texts = list(sp.cal_texts)
    if cfg.augment:
        texts += augment(sp.cal_texts, 1, seed=cfg.seed)
    if cfg.question_forms:
        texts += _rewrites(sp.cal_texts, 1, cfg.seed, min(1, cfg.cross_forms))[0]
    return texts


def fit_router(
    train: LabeledData,
    *,
    encoder: Encoder,
    val: LabeledData | None = None,
    ood: Sequence[str] = (),
    ood_val: Sequence[str] = (),
    extra: LabeledData | None = None,
    config: TrainConfig | None = None,
    data_hash: str = "",
    progress: bool = False,
) -> FittedRouter:
    """Fit classifier, temperature and abstain rule; return the model and held-out arrays."""
    from router_training.abstain import AbstainData, fit_abstain

    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    labels = tuple(train.labels_set)
    sp = _split(train, val, ood, ood_val, labels, cfg)
    texts, y_train, groups, row_sources = _training_rows(sp, extra, labels, cfg)
    n_fit = len(sp.fit_texts)
    rewrite = np.zeros(len(texts), dtype=bool)
    rewrite[n_fit * (1 + cfg.augment) : len(texts) - _n_extra(extra, cfg) * cfg.extra_weight] = True
    mult = np.where(rewrite, cfg.rewrite_weight, 1.0)

    def weigh(mask: np.ndarray) -> np.ndarray | None:
        if cfg.balance != "source":
            return None
        src = [row_sources[i] for i in np.flatnonzero(mask)]
        return source_weights(y_train[mask], src, multiplier=mult[mask])

    weights = weigh(np.ones(len(texts), dtype=bool))
    in_cal = _held_out_in_domain(sp, cfg)
    ood_fit_texts = list(sp.ood_fit) + augment(sp.ood_fit, cfg.augment, seed=cfg.seed)
    enc = lambda t: encoder.encode(t, progress=progress)
    x_train, x_cal, x_in_cal = enc(texts), enc(sp.cal_texts), enc(in_cal)
    x_ood_fit, x_ood_cal = enc(ood_fit_texts), enc(sp.ood_cal)
    t_embed = time.perf_counter() - t0

    x_orig = x_train[: len(sp.fit_texts)]
    coef, intercept, unit_label, c, cv_scores = fit_classifier(
        x_train, y_train, groups, x_orig=x_orig, y_orig=sp.y_fit, n_labels=len(labels), config=cfg,
        sample_weight=weights, sources=row_sources, weigh=weigh,
    )
    grouped = len(unit_label) != len(labels)
    model = RouterModel(
        labels=labels,
        coef=coef.astype(np.float32),
        intercept=intercept.astype(np.float32),
        groups=unit_label.astype(np.int32) if grouped else None,
    )
    if cfg.calibration == "temperature":
        t = fit_temperature(model.logits(x_cal).astype(np.float64), sp.y_cal, model.groups)
        model.temperature = max(t, cfg.min_temperature)

    unit = (x_train @ coef.T + intercept).argmax(axis=1)
    own = unit_label[unit] == y_train  # rows whose best unit is of their own label
    unit = np.where(own, unit, np.array([np.flatnonzero(unit_label == k)[0] for k in y_train]))
    data = AbstainData(
        x_fit=x_train, unit=unit, x_bank=_bank(x_train, len(sp.fit_texts), cfg, _n_extra(extra, cfg)),
        x_in_cal=x_in_cal, x_ood_fit=x_ood_fit, x_ood_cal=x_ood_cal,
    )
    model.abstain, choice, candidates = fit_abstain(model, data, config=cfg)
    _describe(model, encoder, cfg, c, cv_scores, unit_label, val, train, sp, choice, data_hash, extra)
    info = {"train_seconds": round(time.perf_counter() - t0, 2), "embed_seconds": round(t_embed, 2)}
    fitted = FittedRouter(model, x_cal, sp.y_cal, list(sp.cal_texts), x_ood_cal, list(sp.ood_cal), info)
    fitted.candidates = candidates
    return fitted


def _bank(x_train: np.ndarray, n: int, cfg: TrainConfig, n_extra: int) -> np.ndarray:
    """knn bank: original training rows, their question-form rewrites and one copy of the extra texts."""
    start = n * (1 + cfg.augment)
    stop = len(x_train) - n_extra * cfg.extra_weight
    parts = [x_train[:n], x_train[start:stop], x_train[len(x_train) - n_extra :] if n_extra else x_train[:0]]
    return np.vstack(parts)


def _n_extra(extra: LabeledData | None, cfg: TrainConfig) -> int:
    return len(extra.texts) if extra is not None and cfg.extra_weight else 0


def _describe(
    model: RouterModel, encoder: Encoder, cfg: TrainConfig, c: float, cv_scores: dict, unit_label: np.ndarray,
    val: LabeledData | None, train: LabeledData, sp: _Split, choice: dict[str, float], data_hash: str,
    extra: LabeledData | None,
) -> None:
    """Provenance written into router.json."""
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
        "class_weight": cfg.class_weight if cfg.balance == "label" else None,
        "cv_macro_f1": cv_scores,
        "augment_copies": cfg.augment,
        "question_forms": cfg.question_forms,
        "cross_forms": cfg.cross_forms,
        "balance": cfg.balance,
        "units": len(unit_label),
    }
    model.calibration = {"method": cfg.calibration, "fit_on": "validation" if val is not None else "holdout"}
    model.training = {
        "data_hash": data_hash,
        "config": asdict(cfg),
        "counts": train.counts(),
        "n_extra": len(extra.texts) if extra is not None else 0,
        "n_ood_fit": len(sp.ood_fit),
        "n_ood_heldout": len(sp.ood_cal),
        "abstain_candidates_ood_recall": choice,
        "issues": list(train.issues) + (list(val.issues) if val is not None else []),
    }
    model.versions = library_versions()


def _paths(p: str | Sequence[str] | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else [str(x) for x in p]


def train_and_save(
    data: str,
    *,
    val: str | None = None,
    ood: str | Sequence[str] | None = None,
    ood_val: str | Sequence[str] | None = None,
    extra: str | Sequence[str] | None = None,
    data_config: Any = None,
    train_config: TrainConfig | None = None,
    embed_config: Any = None,
    store: str | None = None,
    artifact_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    feedback: Sequence[Mapping[str, Any]] = (),
    feedback_repeat: int = 2,
) -> tuple[str, dict[str, Any]]:
    """Load files, fit, evaluate on the held-out rows and write artifact + report.

    ``ood``/``ood_val``/``extra`` take one path or several. Writes a new version into
    ``store`` (the first one becomes current), or a plain artifact directory at
    ``artifact_dir``. ``feedback`` rows ``{"text", "label", "weight"}`` are added to the training
    rows (:mod:`router_training.feedback_rows`; counted in ``model.training["feedback"]``).
    Returns (path written, metrics).
    """
    from router_training.artifact import RouterStore, save_model
    from router_training.data import DataConfig, data_hash, load_labeled, load_texts
    from router_training.embed import EmbedConfig
    from router_training.evaluate import evaluate_arrays, report_files

    dcfg = data_config or DataConfig()
    train = load_labeled(data, dcfg)
    val_data = load_labeled(val, dcfg, allowed_labels=train.labels_set, require_classes=False) if val else None
    ood_paths, ood_val_paths, extra_paths = _paths(ood), _paths(ood_val), _paths(extra)
    ood_rows = [t for p in ood_paths for t in load_texts(p, text_field=dcfg.text_field)]
    ood_val_rows = [t for p in ood_val_paths for t in load_texts(p, text_field=dcfg.text_field)]
    extra_data = None
    for p in extra_paths:
        d = load_labeled(p, dcfg, allowed_labels=train.labels_set, require_classes=False)
        if extra_data is None:
            extra_data = d
        else:
            extra_data.texts += d.texts
            extra_data.labels += d.labels
            extra_data.paths += d.paths
    fb_report, fb_used = None, []
    if feedback:
        from router_training.feedback_rows import merge_feedback

        train, fb_report, fb_used = merge_feedback(train, feedback, repeat=feedback_repeat, val=val_data)
    encoder = Encoder(embed_config or EmbedConfig())
    fitted = fit_router(
        train,
        encoder=encoder,
        val=val_data,
        ood=ood_rows,
        ood_val=ood_val_rows,
        extra=extra_data,
        config=train_config,
        data_hash=data_hash([data, val, *ood_paths, *ood_val_paths, *extra_paths])
        + (f"+feedback:{fb_report['sha256']}" if fb_report else ""),
        progress=progress,
    )
    model = fitted.model
    if fb_report is not None:
        model.training["feedback"] = fb_report
    metrics = evaluate_arrays(model, fitted.cal_x, fitted.cal_y, fitted.cal_texts, ood_x=fitted.ood_x)
    metrics["eval_data_hash"] = (
        data_hash([val, *ood_val_paths]) if val else "holdout:" + data_hash([data, *ood_paths])
    )
    metrics["eval_data"] = "validation file" if val else "held-out share of the training file"
    metrics.update(fitted.info)
    model.metrics = {k: v for k, v in metrics.items() if k not in ("confusion_matrix", "confused_pairs")}
    notes = [
        f"Labels: {', '.join(model.labels)}. Classifier: {model.classifier['type']} (C={model.classifier['C']}), "
        f"temperature {model.temperature:.3f}, abstain on {model.abstain.score} < {model.abstain.threshold:.4f}.",
        f"Evaluated on the {metrics['eval_data']}; the temperature and threshold were fitted on it too, "
        "so false_reject_rate is the target by construction.",
    ]
    if fb_report is not None:
        from router_training.feedback_rows import FEEDBACK_FILE, describe, feedback_file

        notes.append(describe(fb_report).capitalize() + ".")
        metrics["feedback"] = fb_report
    extra = report_files(metrics, model.labels, title="Router training report", notes=notes)
    if fb_used:
        extra[FEEDBACK_FILE] = feedback_file(fb_used)
    if artifact_dir:
        out = save_model(model, artifact_dir, extra_files=extra, overwrite=overwrite)
    else:
        st = RouterStore(store)
        version = st.next_version()
        out = save_model(model, st.root / version, extra_files=extra)
        if st.current() is None:
            st.set_current(version)
    return str(out), metrics
