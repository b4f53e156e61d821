"""Length-robust abstain score: a long question is judged by its most in-domain part.

The distance parts of the abstain score (``knn`` above all) compare a query's embedding with
short training texts. A multi-sentence question ("We run a small cluster. Since Monday one pod
gets OOMKilled… How do I find the leak?") embeds far from all of them and abstains although
its department is clear. For a text with two or more sentences, or more than ``LONG_WORDS``
words, the router also scores its sentences (long sentences cut into word windows) and keeps
the highest abstain score of {whole text, parts that agree with the whole text's department}.
Department probabilities stay those of the whole text. A short single-sentence query has no
parts: its score is unchanged, bit for bit.

    >>> split_parts("How do I reverse a list in Python?")
    []
    >>> split_parts("Our pod keeps restarting every hour. Thanks! How do I find the memory leak?")
    ['Our pod keeps restarting every hour.', 'How do I find the memory leak?']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["LONG_WORDS", "PART_MARGIN", "expand", "length_robust_scores", "part_confidence", "split_parts"]

LONG_WORDS = 40
"""A single sentence with more words than this is cut into windows."""
WINDOW = 25
MIN_WORDS = 6
"""Parts with fewer words are dropped ("Thanks!", "I'd like a three-course menu."): short generic
fragments land near some training text by chance and would let long off-topic questions through."""
MAX_PARTS = 8
PART_MARGIN = 0.0
"""Subtracted from a part's score (a larger margin trades long in-domain false rejects for off-topic recall)."""

# a sentence ends at . ? ! (not inside "e.g." / numbers) followed by space and a capital, digit or quote;
# or at a line break
_SENTENCE = re.compile(r"(?<=[?!])\s+|(?<=[a-z0-9)\]`'\"][.])\s+(?=[A-Z0-9\"'(“`])|\s*\n+\s*")


def _windows(sentence: str) -> list[str]:
    words = sentence.split()
    if len(words) <= LONG_WORDS:
        return [sentence]
    step = WINDOW
    return [" ".join(words[i:i + WINDOW]) for i in range(0, len(words) - WINDOW // 2, step)] or [sentence]


def split_parts(text: str) -> list[str]:
    """The sentences (or word windows) of a long text; ``[]`` for a short single-sentence one."""
    text = text.strip()
    sentences = [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]
    if len(sentences) < 2 and len(text.split()) <= LONG_WORDS:
        return []
    parts = [w for s in sentences for w in _windows(s) if len(w.split()) >= MIN_WORDS]
    parts = [p for p in dict.fromkeys(parts) if p != text]
    return parts[:MAX_PARTS]


def expand(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``texts`` followed by the parts of each long one, and the index of each part's text."""
    all_texts = list(texts)
    owner: list[int] = []
    for i, t in enumerate(texts):
        for p in split_parts(t):
            all_texts.append(p)
            owner.append(i)
    return all_texts, np.asarray(owner, dtype=np.int64)


def part_confidence(model: Any, x_all: np.ndarray, n: int, owner: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Abstain score of the first ``n`` rows of ``x_all``, raised to the best score of their parts.

    Only a part whose top department is the whole text's counts: an off-topic question whose one
    sentence happens to look like finance should not be let through by that sentence alone."""
    conf = np.asarray(model.confidence(x_all[:n], probs), dtype=np.float64)
    if len(owner):
        xp = x_all[n:]
        pp = model.predict_proba(xp)
        cp = np.asarray(model.confidence(xp, pp), dtype=np.float64) - PART_MARGIN
        agree = pp.argmax(axis=1) == np.asarray(probs).argmax(axis=1)[owner]
        np.maximum.at(conf, owner[agree], cp[agree])
    return conf


def length_robust_scores(
    model: Any, texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, probs, confidence)`` of ``texts`` with one ``embed`` call for the texts and all their parts."""
    all_texts, owner = expand(texts)
    x_all = np.asarray(embed(all_texts))
    n = len(texts)
    x = x_all[:n]
    probs = model.predict_proba(x)
    return x, probs, part_confidence(model, x_all, n, owner, probs)
