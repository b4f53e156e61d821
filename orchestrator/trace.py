"""What an answer carries (routing, per-expert contributions, timings), its JSON-lines log, and stats."""

from __future__ import annotations

import hashlib
import hmac
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

__all__ = ["Answer", "AnswerLog", "Contribution", "PartResult", "Timings", "new_answer_id", "utilization"]


def new_answer_id() -> str:
    """An id for an answer, the same as the OpenAI response ``id`` (``chatcmpl-…``)."""
    import uuid

    return "chatcmpl-" + uuid.uuid4().hex[:24]


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
class PartResult:
    """One part of a decomposed answer: the sub-question, its routing, who answered it and how."""

    text: str
    span: tuple[int, int] | None
    routing: Routing
    answered_by: str | None
    answer: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str = "stop"
    #: why the first choice did not answer (errors of the experts tried before), if any
    fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        r = self.routing
        return {
            "text": self.text,
            "span": list(self.span) if self.span else None,
            "routing": {"experts": [{"name": e.name, "weight": round(e.weight, 6)} for e in r.experts],
                        "abstained": r.abstained, "reason": r.reason},
            "answered_by": self.answered_by,
            "tokens": self.tokens,
            "latency_s": self.latency_s,
            "finish_reason": self.finish_reason,
            "fallback": self.fallback,
        }


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
    #: the OpenAI response id; ``expertmix feedback ID`` refers to it
    id: str = field(default_factory=new_answer_id)
    #: "length" when any generation behind the answer hit its token limit, else "stop"
    finish_reason: str = "stop"
    #: the strategy that ran (``auto`` picks one per request)
    chosen: str | None = None
    #: the plan (planner, fallback) and each part's routing, who answered it, tokens, latency
    plan: dict[str, Any] | None = None
    #: events worth counting, e.g. "synthesis_guard" (the aggregator talked about the experts)
    notes: list[str] = field(default_factory=list)
    #: the router that routed it (its store version or directory name; ``default`` = shipped)
    router_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        r = self.routing.to_dict()
        return {
            "id": self.id,
            "answer": self.text,
            "strategy": self.strategy,
            "chosen_strategy": self.chosen or self.strategy,
            "finish_reason": self.finish_reason,
            "plan": self.plan,
            "notes": list(self.notes),
            "router_version": self.router_version,
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
        self._key: bytes | None = None

    def _salt(self) -> bytes:
        """A random per-machine key (``$EXPERTMIX_HOME/log-salt``, mode 0600): equal queries hash equal
        within this machine's logs, but a hash cannot be reversed with a dictionary of likely queries."""
        if self._key is None:
            from expertmix.io import expertmix_home

            path = expertmix_home() / "log-salt"
            try:
                self._key = path.read_bytes()
            except FileNotFoundError:
                import os
                import secrets

                path.parent.mkdir(parents=True, exist_ok=True)
                key = secrets.token_bytes(32)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(key)
                except FileExistsError:
                    key = path.read_bytes()
                self._key = key
        return self._key

    def write(self, query: str, answer: Answer) -> None:
        rec: dict[str, Any] = {"ts": round(time.time(), 3)}
        if self.log_text:
            rec["query"] = query
        else:
            rec["query_hmac"] = hmac.new(self._salt(), query.encode("utf-8"), hashlib.sha256).hexdigest()
        d = answer.to_dict()
        rec.update(
            id=d["id"],
            strategy=d["strategy"],
            chosen_strategy=d["chosen_strategy"],
            plan=_plan_for_log(d["plan"], self.log_text),
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


def _plan_for_log(plan: dict[str, Any] | None, log_text: bool) -> dict[str, Any] | None:
    if plan is None or log_text:
        return plan
    return {**plan, "parts": [{k: v for k, v in p.items() if k != "text"} for p in plan.get("parts", [])]}


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
