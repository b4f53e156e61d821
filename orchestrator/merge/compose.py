"""Joining several answers into one text: ``sections`` (no LLM pass) and the synthesis guard.

``sections`` puts each part's answer under a short heading built from the part's own words,
so nothing is written *about* the answers. The guard detects an aggregator that talks about
the experts or their answers ("Here's a rewritten version…", "This answer provides…",
"Based on the experts…") instead of answering; the caller then falls back to ``sections``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["heading", "is_meta", "sections"]

_META = re.compile(
    r"^\s*(?:"
    r"here(?:'s| is| are)\b"
    r"|this (?:answer|response|revised|rewritten|combined|version|summary)\b"
    r"|the (?:above|following|two|three|first|second|combined|revised|rewritten) (?:answers?|responses?|experts?|versions?)\b"
    r"|based on (?:the )?(?:expert|answers?|responses?|information provided)"
    r"|(?:as|according to) (?:the |an? )?(?:expert|answers?)"
    r"|(?:both|all|each|the) experts?\b"
    r"|to (?:combine|rewrite|summari[sz]e|merge)\b"
    r"|i (?:have|'ve) (?:combined|rewritten|merged|summari[sz]ed)"
    r"|combining (?:the|these|both)"
    r")",
    re.IGNORECASE,
)
_MENTIONS = re.compile(r"\b(?:the )?(?:experts?|(?:two|both|these) answers|answer from the)\b", re.IGNORECASE)


def is_meta(text: str) -> bool:
    """True when the text opens by talking about the experts or their answers instead of answering."""
    first = re.split(r"(?<=[.!?:])\s", text.strip(), maxsplit=1)[0]
    return bool(_META.match(text)) or bool(_MENTIONS.search(first))


def heading(part: str, *, max_words: int = 10) -> str:
    """A short heading from the part's own words: "How should we hedge our EUR revenue"."""
    words = part.strip().rstrip("?.!:;,").split()
    head = " ".join(words[:max_words]) + (" …" if len(words) > max_words else "")
    return head[:1].upper() + head[1:]


def sections(items: Sequence[tuple[str, str]]) -> str:
    """``[(heading source, answer), ...]`` → one markdown text, one section per item."""
    return "\n\n".join(f"**{heading(h)}**\n{a.strip()}" for h, a in items if a.strip())
