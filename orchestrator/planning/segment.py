"""``segment`` (default): split a request into sentences and coordinated clauses, route them in one batch.

No LLM call, works with any base. Candidate parts are sentences, list items ("1. …", "- …",
"(2) …"), and clauses joined by a coordinator that starts a new request (", and what does
engineering need…", "; also write…"). Every candidate and the whole request are routed in
**one** router batch; neighbouring candidates whose top expert is the same are merged back;
fragments too short to stand alone join their neighbour. A one-part request costs one router call.
"""

from __future__ import annotations

import re

from orchestrator.planning.base import Part, Plan, PlanContext
from orchestrator.routing import Routing

__all__ = ["Segment", "candidate_spans"]

# a sentence ends at . ? ! (not inside "e.g." / numbers) followed by space and a capital, digit or quote
_SENTENCE = re.compile(r"(?<=[?!])\s+|(?<=[a-z0-9)\]`'\"][.])\s+(?=[A-Z0-9\"'(“`])")
# list items at line starts, or inline "(1) … (2) …" / "1) … 2) …"
_LIST = re.compile(r"(?:^|\n)\s*(?:[-*•]|\d{1,2}[.)])\s+|(?:^|\s)\(\d{1,2}\)\s+|(?<=[\s:;,])\d{1,2}\)\s+")
_NEW_REQUEST = (
    r"what|how|which|who|why|when|where|should|shall|could|can|do|does|did|is|are|will|would|"
    r"write|draft|give|list|explain|describe|tell|help|create|design|suggest|outline|propose|estimate|"
    r"calculate|compute|build|plan|define|recommend|show|make|implement|prepare"
)
# "…; and …" / "…, and …" / "…, also …" / " and what …" (a coordinator that starts a new request)
_CLAUSE = re.compile(
    r"\s*;\s+(?:and\s+|also\s+|then\s+)?"
    r"|\s*,\s+(?:and|also|plus|and also|and then)\s*,?\s+"
    r"|\s+(?:and|but|also|plus|then|and then|and also)\s*,?\s+(?=(?:" + _NEW_REQUEST + r")\b)"
    r"|\s*,\s+(?=(?:what|how|which|who|why|when|where|write|draft|create|give|list|explain|describe|"
    r"suggest|outline|propose|estimate|calculate|compute|design|define|recommend|implement|prepare)\s)",
    re.IGNORECASE,
)
_REQUEST = re.compile(r"^(?:please\s+)?(?:" + _NEW_REQUEST + r")\b", re.IGNORECASE)
# "Two things:" / "Please help with the following:" before the first part
_COLON = re.compile(r"(?<=:)\s+")
_LEAD = re.compile(
    r"^\s*(?:and finally|and also|and then|and|also|plus|additionally|finally|separately|then|lastly|"
    r"first(?:ly)?|second(?:ly)?|third(?:ly)?|next|moreover|furthermore|as well)\b[,:]?\s*",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:i have|here are|i've got)\s+)?(?:two|three|four|five|a few|several|some|a couple of|[0-9]+)\s+"
    r"(?:things|questions|parts|topics|requests|items)\b[^?]*[:.]?\s*$"
    r"|^\s*(?:(?:could|can|would) you\s+(?:please\s+)?|please\s+)?(?:answer|help(?: me)? with|look at|address)\s+"
    r"(?:these|the following|this|a few things|all of these)\b\W*$",
    re.IGNORECASE,
)
# a statement that sets context rather than asks ("We sell in Europe.", "I need it in Python.")
_CONTEXT = re.compile(r"^\s*(?:i|we|our|my|it|this|that|they|these|those|there|us|the company|the team)\b",
                      re.IGNORECASE)
MIN_WORDS = 3


def _cuts(text: str) -> list[tuple[int, int]]:
    """Cut points as (end of the left piece, start of the right piece)."""
    cuts: list[tuple[int, int]] = []
    for rx in (_SENTENCE, _LIST, _CLAUSE, _COLON):
        for m in rx.finditer(text):
            if 0 < m.start() and m.end() < len(text):
                cuts.append((m.start(), m.end()))
            elif m.start() == 0 and m.end() < len(text):
                cuts.append((0, m.end()))
    cuts.sort()
    merged: list[tuple[int, int]] = []
    for a, b in cuts:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def candidate_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the candidate parts (leading connectors like "Also," excluded)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for a, b in _cuts(text):
        if a > pos:
            spans.append((pos, a))
        pos = b
    spans.append((pos, len(text)))
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead = _LEAD.match(piece)
        if lead and lead.end() >= len(piece.rstrip(" ,:;")):
            continue  # only a connector ("Second,"): not a part
        if lead:
            a += lead.end()
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a and not _PREAMBLE.match(text[a:b]):
            out.append((a, b))
    return out or [(0, len(text))]


def _words(s: str) -> int:
    return len(re.findall(r"\w+", s))


def _is_request(s: str) -> bool:
    """A question or an instruction; statements like "We sell in Europe." are context."""
    return s.rstrip().endswith("?") or bool(_REQUEST.match(s)) or not _CONTEXT.match(s)


def _absorb_short(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Fragments under MIN_WORDS words and context sentences join a neighbouring request."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and (_words(text[a:b]) < MIN_WORDS or not _is_request(text[a:b])):
            out[-1] = (out[-1][0], b)
        elif out and (_words(text[out[-1][0]:out[-1][1]]) < MIN_WORDS or not _is_request(text[out[-1][0]:out[-1][1]])):
            out[-1] = (out[-1][0], b)  # leading context joins the first request
        else:
            out.append((a, b))
    return out


def _sentence_case(s: str) -> str:
    return s[:1].upper() + s[1:] if s[:1].islower() else s


def _top(r: Routing) -> str | None:
    return None if r.abstained else r.experts[0].name


class Segment:
    name = "segment"

    def plan(self, question: str, ctx: PlanContext) -> Plan:
        text = question.strip()
        spans = _absorb_short(candidate_spans(text), text)
        if len(spans) > 1:
            texts = [_sentence_case(text[a:b]) for a, b in spans]
            routed = ctx.router.route_batch([text, *texts], k=ctx.k, min_weight=ctx.min_weight)
            whole, parts = routed[0], routed[1:]
        else:
            whole = ctx.router.route(text, k=ctx.k, min_weight=ctx.min_weight)
            return Plan((Part(text, whole, (0, len(text))),), self.name, whole)
        # merge neighbours that go to the same place
        groups: list[list[int]] = []
        for i, r in enumerate(parts):
            if groups and _top(parts[groups[-1][-1]]) == _top(r):
                groups[-1].append(i)
            else:
                groups.append([i])
        while len(groups) > max(1, ctx.max_parts):  # too many parts: fold the tail together
            tail = groups.pop()
            groups[-1].extend(tail)
        if len(groups) == 1:
            return Plan((Part(text, whole, (0, len(text))),), self.name, whole,
                        notes={"candidates": len(spans)})
        merged_spans = [(spans[g[0]][0], spans[g[-1]][1]) for g in groups]
        need = [j for j, g in enumerate(groups) if len(g) > 1]
        rerouted = ctx.router.route_batch([_sentence_case(text[merged_spans[j][0]:merged_spans[j][1]]) for j in need],
                                          k=ctx.k, min_weight=ctx.min_weight) if need else []
        routings = [parts[g[0]] for g in groups]
        for j, r in zip(need, rerouted):
            routings[j] = r
        out = tuple(Part(_sentence_case(text[a:b]), r, (a, b)) for (a, b), r in zip(merged_spans, routings))
        return Plan(out, self.name, whole, notes={"candidates": len(spans)})
