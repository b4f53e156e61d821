"""Router metrics and the evaluation report (JSON, Markdown, confusion-matrix PNG).

    >>> m = evaluate_arrays(model, x, y, texts, ood_x=ox)    # doctest: +SKIP
    >>> m["accuracy"], m["ood_recall"], m["false_reject_rate"]   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from expertmix.io import atomic_write_bytes, atomic_write_text
from router_training.artifact import RouterModel

__all__ = ["METRIC_KEYS", "evaluate_arrays", "expected_calibration_error", "render_markdown", "write_report"]

METRIC_KEYS = (
    "n",
    "n_ood",
    "accuracy",
    "macro_f1",
    "top2_accuracy",
    "ece",
    "ece_uncalibrated",
    "ood_auroc",
    "ood_recall",
    "false_reject_rate",
)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    if len(y) == 0:
        return float("nan")
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def evaluate_arrays(
    model: RouterModel,
    x: np.ndarray,
    y: np.ndarray,
    texts: Sequence[str],
    *,
    ood_x: np.ndarray | None = None,
    top_pairs: int = 5,
    examples_per_pair: int = 3,
    conf_in: np.ndarray | None = None,
    conf_ood: np.ndarray | None = None,
) -> dict[str, Any]:
    """All report metrics for in-domain rows ``(x, y)`` and optional off-topic rows ``ood_x``.

    ``conf_in`` / ``conf_ood``: abstain scores computed by the caller (the length-robust score of
    ``router_training.long_text``, as at route time); by default ``model.confidence`` of the rows."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

    labels = list(model.labels)
    k = len(labels)
    out: dict[str, Any] = {"n": len(y), "n_ood": int(0 if ood_x is None else len(ood_x))}
    probs = model.predict_proba(x) if len(y) else np.zeros((0, k))
    raw = model.predict_proba(x, calibrated=False) if len(y) else np.zeros((0, k))
    if conf_in is None:
        conf_in = model.confidence(x, probs) if len(y) else np.zeros(0)
    thr = model.abstain.threshold
    if len(y):
        pred = probs.argmax(axis=1)
        top2 = np.argsort(-probs, axis=1)[:, :2]
        out["accuracy"] = float((pred == y).mean())
        out["macro_f1"] = float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0))
        out["top2_accuracy"] = float((top2 == y[:, None]).any(axis=1).mean())
        out["ece"] = expected_calibration_error(probs, y)
        out["ece_uncalibrated"] = expected_calibration_error(raw, y)
        out["false_reject_rate"] = float((conf_in < thr).mean())
        out["routed_accuracy"] = float(((pred == y) & (conf_in >= thr)).mean())
        p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(k)), zero_division=0)
        out["per_label"] = {
            lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, lab in enumerate(labels)
        }
        cm = confusion_matrix(y, pred, labels=list(range(k)))
        out["confusion_matrix"] = cm.tolist()
        out["confused_pairs"] = _confused_pairs(cm, labels, y, pred, texts, top_pairs, examples_per_pair)
    else:
        for key in ("accuracy", "macro_f1", "top2_accuracy", "ece", "ece_uncalibrated", "false_reject_rate"):
            out[key] = None
    if ood_x is not None and len(ood_x):
        if conf_ood is None:
            conf_ood = model.confidence(ood_x, model.predict_proba(ood_x))
        out["ood_recall"] = float((conf_ood < thr).mean())
        if len(y):
            scores = np.r_[-conf_in, -conf_ood]
            is_ood = np.r_[np.zeros(len(conf_in)), np.ones(len(conf_ood))]
            out["ood_auroc"] = float(roc_auc_score(is_ood, scores))
        else:
            out["ood_auroc"] = None
    else:
        out["ood_recall"] = None
        out["ood_auroc"] = None
    out["threshold"] = thr
    out["abstain_score"] = model.abstain.score
    return out


def _confused_pairs(
    cm: np.ndarray,
    labels: list[str],
    y: np.ndarray,
    pred: np.ndarray,
    texts: Sequence[str],
    top: int,
    per_pair: int,
) -> list[dict[str, Any]]:
    pairs = [(int(cm[i, j]), i, j) for i in range(len(labels)) for j in range(len(labels)) if i != j and cm[i, j]]
    out = []
    for count, i, j in sorted(pairs, reverse=True)[:top]:
        idx = np.flatnonzero((y == i) & (pred == j))[:per_pair]
        out.append(
            {
                "true": labels[i],
                "predicted": labels[j],
                "count": count,
                "examples": [texts[t][:200] for t in idx],
            }
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def render_markdown(metrics: dict[str, Any], *, title: str = "Router evaluation", notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += list(notes) + ([""] if notes else [])
    lines += ["| metric | value |", "|---|---|"]
    for key in METRIC_KEYS + ("routed_accuracy", "threshold", "abstain_score"):
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} |")
    per = metrics.get("per_label") or {}
    if per:
        lines += ["", "## Per label", "", "| label | precision | recall | f1 | support |", "|---|---|---|---|---|"]
        for lab, d in per.items():
            lines.append(
                f"| {lab} | {d['precision']:.4f} | {d['recall']:.4f} | {d['f1']:.4f} | {d['support']} |"
            )
    pairs = metrics.get("confused_pairs") or []
    if pairs:
        lines += ["", "## Most confused pairs", ""]
        for p in pairs:
            lines.append(f"- **{p['true']} → {p['predicted']}** ({p['count']})")
            for ex in p["examples"]:
                lines.append(f"  - {ex.replace(chr(10), ' ').replace('|', '/')}")
    return "\n".join(lines) + "\n"


def plot_confusion(metrics: dict[str, Any], labels: Sequence[str]) -> bytes:
    """PNG bytes of the confusion matrix (rows: true, columns: predicted)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"])
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    try:
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = cm.max() if cm.size else 0
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    labels: Sequence[str],
    *,
    title: str = "Router evaluation",
    notes: Sequence[str] = (),
) -> None:
    """``report.json``, ``report.md`` and ``confusion_matrix.png`` into ``out_dir``."""
    for name, data in report_files(metrics, labels, title=title, notes=notes).items():
        atomic_write_bytes(Path(out_dir) / name, data)


def report_files(
    metrics: dict[str, Any], labels: Sequence[str], *, title: str = "Router evaluation", notes: Sequence[str] = ()
) -> dict[str, bytes]:
    files = {
        "report.json": (json.dumps(metrics, indent=2) + "\n").encode(),
        "report.md": render_markdown(metrics, title=title, notes=notes).encode(),
    }
    if metrics.get("confusion_matrix"):
        files["confusion_matrix.png"] = plot_confusion(metrics, labels)
    return files


def write_text_report(path: str | Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
