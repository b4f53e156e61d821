"""``expertmix config show|validate|schema``: the effective config, a check, and its JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli_common import echo_json, handle_errors

__all__ = ["register", "to_toml"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str) and "\n" in v:
        return '"""\n' + v.replace("\\", "\\\\").replace('"""', '\\"""') + '"""'
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def to_toml(d: dict[str, Any]) -> str:
    """The effective config (``ExpertmixConfig.to_dict()``) as TOML that ``load_config`` reads back."""
    out: list[str] = []
    for name in ("base", "router", "orchestrator", "server"):
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in d[name].items()]
        out.append("")
    for e in d["experts"]:
        out.append("[[experts]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in e.items()]
        out.append("")
    return "\n".join(out)


def show(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="expertmix.toml (default: the shipped one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of TOML.")] = False,
) -> None:
    """Print the effective config: every key, defaults filled in, paths resolved, secrets hidden."""
    from orchestrator.config import load_config

    cfg = load_config(config)
    d = cfg.to_dict()
    if as_json:
        echo_json({"path": cfg.path, **d})
        return
    typer.echo(f"# effective config of {cfg.path}")
    typer.echo(to_toml(d), nl=False)


def validate(file: Annotated[Path, typer.Argument(help="The expertmix.toml to check.")]) -> None:
    """Check a config file (types, ranges, names, paths); exit 1 with file, key and fix if it is wrong."""
    import warnings

    from orchestrator.config import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(file)
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    typer.echo(f"{cfg.path}: ok ({len(cfg.experts)} experts, strategy {cfg.orchestrator.strategy})")


def schema() -> None:
    """Print the JSON Schema of expertmix.toml (docs/config.schema.json is this output)."""
    from orchestrator.config import config_schema

    echo_json(config_schema())


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Show, validate and describe expertmix.toml.", no_args_is_help=True)
    group.command("show")(handle_errors(show))
    group.command("validate")(handle_errors(validate))
    group.command("schema")(handle_errors(schema))
    app.add_typer(group, name="config")
