"""Training-text augmentation that changes the register, not the department.

Routing data is written in one register per source: code intents are imperative one-liners
("reverse a list in python"), product rows are statements ("As a user I want …", "The system
shall …"), finance rows are questions. A classifier trained on that learns the register.
Two augmentations break the link, both applied in memory (nothing is stored):

* ``frame``: neutral conversational frames ("Hi, quick question: …"), the same for every
  label and for off-topic rows, so the frame carries no label;
* ``question_forms``: statements and imperatives rewritten as the questions and requests a
  user would type ("How should we let a broker …?", "Write a user story for …", "What are
  the requirements for …", "How do I …?"). The rewrite depends on the text's form (user
  story, requirement, imperative), never on its label, so it works for any user's data;
* ``cross_forms``: a user story rewritten as a requirement ("The system shall allow a
  {role} to {goal}.") and a requirement as a user story ("As the administrator, I want to
  approve …"), so that one way of writing down what a product must do teaches the other.

    >>> question_forms("As a broker, I want to export reports so that I can audit them", seed=1)[0]
    'How should we let a broker export reports?'
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

__all__ = ["FRAMES", "cross_forms", "frame", "question_forms", "text_form"]

FRAMES = (
    "Hi, quick question: {t}",
    "Could you help me with this? {t}",
    "I'm trying to understand something. {t} Could you explain?",
    "Hello! {t} Any advice would be appreciated.",
    "{t} Thanks in advance.",
    "Can you explain the following to me: {t}",
    "I have a question for you. {t} What should I look at?",
    "Hey, I was wondering about this: {t}",
)

_STORY = re.compile(r"^\s*as an? (?P<role>.+?),? i (?:want|would like|need|wish|can)(?: to)? (?P<goal>.+)$", re.IGNORECASE | re.DOTALL)
_REQ = re.compile(r"^\s*(?P<subj>.{2,80}?)\s+(?P<modal>shall|must|should|will)\s+(?:be able to\s+)?(?P<rest>.+)$", re.IGNORECASE | re.DOTALL)
_QWORDS = (
    "how", "what", "why", "when", "where", "which", "who", "whom", "whose", "is", "are", "can", "could",
    "should", "would", "do", "does", "did", "will", "was", "were", "has", "have", "may", "might",
)

STORY_FORMS = (
    "Write a user story: {low}",
    "How should we let a {role} {goal}?",
    "Write a user story for a {role} who wants to {goal}",
    "What are the requirements for letting a {role} {goal}?",
    "We need a feature so a {role} can {goal}. How should we approach it?",
    "Can you turn this into a proper story with acceptance criteria? {t}",
)
REQ_FORMS = (
    "What are the requirements for how {subj} {modal} {rest}?",
    "Write a requirement saying that {subj} {modal} {rest}",
    "How should we make sure {subj} {modal} {rest}?",
    "Is this a good requirement: {t}",
    "Our stakeholders say {subj} {modal} {rest}. How do we specify that?",
)
IMPERATIVE_FORMS = (
    "How do I {low}?",
    "What's the best way to {low}?",
    "Can you show me how to {low}?",
    "I need to {low}. How would you do it?",
)
GERUND_FORMS = (
    "Any tips on {low}?",
    "What's the best approach to {low}?",
    "How would you go about {low}?",
)
STATEMENT_FORMS = (
    "What do you think about this: {t}",
    "Can you help with the following? {t}",
    "{t} How should we handle this?",
)


def _strip_end(s: str) -> str:
    return s.strip().rstrip(".!;: ").strip()


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:2] != s[:2].upper() else s


def text_form(text: str) -> str:
    """``question``, ``story``, ``requirement``, ``imperative`` or ``statement``."""
    t = text.strip()
    first = t.split(maxsplit=1)[0].lower().strip(",.'\"") if t else ""
    if t.endswith("?") or first in _QWORDS:
        return "question"
    if _STORY.match(t):
        return "story"
    if _REQ.match(t):
        return "requirement"
    if t[:1].islower() or first in _IMPERATIVE_VERBS:
        return "imperative"
    return "statement"


_IMPERATIVE_VERBS = frozenset(
    ["add", "append", "calculate", "check", "concatenate", "convert", "count", "create", "delete", "display", "download", "drop", "extract", "filter", "find", "format", "get", "group", "install", "insert", "iterate", "join", "list", "load", "make", "merge", "open", "parse", "plot", "print", "read", "remove", "rename", "replace", "return", "reverse", "run", "save", "select", "send", "set", "sort", "split", "sum", "update", "upgrade", "write"]
)


def question_forms(text: str, *, copies: int = 1, seed: int = 0) -> list[str]:
    """``copies`` rewrites of ``text`` as a user request (empty for texts already questions)."""
    form = text_form(text)
    if form == "question" or copies <= 0:
        return []
    t = text.strip()
    fields = {"t": t, "low": _lower_first(_strip_end(t))}
    if form == "story":
        m = _STORY.match(t)
        assert m is not None
        goal = _strip_end(re.split(r",?\s+so that\s+", m.group("goal"), maxsplit=1, flags=re.IGNORECASE)[0])
        fields.update(role=_strip_end(m.group("role")), goal=goal)
        forms: Sequence[str] = STORY_FORMS
    elif form == "requirement":
        m = _REQ.match(t)
        assert m is not None
        fields.update(subj=_lower_first(m.group("subj").strip()), modal=m.group("modal").lower(),
                      rest=_strip_end(m.group("rest")))
        forms = REQ_FORMS
    elif form == "imperative":
        forms = GERUND_FORMS if t.split(maxsplit=1)[0].lower().endswith("ing") else IMPERATIVE_FORMS
    else:
        forms = STATEMENT_FORMS
    rng = random.Random(f"{seed}:{t}")
    picked = rng.sample(list(forms), min(copies, len(forms)))
    return [f.format(**fields) for f in picked]


STORY_TO_REQUIREMENT = (
    "The system shall allow a {role} to {goal}.",
    "The product must let a {role} {goal}.",
    "A {role} shall be able to {goal}.",
)
REQUIREMENT_TO_STORY = (
    "As a user, I want {subj} to {rest}",
    "As a stakeholder, I need {subj} to {rest}",
    "As a customer, I want {subj} to {rest} so that the product meets my needs",
)
ACTOR_TO_STORY = (
    "As {actor}, I want to {goal}",
    "As {actor}, I want to be able to {goal}",
    "As {actor}, I want to {goal} so that I can do my job",
)
_SYSTEM = re.compile(
    r"^(the |this )?(system|product|application|app|software|website|site|program|tool|service|platform)\b",
    re.IGNORECASE,
)
_ALLOW = re.compile(
    r"^(?:allow|enable|permit)s?\s+(?P<actor>(?:\S+\s+){0,3}?\S+)\s+to\s+(?P<goal>\S.*)$",
    re.IGNORECASE | re.DOTALL,
)
_ROLE = re.compile(
    r"^(?:the |a |an )?(?:[\w-]+ ){0,2}(?:user|administrator|admin|manager|customer|staff|member|student|"
    r"visitor|operator|owner|agent|clerk|employee|patient|doctor|nurse|teacher|player|buyer|seller|officer|"
    r"analyst|developer|reviewer|editor|author)s?$",
    re.IGNORECASE,
)


def _with_article(actor: str) -> str:
    a = actor.strip()
    if re.match(r"^(a|an|the)\b", a, re.IGNORECASE):
        return a[0].lower() + a[1:]
    if a.lower().endswith("s"):
        return "one of the " + a
    return ("an " if a[:1].lower() in "aeiou" else "a ") + a


def cross_forms(text: str, *, copies: int = 1, seed: int = 0) -> list[str]:
    """``copies`` rewrites of a user story as a requirement, or of a requirement as a user
    story (empty for other forms).

        >>> cross_forms("The system shall allow the administrator to approve a review.", copies=1)
        ['As the administrator, I want to be able to approve a review']
    """
    form = text_form(text)
    if form not in ("story", "requirement") or copies <= 0:
        return []
    t = text.strip()
    forms: Sequence[str]
    if form == "story":
        m = _STORY.match(t)
        assert m is not None
        goal = _strip_end(re.split(r",?\s+so that\s+", m.group("goal"), maxsplit=1, flags=re.IGNORECASE)[0])
        fields = {"role": _strip_end(m.group("role")), "goal": goal}
        forms = STORY_TO_REQUIREMENT
    else:
        m = _REQ.match(t)
        assert m is not None
        subj, rest = m.group("subj").strip(), _strip_end(m.group("rest"))
        allow = _ALLOW.match(rest) if _SYSTEM.match(subj) else None
        if allow:  # "The system shall allow the clerk to X" -> "As the clerk, I want to X"
            fields = {"actor": _with_article(allow.group("actor")), "goal": _strip_end(allow.group("goal"))}
            forms = ACTOR_TO_STORY
        elif _ROLE.match(subj):  # "Users shall be able to X" -> "As one of the Users, I want to X"
            fields, forms = {"actor": _with_article(subj), "goal": rest}, ACTOR_TO_STORY
        else:
            fields, forms = {"subj": _lower_first(subj), "rest": rest}, REQUIREMENT_TO_STORY
    rng = random.Random(f"x{seed}:{t}")
    return [f.format(**fields) for f in rng.sample(list(forms), min(copies, len(forms)))]


def frame(texts: Sequence[str], copies: int, *, seed: int = 0) -> list[str]:
    """``copies`` conversationally framed variants per text (all first copies, then all second
    copies, ...). Each text's frames depend only on the seed and the text itself, so a text gets
    the same variants whatever else is in the batch (embeddings of variants are cached per text)."""
    out = []
    for copy in range(copies):
        for t in texts:
            f = random.Random(f"{seed}:{copy}:{t}").choice(FRAMES)
            body = t[0].lower() + t[1:] if f.startswith(("Hey", "Hi")) and t[:2].istitle() else t
            out.append(f.format(t=body))
    return out
