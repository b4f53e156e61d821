"""Parse the common ``ask`` / ``route`` / ``generate`` command lines without typer.

typer builds a pydantic adapter for every parameter when it parses a command line (~0.3 s of CPU,
half of what ``expertmix ask`` costs against a warm server). For the three commands that the fast
path serves, :func:`parse` reads the arguments with :mod:`argparse` and ``main`` calls the very same
command function with them. Anything this parser is not sure about (``--help``, an unknown option,
a value out of range, a parse error) returns ``None`` and typer parses the line as usual, with its
own messages, so both parsers accept exactly the same valid lines.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["parse"]

_COMMANDS = ("ask", "route", "generate")


class _Unsure(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never print or exit: hand the line to typer instead
        raise _Unsure(message)

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _Unsure(message or "")


def _parser(command: str) -> _Parser:
    p = _Parser(prog=f"expertmix {command}", add_help=False, allow_abbrev=False)
    p.add_argument("question")
    if command == "generate":
        p.add_argument("--expert", "-e", required=True)
    else:
        p.add_argument("--k", "-k", type=int, dest="k")
        p.add_argument("--min-weight", type=float, dest="min_weight")
    if command == "ask":
        p.add_argument("--strategy")
        p.add_argument("--stream", action="store_true")
    if command == "route":
        p.add_argument("--router", type=Path)
    else:
        p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
        p.add_argument("--temperature", type=float)
        p.add_argument("--seed", type=int)
    p.add_argument("--config", "-c", type=Path)
    p.add_argument("--server")
    p.add_argument("--local", action="store_true")
    p.add_argument("--json", action="store_true", dest="as_json")
    return p


def _in_range(kw: dict[str, Any]) -> bool:
    checks = {
        "k": lambda v: v >= 1,
        "min_weight": lambda v: 0.0 <= v <= 0.999,
        "max_new_tokens": lambda v: v >= 1,
        "temperature": lambda v: v >= 0.0,
        "seed": lambda v: 0 <= v <= 2**63 - 1,
    }
    return all(kw.get(name) is None or ok(kw[name]) for name, ok in checks.items())


def parse(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """``(command, keyword arguments of the command function)``, or ``None`` to let typer parse."""
    if not argv or argv[0] not in _COMMANDS or any(a in ("-h", "--help") for a in argv):
        return None
    command = argv[0]
    try:
        kw = vars(_parser(command).parse_args(argv[1:]))
    except _Unsure:
        return None
    if kw.get("server") is None and os.environ.get("EXPERTMIX_SERVER"):
        kw["server"] = os.environ["EXPERTMIX_SERVER"]
    env_tokens = os.environ.get("EXPERTMIX_MAX_NEW_TOKENS")
    if command != "route" and kw.get("max_new_tokens") is None and env_tokens:
        try:
            kw["max_new_tokens"] = int(env_tokens)
        except ValueError:
            return None
    if not _in_range(kw):
        return None
    return command, kw
