"""Shared CLI plumbing: one-line errors, JSON output. Imports stay light (no torch)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer

__all__ = [
    "answer_log_lines",
    "check_text",
    "echo_json",
    "handle_errors",
    "load_orchestrator",
    "offline_defaults",
    "one_line_errors",
    "phase",
    "print_trace",
    "version_callback",
]

F = TypeVar("F", bound=Callable[..., Any])


def offline_defaults() -> None:
    """Local models must never reach for the hub (a hub call here hangs until it times out)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # OpenMP threads spin briefly, then sleep (expertmix/runtime.py: fast idle, safe on a shared CPU)
    from expertmix.runtime import openmp_defaults

    openmp_defaults()
    os.environ.setdefault(
        "TQDM_DISABLE", "1"
    )  # no per-weight "Loading weights" bars; phase() prints one line


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Our errors and file-system errors become one line on stderr and exit 1, without a traceback."""
    from expertmix.errors import ExpertmixError

    try:
        yield
    except (ExpertmixError, OSError) as exc:
        msg = " ".join(str(exc).split())
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def handle_errors(fn: F) -> F:
    """Decorator form of :func:`one_line_errors`; also sets the offline defaults."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        offline_defaults()
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def version_callback(value: bool) -> None:
    """``--version``: the installed package version."""
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("expertmix")
        except PackageNotFoundError:
            v = "unknown (not installed; run `make install`)"
        typer.echo(f"expertmix {v}")
        raise typer.Exit()


def check_text(text: str, *, what: str = "question") -> None:
    """Bad argv before any model loads: not UTF-8 (arrives as surrogate escapes) or empty."""
    from expertmix.errors import InputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"the {what} is not valid UTF-8 text (byte {exc.start}); check your terminal's encoding"
        ) from None
    if not text.strip():
        raise InputError(f"the {what} is empty; ask a question")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """One stderr line per cold-start phase (instead of per-weight progress bars)."""
    import time

    t0 = time.perf_counter()
    yield
    typer.echo(f"expertmix: {name} loaded in {time.perf_counter() - t0:.1f} s", err=True)


def load_orchestrator(cfg: Any) -> Any:
    """Build an Orchestrator from a loaded config, announcing each phase on one line."""
    try:  # transformers' own bars, whatever the environment says
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    from orchestrator.core import Orchestrator
    from orchestrator.routing import Router

    with phase("router"):
        router = Router.load(cfg.router.path)
    n = len(cfg.experts)
    with phase(f"base model + {n} expert{'s' if n != 1 else ''}"):
        return Orchestrator(cfg, router=router)


def print_trace(d: dict[str, Any]) -> None:
    """The table under an answer, from ``Answer.to_dict()`` (in-process) or a server's trace: same output."""
    r = d.get("routing") or {}
    head = f"strategy: {d.get('strategy')}"
    if d.get("chosen_strategy") and d.get("chosen_strategy") != d.get("strategy"):
        head += f" (ran {d['chosen_strategy']})"
    if d.get("fallback"):
        head += f"  (base model answered: {d['fallback']}{'; ' + r['reason'] if r.get('reason') else ''})"
    typer.echo(head, err=True)
    typer.echo(f"{'expert':<14}{'weight':>8}{'tokens':>8}{'latency':>10}  status", err=True)
    for c in d.get("contributions") or []:
        status = "ok" if not c.get("error") else f"failed: {str(c['error'])[:60]}"
        typer.echo(
            f"{c['expert']:<14}{c['weight']:>7.0%} {c['tokens']:>7}{c['latency_s']:>9.2f}s  {status}",
            err=True,
        )
    print_plan(d)
    t = d.get("timings") or {}
    u = d.get("usage") or {}
    typer.echo(
        f"time: route {t.get('route', 0):.2f}s, experts {t.get('experts', 0):.2f}s, merge {t.get('merge', 0):.2f}s, "
        f"total {t.get('total', 0):.2f}s; answer {u.get('completion_tokens', 0)} tokens",
        err=True,
    )


def print_plan(d: dict[str, Any]) -> None:
    """Which expert answered which part (only for a request split into several parts)."""
    plan = d.get("plan") or {}
    parts = plan.get("parts") or []
    if len(parts) < 2:
        return
    note = f" ({plan['fallback']})" if plan.get("fallback") else ""
    typer.echo(f"plan: {len(parts)} parts by {plan.get('planner')}{note}", err=True)
    for i, p in enumerate(parts, 1):
        who = p.get("answered_by") or "-"
        routed = ", ".join(f"{e['name']} {e['weight']:.0%}" for e in (p.get("routing") or p).get("experts", []))
        text = " ".join(str(p.get("text", "")).split())
        text = text if len(text) <= 48 else text[:47] + "…"
        extra = f"  fallback: {str(p['fallback'])[:40]}" if p.get("fallback") else ""
        typer.echo(f"  {i}. {text:<48}  -> {who:<12} routed: {routed}{extra}", err=True)


def _log_record_ok(rec: Any) -> bool:
    if not isinstance(rec, dict) or not isinstance(rec.get("experts"), list):
        return False
    if "routing" in rec and not isinstance(rec["routing"], dict):
        return False
    for e in rec["experts"]:
        if not isinstance(e, dict) or not isinstance(e.get("expert"), str):
            return False
        for key in ("weight", "latency_s"):
            v = e.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return False
    return True


def answer_log_lines(lines: Any) -> tuple[list[str], int]:
    """Split an answer log into well-formed lines and a count of torn / wrong-shaped ones."""
    good: list[str] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            ok = _log_record_ok(json.loads(line))
        except ValueError:
            ok = False
        if ok:
            good.append(line)
        else:
            skipped += 1
    return good, skipped
