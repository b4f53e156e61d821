"""What an answer carries (routing, per-expert contributions, timings), its JSON-lines log, and stats."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmix.errors import DataError

if TYPE_CHECKING:
    from orchestrator.routing import Routing

__all__ = ["Answer", "AnswerLog", "Contribution", "Timings", "utilization"]


@dataclass
class Contribution:
    """One expert's part in an answer. ``error`` is set (and ``text`` empty) when it failed."""

    expert: str
    weight: float
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timings:
    route: float = 0.0
    experts: float = 0.0
    merge: float = 0.0
    total: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


@dataclass
class Answer:
    """The merged answer and how it was made.

    ``routing`` is the router's decision; ``weights`` are the weights actually used after
    dropping failed experts (renormalized); ``fallback`` says why the base model answered,
    if it did ("abstained", "all experts failed").
    """

    text: str
    strategy: str
    routing: Routing
    contributions: list[Contribution]
    timings: Timings
    weights: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    tokens: int = 0
    prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        r = self.routing.to_dict()
        return {
            "answer": self.text,
            "strategy": self.strategy,
            "routing": {
                "experts": r["experts"],
                "abstained": r["abstained"],
                "probabilities": r["probabilities"],
                "confidence": r.get("confidence"),
                "reason": r.get("reason"),
            },
            "weights": {k: round(v, 6) for k, v in self.weights.items()},
            "fallback": self.fallback,
            "contributions": [c.to_dict() for c in self.contributions],
            "timings": self.timings.to_dict(),
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens},
        }


class AnswerLog:
    """Appends one JSON line per answer. Thread-safe. Logs a query hash unless told to log text."""

    def __init__(self, path: str | Path, *, log_text: bool = False) -> None:
        self.path = Path(path)
        self.log_text = log_text
        self._lock = threading.Lock()

    def write(self, query: str, answer: Answer) -> None:
        rec: dict[str, Any] = {"ts": round(time.time(), 3)}
        if self.log_text:
            rec["query"] = query
        else:
            rec["query_sha256"] = hashlib.sha256(query.encode("utf-8")).hexdigest()
        d = answer.to_dict()
        rec.update(
            strategy=d["strategy"],
            routing=d["routing"],
            fallback=d["fallback"],
            experts=[{k: c[k] for k in ("expert", "weight", "tokens", "latency_s", "error")} for c in d["contributions"]],
            timings=d["timings"],
        )
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    i = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[i]


def utilization(lines: Iterable[str], *, source: str = "log") -> dict[str, Any]:
    """Per-expert utilization from answer-log lines: share of queries, mean weight, failures, p50/p95."""
    n = 0
    abstained = 0
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"selected": 0, "weights": [], "failures": 0, "lat": []})
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            experts = rec["experts"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"not an expertmix answer-log record ({exc})", path=source, line=lineno) from exc
        n += 1
        abstained += bool(rec.get("routing", {}).get("abstained"))
        for e in experts:
            s = per[e["expert"]]
            s["selected"] += 1
            s["weights"].append(float(e.get("weight", 0.0)))
            if e.get("error"):
                s["failures"] += 1
            else:
                s["lat"].append(float(e.get("latency_s", 0.0)))
    out = {}
    for name, s in sorted(per.items(), key=lambda kv: -kv[1]["selected"]):
        out[name] = {
            "queries": s["selected"],
            "share": s["selected"] / n if n else 0.0,
            "mean_weight": sum(s["weights"]) / len(s["weights"]) if s["weights"] else 0.0,
            "failures": s["failures"],
            "p50_latency_s": _pct(s["lat"], 0.5),
            "p95_latency_s": _pct(s["lat"], 0.95),
        }
    return {"queries": n, "abstained": abstained, "experts": out}
