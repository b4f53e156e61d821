"""``expertmix feedback`` and ``expertmix experts add/remove``: change what runs, and say how it went.

``experts add/remove`` edit the config file with tomlkit (comments and layout kept), validated
before the file is replaced atomically; when an ``expertmix serve`` for the same config is
reachable (``--server`` / ``EXPERTMIX_SERVER`` / its port file), the change is applied to it too
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``). ``feedback`` posts to the running
server, or appends to the feedback log when none runs.

An ``--backend openai`` expert lives on a vLLM server: the adapter is loaded there first (through
the running expertmix server, else straight to vLLM's ``/v1/load_lora_adapter``) and the config
is written only when that succeeded; removing one unloads it there before the config is edited.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli_common import echo_json, handle_errors

__all__ = ["add_expert_to_file", "add_remote_expert", "register", "remove_expert_from_file"]

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="expertmix.toml to use.")]
ServerOpt = Annotated[str | None, typer.Option("--server", help="URL of a running expertmix serve.",
                                                  envvar="EXPERTMIX_SERVER")]


def _load_doc(path: Path) -> Any:
    import tomlkit

    from expertmix.errors import ConfigError

    if not path.is_file():
        raise ConfigError("config file not found", path=path)
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tomlkit's ParseError and friends
        raise ConfigError(f"malformed TOML: {exc}", path=path) from exc


def _write_validated(path: Path, doc: Any) -> None:
    """Validate the edited config (as a sibling file, so relative paths resolve the same) and swap it in."""
    from expertmix.io import atomic_write_text

    atomic_write_text(path, _validated(path, doc))


def _validated(path: Path, doc: Any) -> str:
    """The edited config's text, once it loads (as a sibling file: relative paths resolve the same)."""
    import os
    import tempfile
    import warnings

    import tomlkit

    from orchestrator.config import load_config

    text = tomlkit.dumps(doc)
    fd, tmp = tempfile.mkstemp(prefix=".expertmix-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys the user had already
            load_config(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return text


def _refuse_shipped(path: Path) -> None:
    from expertmix.errors import ConfigError
    from orchestrator.config import default_config_path

    if path.resolve() == default_config_path().resolve():
        raise ConfigError("this is the shipped config; copy it next to your adapters and pass --config COPY", path=path)


def add_expert_to_file(path: Path, *, name: str, adapter: Path, description: str) -> Path:
    """Append an ``[[experts]]`` table; returns the adapter directory as resolved. Validates first."""
    import tomlkit

    from experts.backends.local import validate_adapter_dir

    _check_new_name(path, name)
    real = adapter.expanduser().resolve()
    validate_adapter_dir(real, expert=name)
    doc = _load_doc(path)
    experts = _experts_table(path, doc, name)
    try:
        rel = real.relative_to(path.resolve().parent)
        shown = str(rel)
    except ValueError:
        shown = str(real)
    table = tomlkit.table()
    table.update({"name": name, "description": description, "adapter": shown, "backend": "local"})
    experts.append(table)
    _write_validated(path, doc)
    return real


def _check_new_name(path: Path, name: str) -> None:
    """Refuse the shipped config and names that break the name rule."""
    from expertmix.errors import ConfigError
    from experts.registry import name_problem

    _refuse_shipped(path)
    problem = name_problem(name)
    if problem:
        raise ConfigError(problem, path=path, key="experts.name")


def _experts_table(path: Path, doc: Any, name: str) -> Any:
    """The document's ``[[experts]]`` array (created when missing); refuses a name already configured."""
    import tomlkit

    from expertmix.errors import ConfigError

    experts = doc.get("experts")
    if experts is None:
        experts = tomlkit.aot()
        doc["experts"] = experts
    if any(t.get("name") == name for t in experts):
        raise ConfigError(f"expert {name!r} is already configured; remove it first or pick another name",
                          path=path, key="experts")
    return experts


def remove_expert_from_file(path: Path, *, name: str) -> None:
    from expertmix.errors import ConfigError

    _refuse_shipped(path)
    doc = _load_doc(path)
    experts = doc.get("experts") or []
    keep = [i for i, t in enumerate(experts) if t.get("name") != name]
    if len(keep) == len(experts):
        names = ", ".join(str(t.get("name")) for t in experts)
        raise ConfigError(f"no expert named {name!r} in this config (configured: {names})", path=path, key="experts")
    for i in reversed(range(len(experts))):
        if i not in keep:
            del experts[i]
    _write_validated(path, doc)


def _remote_table(path: Path, doc: Any, *, name: str, base_url: str | None, adapter: str,
                  description: str) -> Any:
    """The ``[[experts]]`` table of a vLLM-served expert, appended to ``doc`` (base_url: given, else the one
    the config's openai experts share)."""
    import tomlkit

    from expertmix.errors import ConfigError

    _check_new_name(path, name)
    experts = _experts_table(path, doc, name)
    urls = sorted({str(t.get("base_url")).rstrip("/") for t in experts if t.get("backend") == "openai"})
    if base_url is None:
        if len(urls) != 1:
            used = f"; this config uses {', '.join(urls)}" if urls else ""
            raise ConfigError(f"say which vLLM server with --base-url (its /v1 root){used}", path=path,
                              key="experts")
        base_url = urls[0]
    table = tomlkit.table()
    table.update({"name": name, "description": description, "backend": "openai",
                  "base_url": base_url.rstrip("/")})
    key = next((t.get("api_key") for t in experts if t.get("backend") == "openai" and t.get("api_key")
                and str(t.get("base_url")).rstrip("/") == base_url.rstrip("/")), None)
    if key:
        table["api_key"] = key
    table.add(tomlkit.comment(f"loaded at run time on the vLLM host from {adapter}; vLLM forgets it when it "
                              f"restarts: add --lora-modules {name}={adapter} to its command line"))
    experts.append(table)
    return table


def _direct_backend(table: Any) -> Any:
    from experts.backends.openai import OpenAIBackend

    return OpenAIBackend(str(table["base_url"]), [], api_key=table.get("api_key"), check=False, max_retries=0)


def add_remote_expert(path: Path, *, name: str, adapter: str, description: str, base_url: str | None,
                      server: Any) -> str:
    """Load a vLLM-served expert (through ``server`` when one runs, else on vLLM directly), then write the
    config; nothing is written when the load fails, and the load is undone when the write fails.
    Returns where it was loaded."""
    from expertmix.errors import ExpertUnavailable
    from expertmix.io import atomic_write_text

    doc = _load_doc(path)
    table = _remote_table(path, doc, name=name, base_url=base_url, adapter=adapter, description=description)
    text = _validated(path, doc)
    if server is not None:
        status, reply = _post(server, "/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": adapter, "description": description, "backend": "openai",
            "base_url": str(table["base_url"])})
        if status != 200:
            raise ExpertUnavailable(f"server {server.url} did not load {name!r} (HTTP {status}): "
                                    f"{_reason(reply)}; {path} is unchanged", expert=name, status_code=status)
        where = f"server {server.url} (forwarded to {table['base_url']})"
    else:
        remote = _direct_backend(table)
        try:
            remote.load_adapter(name, adapter)
        finally:
            remote.close()
        where = str(table["base_url"])
    try:
        atomic_write_text(path, text)
    except BaseException:
        _unload_remote(table, name, server)
        raise
    return where


def _unload_remote(table: Any, name: str, server: Any) -> str:
    """Unload a vLLM-served expert (via ``server`` when one runs); an adapter already gone is fine."""
    from expertmix.errors import ExpertUnavailable, UnknownExpert

    if server is not None:
        status, reply = _post(server, "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise ExpertUnavailable(f"server {server.url} did not unload {name!r} (HTTP {status}): "
                                    f"{_reason(reply)}", expert=name, status_code=status)
        return f"server {server.url}: {'unloaded' if status == 200 else 'it was not loaded there'}"
    remote = _direct_backend(table)
    try:
        remote.unload_adapter(str(table.get("remote_name") or name))
    except UnknownExpert:
        return f"{table['base_url']}: it was not loaded there"
    finally:
        remote.close()
    return f"{table['base_url']}: unloaded"


def _reason(reply: str) -> str:
    import json

    try:
        return str(json.loads(reply)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return reply[:300]


def _server(server: str | None, config: Path | None) -> Any:
    from orchestrator.client import find_server

    return find_server(server=server, config=config)


def _post(srv: Any, path: str, body: dict[str, Any]) -> tuple[int, str]:
    import httpx

    headers = {"Authorization": f"Bearer {srv.api_key}"} if srv.api_key else {}
    r = httpx.post(srv.url + path, json=body, headers=headers, timeout=120)
    return r.status_code, r.text


def _router_note(path: Path) -> str:
    return (f"the router does not know this expert yet: retrain the router on data with its label and promote it "
            f"(see docs/training.md) before routed answers with {path.name} can use it")


def register(app: typer.Typer) -> None:
    experts_app = next((g.typer_instance for g in app.registered_groups if g.name == "experts"), None)
    target = experts_app if experts_app is not None else app

    @target.command("add")
    @handle_errors
    def experts_add(
        name: Annotated[str, typer.Argument(help="Expert name (lowercase letters, digits, - or _).")],
        adapter: Annotated[str, typer.Option("--adapter", help="PEFT LoRA adapter directory (with --backend "
                                             "openai: its path on the vLLM host).")],
        description: Annotated[str, typer.Option("--description", help="What the expert knows.")],
        config: Annotated[Path, typer.Option("--config", "-c", help="expertmix.toml to edit.")],
        backend: Annotated[str, typer.Option("--backend", help="local, or openai (an adapter served by "
                                             "vLLM).")] = "local",
        base_url: Annotated[str | None, typer.Option(
            "--base-url", help="--backend openai: the vLLM server's /v1 root (default: the one the config's "
            "openai experts use).")] = None,
        server: ServerOpt = None,
    ) -> None:
        """Add an expert to a config file (and to a running server for that config)."""
        from expertmix.errors import InputError

        if backend not in ("local", "openai"):
            raise InputError(f"--backend must be local or openai, got {backend!r}")
        if base_url is not None and backend != "openai":
            raise InputError("--base-url names a vLLM server: use it with --backend openai")
        if backend == "openai":
            where = add_remote_expert(config, name=name, adapter=adapter, description=description,
                                      base_url=base_url, server=_server(server, config))
            typer.echo(f"loaded {name!r} on {where}; added it to {config}", err=True)
            typer.echo(f"note: {_router_note(config)}", err=True)
            return
        real = add_expert_to_file(config, name=name, adapter=Path(adapter), description=description)
        typer.echo(f"added expert {name!r} to {config}", err=True)
        srv = _server(server, config)
        if srv is not None:
            status, text = _post(srv, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(real),
                                                                 "description": description})
            typer.echo(f"server {srv.url}: {'loaded' if status == 200 else f'not loaded (HTTP {status}: {text[:300]})'}",
                       err=True)
        typer.echo(f"note: {_router_note(config)}", err=True)

    @target.command("remove")
    @handle_errors
    def experts_remove(
        name: Annotated[str, typer.Argument(help="Expert name.")],
        config: Annotated[Path, typer.Option("--config", "-c", help="expertmix.toml to edit.")],
        server: ServerOpt = None,
    ) -> None:
        """Remove an expert from a config file (and from a running server for that config)."""
        table = next((t for t in (_load_doc(config).get("experts") or []) if t.get("name") == name), None)
        if table is not None and table.get("backend") == "openai":  # unload on vLLM first; the config follows
            _refuse_shipped(config)
            said = _unload_remote(table, name, _server(server, config))
            remove_expert_from_file(config, name=name)
            typer.echo(f"{said}; removed expert {name!r} from {config}", err=True)
            return
        remove_expert_from_file(config, name=name)
        typer.echo(f"removed expert {name!r} from {config}", err=True)
        srv = _server(server, config)
        if srv is not None:
            status, text = _post(srv, "/v1/unload_lora_adapter", {"lora_name": name})
            typer.echo(f"server {srv.url}: {'unloaded' if status == 200 else f'HTTP {status}: {text[:300]}'}", err=True)

    @app.command()
    @handle_errors
    def feedback(
        answer_id: Annotated[str, typer.Argument(help="The answer's id (printed by ask; the response 'id').")],
        good: Annotated[bool | None, typer.Option("--good/--bad", help="Was the answer good?")] = None,
        expert: Annotated[str | None, typer.Option("--expert", help="The department that should have answered.")]
        = None,
        text: Annotated[str | None, typer.Option("--text", help="The question (needed to learn from a "
                                                                  "correction unless the answer log keeps text).")]
        = None,
        comment: Annotated[str | None, typer.Option("--comment", help="Free text.")] = None,
        config: ConfigOpt = None,
        server: ServerOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    ) -> None:
        """Record feedback on an answer (to the running server, else to the feedback log)."""
        from expertmix.errors import InputError

        if good is None:
            raise InputError("say --good or --bad")
        body: dict[str, Any] = {"id": answer_id, "rating": "good" if good else "bad"}
        for key, value in (("expert", expert), ("text", text), ("comment", comment)):
            if value is not None:
                body[key] = value
        srv = _server(server, config)
        if srv is not None:
            status, reply = _post(srv, "/v1/feedback", body)
            if status != 200:
                raise InputError(f"server {srv.url} refused the feedback (HTTP {status}): {reply[:300]}")
            where = srv.url
        else:
            from orchestrator.config import load_config
            from orchestrator.feedback import FeedbackLog, feedback_path, parse_feedback

            cfg = load_config(config)
            fb = parse_feedback(body, experts=[e.name for e in cfg.experts])
            log = FeedbackLog(feedback_path(cfg))
            log.append(fb)
            where = str(log.path)
        if as_json:
            echo_json({**body, "recorded_at": where})
        else:
            typer.echo(f"feedback on {answer_id} recorded ({where})")
