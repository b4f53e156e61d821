"""Leave-one-source-out evaluation: how the router does on a kind of text it has never seen.

A router scores ~99% on its own validation split because val rows come from the same
sources, in the same register, as the training rows. LOSO measures generalization instead:
for every label with two or more sources, and each of its sources, train on everything but
that source's rows and test on them (all rows of that source, training and validation
file). The macro accuracy is the mean over held-out sources.

    >>> res = loso(train, encoder=Encoder(), config=TrainConfig(), val=val)   # doctest: +SKIP
    >>> res["macro_accuracy"], res["per_source"]                             # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from expertmix.errors import DataError
from router_training.data import LabeledData

__all__ = ["MemoEncoder", "held_out_sources", "loso"]


class MemoEncoder:
    """Wraps an encoder; each distinct text is embedded once per process (LOSO refits often)."""

    def __init__(self, encoder: Any) -> None:
        self.inner = encoder
        self.name, self.config, self.path = encoder.name, encoder.config, encoder.path
        self._memo: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def fingerprint(self) -> str:
        return str(self.inner.fingerprint())

    def encode(self, texts: Sequence[str], *, progress: bool = False, cache: bool | None = None) -> np.ndarray:
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            vecs = self.inner.encode(missing, progress=progress, cache=cache)
            self._memo.update(zip(missing, vecs, strict=True))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts])

    def encode_one(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


def held_out_sources(data: LabeledData) -> list[tuple[str, str]]:
    """(label, source) pairs to hold out: every source of a label that has at least two."""
    if not data.sources or not any(data.sources):
        raise DataError(
            "leave-one-source-out needs a source field on every row (e.g. \"source\": \"forum\")",
            path=data.paths[0] if data.paths else None,
        )
    pairs = sorted({(lab, src) for lab, src in zip(data.labels, data.sources, strict=True)})
    per_label: dict[str, list[str]] = {}
    for lab, src in pairs:
        per_label.setdefault(lab, []).append(src)
    out = [(lab, src) for lab, srcs in per_label.items() if len(srcs) >= 2 for src in srcs]
    if not out:
        raise DataError("no label has two or more sources: nothing to hold out", path=data.paths[0])
    return out


def _subset(data: LabeledData, keep: np.ndarray) -> LabeledData:
    idx = np.flatnonzero(keep)
    return LabeledData(
        texts=[data.texts[i] for i in idx],
        labels=[data.labels[i] for i in idx],
        lines=[data.lines[i] for i in idx],
        ood_texts=list(data.ood_texts),
        paths=list(data.paths),
        sources=[data.sources[i] for i in idx],
    )


def loso(
    train: LabeledData,
    *,
    encoder: Any,
    config: Any = None,
    val: LabeledData | None = None,
    extra: LabeledData | None = None,
    ood: Sequence[str] = (),
    max_test: int | None = None,
    sources: Sequence[tuple[str, str]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per held-out source accuracy (argmax, no abstain) and their mean.

    Each fold trains with ``fit_router`` exactly as ``expertmix router train`` would (same
    config, augmentation and extra texts) on ``train`` without the held-out source, with a
    held-out share of the remaining rows for calibration; the test rows are that source's
    rows of ``train`` and ``val``. ``max_test`` caps test rows per source (first rows).
    """
    from dataclasses import replace

    from router_training.train import TrainConfig, fit_router

    # folds are scored on the argmax: skip fitting OOD scores (the classifier is the recipe's)
    config = replace(config or TrainConfig(), abstain_score="max_prob")
    enc = encoder if isinstance(encoder, MemoEncoder) else MemoEncoder(encoder)
    test_pool = train if val is None else _concat(train, val)
    pairs = list(sources) if sources is not None else held_out_sources(train)
    per_source: dict[str, float] = {}
    details: dict[str, Any] = {}
    for lab, src in pairs:
        t0 = time.perf_counter()
        tr_mask = ~((np.array(train.labels) == lab) & (np.array(train.sources) == src))
        te_idx = [i for i, (lb, s) in enumerate(zip(test_pool.labels, test_pool.sources, strict=True))
                  if lb == lab and s == src][: max_test or None]
        fitted = fit_router(_subset(train, tr_mask), encoder=enc, extra=extra, ood=ood, config=config, progress=progress)
        model = fitted.model
        x = enc.encode([test_pool.texts[i] for i in te_idx])
        probs = model.predict_proba(x)
        pred = np.array(model.labels)[probs.argmax(axis=1)]
        acc = float((pred == lab).mean())
        key = src if [s for _, s in pairs].count(src) == 1 else f"{lab}/{src}"
        per_source[key] = acc
        wrong = {k: int(v) for k, v in zip(*np.unique(pred[pred != lab], return_counts=True), strict=True)}
        details[key] = {
            "label": lab,
            "n": len(te_idx),
            "accuracy": acc,
            "top2_accuracy": float((np.argsort(-probs, axis=1)[:, :2] == model.labels.index(lab)).any(axis=1).mean()),
            "predicted_instead": wrong,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return {
        "macro_accuracy": float(np.mean(list(per_source.values()))),
        "per_source": per_source,
        "details": details,
    }


def _concat(a: LabeledData, b: LabeledData) -> LabeledData:
    return LabeledData(
        texts=a.texts + b.texts,
        labels=a.labels + b.labels,
        lines=a.lines + b.lines,
        ood_texts=a.ood_texts + b.ood_texts,
        paths=a.paths + b.paths,
        sources=(a.sources or [""] * len(a.texts)) + (b.sources or [""] * len(b.texts)),
    )
