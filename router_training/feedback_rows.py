"""Feedback rows (corrections, good ratings) merged into router training data.

Rows are plain dicts ``{"text", "label", "weight", "kind"?}`` (kind ``corrections`` or ``good``);
``orchestrator.feedback.training_rows`` makes them from a feedback log (this package does not
import ``orchestrator``). The fit has no
sample weights, so a row of weight ``w`` is repeated ``max(1, round(w * repeat))`` times. Every
row is checked with the one name rule (:mod:`expertmix.names`) and must name a label of the
training data; a feedback text that is also in the training data replaces that row (the
feedback label wins). What was used and what was skipped (and why) is counted.

>>> from router_training.data import LabeledData
>>> train = LabeledData(texts=["a", "b"], labels=["x", "y"], lines=[1, 2])
>>> merged, rep, used = merge_feedback(train, [{"text": "a", "label": "y", "weight": 1.0}], repeat=2)
>>> merged.texts, merged.labels, rep["used"], rep["overrode_training"]
(['b', 'a', 'a'], ['y', 'y', 'y'], 1, 1)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from expertmix.names import name_problem
from router_training.data import LabeledData

__all__ = ["FEEDBACK_FILE", "describe", "feedback_copies", "feedback_file", "merge_feedback"]

#: file written into a trained artifact with the feedback rows it used (``router promote`` reads it)
FEEDBACK_FILE = "feedback.jsonl"
MAX_CHARS = 10_000


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def feedback_copies(weight: float, repeat: int) -> int:
    """How many times a row of ``weight`` is repeated in the training rows."""
    return max(1, round(weight * repeat))


def _check(row: Any, labels: set[str]) -> tuple[str, str, float, str] | str:
    """(text, label, weight, kind), or the reason the row is skipped."""
    if not isinstance(row, Mapping):
        return "not_an_object"
    text, label, weight = row.get("text"), row.get("label"), row.get("weight", 1.0)
    if not isinstance(text, str) or not text.strip():
        return "no_text"
    if len(text) > MAX_CHARS:
        return "text_too_long"
    if name_problem(label, what="label") is not None:
        return "bad_label"
    if label not in labels:
        return "label_not_in_training_data"
    try:
        w = float(weight)
    except (TypeError, ValueError):
        return "bad_weight"
    if not math.isfinite(w) or w <= 0:
        return "bad_weight"
    return text.strip(), str(label), w, str(row.get("kind") or "corrections")


def merge_feedback(
    train: LabeledData,
    rows: Iterable[Mapping[str, Any]],
    *,
    repeat: int = 2,
    val: LabeledData | None = None,
) -> tuple[LabeledData, dict[str, Any], list[dict[str, Any]]]:
    """``train`` plus the feedback rows (repeated by weight); returns (new data, report, rows used).

    The report counts rows ``used``, ``copies`` added, ``skipped`` by reason, training rows the
    feedback ``overrode_training`` (other label) or ``already_in_training`` (same label),
    feedback texts also ``in_validation`` (they make the validation score optimistic),
    ``duplicates`` (same text twice in the feedback; the last wins) and a ``sha256`` of the used rows.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    labels = set(train.labels)
    skipped: dict[str, int] = {}
    kept: dict[str, tuple[str, str, float, str]] = {}
    duplicates = 0
    for row in rows:
        checked = _check(row, labels)
        if isinstance(checked, str):
            skipped[checked] = skipped.get(checked, 0) + 1
            continue
        key = _key(checked[0])
        if key in kept:
            duplicates += 1
            del kept[key]  # re-insert so the order follows the latest
        kept[key] = checked
    train_keys = {_key(t): i for i, t in enumerate(train.texts)}
    drop: set[int] = set()
    overrode = already = 0
    for key, (_, label, _, _) in kept.items():
        i = train_keys.get(key)
        if i is None:
            continue
        drop.add(i)
        if train.labels[i] == label:
            already += 1
        else:
            overrode += 1
    val_keys = {_key(t) for t in val.texts} if val is not None else set()
    keep = [i for i in range(len(train.texts)) if i not in drop]
    out = LabeledData(
        texts=[train.texts[i] for i in keep],
        labels=[train.labels[i] for i in keep],
        lines=[train.lines[i] for i in keep],
        ood_texts=list(train.ood_texts),
        paths=list(train.paths),
        issues=list(train.issues),
        sources=[train.sources[i] for i in keep] if len(train.sources) == len(train.texts) else [],
        conflicts=train.conflicts,
    )
    copies = 0
    for text, label, weight, _ in kept.values():
        n = feedback_copies(weight, repeat)
        copies += n
        out.texts += [text] * n
        out.labels += [label] * n
        out.lines += [0] * n
        if out.sources or not train.texts:
            out.sources += ["feedback"] * n
    used = [{"text": t, "label": lab, "weight": w, "kind": k} for t, lab, w, k in kept.values()]
    report: dict[str, Any] = {
        "used": len(kept),
        "copies": copies,
        "repeat": repeat,
        "skipped": dict(sorted(skipped.items())),
        "duplicates": duplicates,
        "overrode_training": overrode,
        "already_in_training": already,
        "in_validation": sum(1 for k in kept if k in val_keys),
        "by_label": {lab: sum(1 for r in kept.values() if r[1] == lab) for lab in sorted(labels)},
        "by_kind": dict(sorted(Counter(r[3] for r in kept.values()).items())),
        "sha256": hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest(),
    }
    out.issues.append(describe(report))
    return out, report, used


def describe(report: Mapping[str, Any]) -> str:
    """One line for the training report."""
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    line = (
        f"feedback: {report['used']} row(s) used as {report['copies']} training copies "
        f"(weight x {report['repeat']}, no sample weights in the fit); skipped: {skipped}; "
        f"{report['duplicates']} duplicate(s), {report['overrode_training']} relabelled training row(s), "
        f"{report['already_in_training']} already in training"
    )
    if report.get("in_validation"):
        line += f"; {report['in_validation']} also in the validation data (its score is optimistic)"
    return line


def feedback_file(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The used rows as JSON lines (``FEEDBACK_FILE`` in the artifact)."""
    return "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows).encode()
