"""Feedback on answers: what a user says about an answer, appended to a JSON-lines log.

One record per call: the answer ``id`` (the OpenAI response id, ``chatcmpl-…``), a ``rating``
(``good`` / ``bad``), optionally the department that should have answered (``expert``), a
``comment``, and the question ``text``. The feedback log sits beside the answer log (same
directory, ``<answer log stem>.feedback.jsonl``) so the two join on ``id``; without an answer log
it is ``$EXPERTMIX_HOME/feedback.jsonl``. The question text is kept only when the user sends it
or the config keeps query text (``orchestrator.log_query_text``); a correction (``expert``)
without text can only be used for training when the answer log holds the question.
:func:`training_rows` turns feedback into router training rows (weighted, deduplicated, counted).

>>> fb = parse_feedback({"id": "chatcmpl-0123", "rating": "bad", "expert": "finance"}, experts=["finance"])
>>> fb.rating, fb.expert
('bad', 'finance')
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from expertmix.errors import InputError

__all__ = ["Feedback", "FeedbackLog", "answers_by_id", "feedback_path", "parse_feedback", "training_rows"]

RATINGS = ("good", "bad")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TEXT = 8_000


@dataclass(frozen=True)
class Feedback:
    id: str
    rating: str
    expert: str | None = None
    comment: str | None = None
    text: str | None = None
    ts: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _opt_text(body: Mapping[str, Any], key: str, limit: int) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InputError(f"feedback {key} must be text, got {type(v).__name__}")
    if len(v) > limit:
        raise InputError(f"feedback {key} is {len(v)} characters; at most {limit}")
    return v.strip() or None


def parse_feedback(body: Mapping[str, Any], *, experts: Iterable[str], keep_text: bool = True) -> Feedback:
    """Validate a feedback body; ``experts`` are the names a correction may name."""
    if not isinstance(body, Mapping):
        raise InputError("feedback must be a JSON object with 'id' and 'rating'")
    unknown = sorted(set(body) - {"id", "rating", "expert", "comment", "text"})
    if unknown:
        raise InputError(f"feedback: unknown field(s) {', '.join(unknown)}; use id, rating, expert, comment, text")
    fid = body.get("id")
    if not isinstance(fid, str) or not _ID.match(fid):
        raise InputError("feedback id must be the answer's id (the response 'id', e.g. chatcmpl-…)")
    rating = body.get("rating")
    if rating not in RATINGS:
        raise InputError(f"feedback rating must be one of {', '.join(RATINGS)}, got {rating!r}")
    expert = body.get("expert")
    names = list(experts)
    if expert is not None and expert not in names:
        raise InputError(f"feedback expert {expert!r} is not a configured expert; use one of {', '.join(names)}")
    text = _opt_text(body, "text", MAX_TEXT)
    return Feedback(id=fid, rating=str(rating), expert=expert, comment=_opt_text(body, "comment", 2_000),
                    text=text if keep_text else None, ts=round(time.time(), 3))


def feedback_path(config: Any) -> Path:
    """Where feedback for this config goes (beside the answer log, else under ``$EXPERTMIX_HOME``)."""
    log = getattr(getattr(config, "orchestrator", None), "log_file", None)
    if log:
        p = Path(log)
        return p.with_name(p.stem + ".feedback.jsonl")
    home = Path(os.environ.get("EXPERTMIX_HOME") or Path.home() / ".expertmix")
    return home / "feedback.jsonl"


class FeedbackLog:
    """Appends one JSON line per feedback. Thread-safe; each line is written whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, fb: Feedback) -> None:
        line = json.dumps(fb.to_dict(), ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()

    def read(self) -> list[Feedback]:
        """Every well-formed record (a torn last line is skipped)."""
        out = []
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    d = json.loads(line)
                    out.append(Feedback(**{k: d.get(k) for k in ("id", "rating", "expert", "comment", "text")},
                                        ts=float(d.get("ts", 0.0))))
                except (ValueError, TypeError):
                    continue
        return out


def answers_by_id(lines: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Answer-log records by answer id: ``{"query": text or None, "expert": top routed expert or None}``."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        try:
            rec = json.loads(line)
            rid = rec["id"]
        except (ValueError, KeyError, TypeError):
            continue
        experts = (rec.get("routing") or {}).get("experts") or []
        abstained = bool((rec.get("routing") or {}).get("abstained"))
        top = experts[0].get("name") if experts and not abstained and isinstance(experts[0], dict) else None
        out[str(rid)] = {"query": rec.get("query"), "expert": top}
    return out


def training_rows(
    feedback: Iterable[Feedback],
    *,
    answers: Mapping[str, Mapping[str, Any]] | None = None,
    good_weight: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Router training rows from feedback: corrections (``expert`` given) as weight-1 rows, and — when
    ``good_weight`` is set — good ratings of routed answers as rows of that weight for the expert the
    router chose. The question text comes from the feedback, else from the answer log (``answers``).
    Deduplicated by text (the latest feedback wins); the counts say what was used and what was not.
    Each row is ``{"text", "label", "weight", "source": "feedback", "kind": "corrections"|"good"}``.
    """
    answers = answers or {}
    counts = {"corrections": 0, "good": 0, "skipped_no_text": 0, "skipped_no_label": 0, "duplicates": 0,
              "conflicts": 0}
    rows: dict[str, dict[str, Any]] = {}
    for fb in sorted(feedback, key=lambda f: f.ts):
        known = answers.get(fb.id, {})
        text = fb.text or known.get("query")
        if fb.expert is not None:
            label, weight, kind = fb.expert, 1.0, "corrections"
        elif fb.rating == "good" and good_weight is not None:
            label, weight, kind = known.get("expert"), float(good_weight), "good"
        else:
            continue
        if not text:
            counts["skipped_no_text"] += 1
            continue
        if not label:
            counts["skipped_no_label"] += 1
            continue
        key = " ".join(text.lower().split())
        if key in rows:
            counts["duplicates"] += 1
            if rows[key]["label"] != label:
                counts["conflicts"] += 1
            counts[rows[key]["kind"]] -= 1
        rows[key] = {"text": text, "label": label, "weight": weight, "source": "feedback", "kind": kind}
        counts[kind] += 1
    return list(rows.values()), counts
