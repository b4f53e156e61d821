"""The ``expertmix`` command line. Heavy modules (torch, transformers) load inside commands only.

``ask``, ``route`` and ``generate`` use a running ``expertmix serve`` when one is reachable
(:mod:`orchestrator.client`), else load the models in-process; the output is the same either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli_common import (
    check_text,
    echo_json,
    handle_errors,
    load_orchestrator,
    print_trace,
    version_callback,
)
from orchestrator.config import OrchestratorSettings, RouterSettings

__all__ = ["app", "main"]

app = typer.Typer(
    name="expertmix",
    help="Mixture of LoRA experts: route a question to the top-k domain experts and merge their answers.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"show_default": True},
)
experts_app = typer.Typer(help="List, query and train experts.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Mixture of LoRA experts: route a question to the top-k domain experts and merge their answers."""


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="expertmix.toml (default: the shipped one).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="EXPERTMIX_SERVER",
        show_envvar=True,
        help="Use this running `expertmix serve` (URL) "
        "(default: the one `serve` announced for this config, if it is up).",
    ),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="Never use a running server; load the models here.")]
_O, _R = OrchestratorSettings, RouterSettings
KOpt = Annotated[
    int | None,
    typer.Option(
        "--k", "-k", min=1, help=f"Experts to combine (default: the config's router.k; {_R.k} if unset)."
    ),
]
MinWeightOpt = Annotated[
    float | None,
    typer.Option(
        "--min-weight",
        min=0.0,
        max=0.999,
        help=f"Drop experts below this weight "
        f"(default: the config's router.min_weight; {_R.min_weight} if unset).",
    ),
]
TokensOpt = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        min=1,
        envvar="EXPERTMIX_MAX_NEW_TOKENS",
        show_envvar=True,
        help=f"Tokens to generate at most "
        f"(default: the config's orchestrator.max_new_tokens; {_O.max_new_tokens} if unset).",
    ),
]
TempOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        min=0.0,
        help=f"0 = greedy (default: the config's orchestrator.temperature; {_O.temperature} if unset).",
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, max=2**63 - 1, help="Sampling seed.")]


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


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


