"""The ``expertmix`` command line. Heavy modules (torch, transformers) load inside commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator.cli_common import echo_json, handle_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="expertmix",
    help="Mixture of LoRA experts: route a question to the top-k domain experts and merge their answers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
experts_app = typer.Typer(help="List, query and train experts.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="expertmix.toml (default: the shipped one).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@experts_app.command("list")
@handle_errors
def experts_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the configured experts."""
    from orchestrator.config import load_config

    cfg = load_config(config)
    rows = [e.to_dict() for e in cfg.experts]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['name']:<14} {r['backend']:<7} {r['description']}")
        typer.echo(f"{'':<14} {'':<7} adapter: {r['adapter'] or '-'}")


@app.command()
@handle_errors
def generate(
    question: Annotated[str, typer.Argument(help="The question.")],
    expert: Annotated[str, typer.Option("--expert", "-e", help="Expert name, or __base__ for the base model.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 160,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask one expert directly (no routing, no merge)."""
    from experts.backends.base import GenerationConfig
    from experts.prompts import normalize_messages
    from expertmix.errors import InputError
    from orchestrator.config import load_config
    from orchestrator.core import _build_backends

    cfg = load_config(config)
    messages = normalize_messages(question)
    cfg.registry.check([expert])
    specs = [e for e in cfg.experts if e.name == expert]
    sub = type(cfg)(path=cfg.path, base=cfg.base, experts=tuple(specs), router=cfg.router,
                    orchestrator=cfg.orchestrator, server=cfg.server)
    routes, _ = _build_backends(sub, {})
    try:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    g = routes[expert].generate([(expert, messages)], gen)[0]
    if as_json:
        echo_json({"expert": g.expert, "text": g.text, "tokens": g.tokens, "latency_s": round(g.latency_s, 4)})
    else:
        typer.echo(g.text)
        typer.echo(f"\n[{g.expert}: {g.tokens} tokens in {g.latency_s:.2f} s]", err=True)


@app.command()
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Experts to combine (default from config).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="synthesis | mixture | adapter_merge | top1")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate at most.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print the answer as it is generated.")] = False,
) -> None:
    """Route the question to the top-k experts, run them, and print one merged answer."""
    from orchestrator.core import Orchestrator
    from orchestrator.trace import Answer

    with Orchestrator.from_config(config) as om:
        kw = dict(k=k, strategy=strategy, max_new_tokens=max_new_tokens, temperature=temperature)
        if stream and not as_json:
            answer = None
            for item in om.stream(question, **kw):
                if isinstance(item, Answer):
                    answer = item
                else:
                    typer.echo(item, nl=False)
            typer.echo("")
            assert answer is not None
            _print_table(answer)
            return
        answer = om.ask(question, **kw)
    if as_json:
        echo_json(answer.to_dict())
        return
    typer.echo(answer.text)
    typer.echo("")
    _print_table(answer)


def _print_table(answer: object) -> None:
    from orchestrator.trace import Answer

    assert isinstance(answer, Answer)
    r = answer.routing
    head = f"strategy: {answer.strategy}"
    if answer.fallback:
        head += f"  (base model answered: {answer.fallback}{'; ' + r.reason if r.reason else ''})"
    typer.echo(head, err=True)
    typer.echo(f"{'expert':<14}{'weight':>8}{'tokens':>8}{'latency':>10}  status", err=True)
    for c in answer.contributions:
        status = "ok" if not c.error else f"failed: {c.error[:60]}"
        typer.echo(f"{c.expert:<14}{c.weight:>7.0%} {c.tokens:>7}{c.latency_s:>9.2f}s  {status}", err=True)
    t = answer.timings
    typer.echo(f"time: route {t.route:.2f}s, experts {t.experts:.2f}s, merge {t.merge:.2f}s, total {t.total:.2f}s", err=True)


@app.command()
@handle_errors
def stats(
    logfile: Annotated[Path, typer.Argument(help="Answer log (JSON lines) written by orchestrator.log_file.")],
    as_json: JsonOpt = False,
) -> None:
    """Per-expert utilization from an answer log: share of queries, mean weight, failures, latency."""
    from expertmix.errors import DataError
    from orchestrator.trace import utilization

    if not logfile.is_file():
        raise DataError("log file not found", path=logfile)
    with open(logfile, encoding="utf-8", errors="replace") as fh:
        s = utilization(fh, source=str(logfile))
    if as_json:
        echo_json(s)
        return
    typer.echo(f"{s['queries']} answers, {s['abstained']} answered by the base model (router abstained)")
    typer.echo(f"{'expert':<14}{'queries':>8}{'share':>8}{'mean w':>8}{'fail':>6}{'p50 s':>8}{'p95 s':>8}")
    for name, e in s["experts"].items():
        typer.echo(
            f"{name:<14}{e['queries']:>8}{e['share']:>8.0%}{e['mean_weight']:>8.2f}{e['failures']:>6}"
            f"{e['p50_latency_s']:>8.2f}{e['p95_latency_s']:>8.2f}"
        )


def _register_optional() -> None:
    # Commands owned by their own modules; each registers itself without heavy imports.
    import importlib

    for mod, target in (("orchestrator.cli_router", app), ("orchestrator.cli_train", experts_app),
                        ("orchestrator.cli_serve", app)):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        m.register(target)


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
