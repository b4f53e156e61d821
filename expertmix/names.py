"""The one name rule for expert names and router labels (``experts`` and ``router_training`` both use it).

>>> name_problem("finance") is None
True
>>> name_problem("Fin ance", what="label")
"label 'Fin ance' is not a valid expert name: use 1-64 lowercase letters, digits, '-' or '_', starting with a letter (e.g. 'fin-ance')"
"""

from __future__ import annotations

import re

__all__ = ["BASE_EXPERT", "NAME_PATTERN", "name_problem", "suggest_name"]

#: the sentinel for "the base model, no adapter"; never a valid expert name or label
BASE_EXPERT = "__base__"
#: lowercase letter first, then lowercase letters, digits, '-' or '_' (64 characters at most)
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


def suggest_name(name: str) -> str:
    s = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    s = re.sub(r"^[^a-z]+", "", s)[:64]
    return s or "my-expert"


def name_problem(name: object, *, what: str = "expert name") -> str | None:
    """``None`` if ``name`` is a valid expert name / router label, else what is wrong and how to fix it."""
    if not isinstance(name, str):
        return f"{what} must be a string, got {type(name).__name__}"
    if name == BASE_EXPERT:
        return f"{what} '{BASE_EXPERT}' is reserved for the base model; pick another name"
    if not _NAME_RE.match(name):
        head = f"invalid {what} {name!r}" if what == "expert name" else f"{what} {name!r} is not a valid expert name"
        return (
            f"{head}: use 1-64 lowercase letters, digits, '-' or '_', starting with a letter "
            f"(e.g. {suggest_name(name)!r})"
        )
    return None