@app.command()
@handle_errors
def generate(
    question: Annotated[str, typer.Argument(help="The question.")],
    expert: Annotated[
        str, typer.Option("--expert", "-e", help="Expert name, or __base__ for the base model.")
    ],
    max_new_tokens: TokensOpt = None,
    temperature: TempOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    server: ServerOpt = None,
    local: LocalOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Ask one expert directly (no routing, no merge)."""
    from orchestrator.client import find_server
    from orchestrator.config import load_config

    check_text(question)
    srv = find_server(server=server, config=config, local=local)  # the server validated its config
    if srv is not None:
        body = srv.chat(
            _drop_none(
                {
                    "model": expert,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": max_new_tokens,
                    "temperature": temperature,
                    "seed": seed,
                }
            )
        )
        text = (body["choices"][0].get("message") or {}).get("content") or ""
        row = {
            "expert": expert,
            "text": text,
            "tokens": int((body.get("usage") or {}).get("completion_tokens", 0)),
            "latency_s": float((body.get("expertmix") or {}).get("latency_s", 0.0)),
            "finish_reason": body["choices"][0].get("finish_reason"),
        }
    else:
        cfg = load_config(config)
        cfg.registry.check([expert])
        with load_orchestrator(cfg) as om:
            g = om.generate(
                expert, question, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            )
        row = {
            "expert": g.expert,
            "text": g.text,
            "tokens": g.tokens,
            "latency_s": round(g.latency_s, 4),
            "finish_reason": g.finish_reason,
        }
    if as_json:
        echo_json(row)
    else:
        typer.echo(row["text"])
        typer.echo(f"\n[{row['expert']}: {row['tokens']} tokens in {row['latency_s']:.2f} s]", err=True)


@app.command()
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    k: KOpt = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="Merge strategy, e.g. synthesis | mixture | adapter_merge | top1 | decompose | auto "
            f"(default: the config's orchestrator.strategy; {_O.strategy} if unset)."
        ),
    ] = None,
    min_weight: MinWeightOpt = None,
    max_new_tokens: TokensOpt = None,
    temperature: TempOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    server: ServerOpt = None,
    local: LocalOpt = False,
    as_json: JsonOpt = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream", help="Print the answer as it is generated (with --json: one JSON object per line)."
        ),
    ] = False,
) -> None:
    """Route the question to the top-k experts, run them, and print one merged answer."""
    from orchestrator.client import answer_dict, find_server
    from orchestrator.config import known_strategies, load_config

    check_text(question)
    opts = _drop_none(
        {
            "k": k,
            "strategy": strategy,
            "min_weight": min_weight,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
    )
    emit = _emitter(as_json=as_json, stream=stream)
    srv = find_server(server=server, config=config, local=local)
    d: dict[str, Any]
    if srv is not None:
        body = {
            "model": "expertmix",
            "messages": [{"role": "user", "content": question}],
            **{("max_tokens" if key == "max_new_tokens" else key): v for key, v in opts.items()},
        }
        if stream:
            last: dict[str, Any] = {}
            text = []
            for chunk in srv.stream_chat(body):
                for ch in chunk.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        emit(piece)
                if "expertmix" in chunk:
                    last = chunk
            last["choices"] = [{"message": {"content": "".join(text)}}]
            d = answer_dict(last)
        else:
            d = answer_dict(srv.chat(body))
    else:
        from orchestrator.trace import Answer

        cfg = load_config(config)
        if strategy is not None and strategy not in known_strategies():
            from expertmix.errors import StrategyError

            raise StrategyError(
                f"unknown merge strategy {strategy!r}; choose one of {', '.join(known_strategies())}"
            )
        with load_orchestrator(cfg) as om:
            if stream:
                answer = None
                for item in om.stream(question, **opts):
                    if isinstance(item, Answer):
                        answer = item
                    else:
                        emit(item)
                assert answer is not None
            else:
                answer = om.ask(question, **opts)
        d = answer.to_dict()
    _finish_answer(d, as_json=as_json, stream=stream)


def _emitter(*, as_json: bool, stream: bool) -> Any:
    def emit(piece: str) -> None:
        if not stream:
            return
        if as_json:
            typer.echo(json.dumps({"type": "delta", "text": piece}, ensure_ascii=False))
        else:
            typer.echo(piece, nl=False)

    return emit


def _finish_answer(d: dict[str, Any], *, as_json: bool, stream: bool) -> None:
    if as_json and stream:
        typer.echo(json.dumps({"type": "answer", **d}, ensure_ascii=False, default=str))
        return
    if as_json:
        echo_json(d)
        return
    if stream:
        typer.echo("")
    else:
        typer.echo(d["answer"])
    typer.echo("", err=True)
    print_trace(d)


@app.command()
@handle_errors
def route(
    question: Annotated[str, typer.Argument(help="The query to route.")],
    k: KOpt = None,
    min_weight: MinWeightOpt = None,
    router: Annotated[
        Path | None, typer.Option(help="Router artifact or store (default: the config's).")
    ] = None,
    config: ConfigOpt = None,
    server: ServerOpt = None,
    local: LocalOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show which experts a question goes to, with weights and probabilities (as `ask` would route it)."""
    from orchestrator.client import find_server

    check_text(question)
    d: dict[str, Any] | None = None
    srv = None if router is not None else find_server(server=server, config=config, local=local)
    if srv is not None:
        d = srv.route(question, k=k, min_weight=min_weight)
    if d is None:
        d = _route_here(question, k=k, min_weight=min_weight, router=router, config=config)
    keys = ("experts", "abstained", "probabilities", "confidence", "reason")  # the same fields either way
    res = {"query": question, **{key: d.get(key) for key in keys}}
    if as_json:
        echo_json(res)
        return
    for e in res["experts"]:
        typer.echo(f"{e['name']:<14} {e['weight']:6.1%}")
    if res["abstained"]:
        typer.echo(f"abstained: {res['reason']} → base model")
    probs = ", ".join(f"{n}={p:.3f}" for n, p in sorted(res["probabilities"].items(), key=lambda kv: -kv[1]))
    typer.echo(f"probabilities: {probs}")


def _route_here(
    question: str, *, k: int | None, min_weight: float | None, router: Path | None, config: Path | None
) -> dict[str, Any]:
    """In-process routing: the router alone (no language model), with the config's k and min_weight."""
    from experts.prompts import last_user_text, normalize_messages
    from orchestrator.cli_common import phase
    from orchestrator.config import load_config
    from orchestrator.routing import Router, check_labels

    cfg = load_config(config)
    text = last_user_text(normalize_messages(question))
    with phase("router"):
        r = Router.load(router if router is not None else cfg.router.path)
    if router is None:
        check_labels(r, [e.name for e in cfg.experts])
    kk = cfg.router.k if k is None else k
    mw = cfg.router.min_weight if min_weight is None else min_weight
    return r.route(text, k=min(kk, len(r.labels)), min_weight=mw).to_dict()  # type: ignore[no-any-return]


@app.command()
@handle_errors
def stats(
    logfile: Annotated[
        Path, typer.Argument(help="Answer log (JSON lines) written by orchestrator.log_file.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Per-expert utilization from an answer log: share of queries, mean weight, failures, latency.

    Torn or wrong-shaped lines (a crash mid-write, another program's log) are skipped and counted.
    """
    from expertmix.errors import DataError
    from orchestrator.cli_common import answer_log_lines
    from orchestrator.trace import utilization

    if not logfile.is_file():
        raise DataError(
            "log file not found; set [orchestrator] log_file in your config to write one", path=logfile
        )
    with open(logfile, encoding="utf-8", errors="replace") as fh:
        good, skipped = answer_log_lines(fh)
    s = utilization(good, source=str(logfile))
    s["skipped_lines"] = skipped
    if as_json:
        echo_json(s)
        return
    typer.echo(f"{s['queries']} answers, {s['abstained']} answered by the base model (router abstained)")
    if skipped:
        typer.echo(f"skipped {skipped} torn or unrecognized line(s)", err=True)
    typer.echo(f"{'expert':<14}{'queries':>8}{'share':>8}{'mean w':>8}{'fail':>6}{'p50 s':>8}{'p95 s':>8}")
    for name, e in s["experts"].items():
        typer.echo(
            f"{name:<14}{e['queries']:>8}{e['share']:>8.0%}{e['mean_weight']:>8.2f}{e['failures']:>6}"
            f"{e['p50_latency_s']:>8.2f}{e['p95_latency_s']:>8.2f}"
        )


def _register_optional() -> None:
    # Commands owned by their own modules; each registers itself without heavy imports.
    import importlib

    for mod, target in (
        ("orchestrator.cli_router", app),
        ("orchestrator.cli_train", experts_app),
        ("orchestrator.cli_serve", app),
        ("orchestrator.cli_config", app),
        ("orchestrator.cli_lifecycle", app),
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        m.register(target)


_register_optional()


def main() -> None:
    """The ``expertmix`` entry point. ``ask``/``route``/``generate`` lines are parsed without typer when
    possible (:mod:`orchestrator.cli_fast`, ~0.3 s less CPU per call); same functions, same output."""
    import sys

    from orchestrator.cli_fast import parse

    parsed = parse(sys.argv[1:])
    if parsed is None:
        app()
        return
    command, kwargs = parsed
    try:
        {"ask": ask, "route": route, "generate": generate}[command](**kwargs)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
