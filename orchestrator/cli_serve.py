"""``expertmix serve``: the OpenAI-compatible server. Heavy imports happen inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli_common import handle_errors

__all__ = ["register"]

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before the model loads, rather than after, when the port is taken."""
    import socket

    from expertmix.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port"
            ) from exc


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def serve(
        host: Annotated[
            str | None, typer.Option(help="Interface to bind (default from config: 127.0.0.1).")
        ] = None,
        port: Annotated[int | None, typer.Option(help="TCP port (default from config: 8000).")] = None,
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="expertmix.toml (default: the shipped one).")
        ] = None,
        api_key: Annotated[
            str | None,
            typer.Option(
                envvar="EXPERTMIX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics."
            ),
        ] = None,
        batching: Annotated[
            bool | None,
            typer.Option(
                "--batching/--no-batching",
                help="Decode concurrent requests together (local experts) "
                "(default: the config's server.batching).",
            ),
        ] = None,
        max_batch_size: Annotated[int | None, typer.Option(help="Rows per decoded batch at most.")] = None,
        max_wait_ms: Annotated[
            float | None, typer.Option(help="How long a batch waits for more requests.")
        ] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
        drop_params: Annotated[
            bool,
            typer.Option(
                "--drop-params",
                help="Drop unknown request fields instead of answering 400 (LiteLLM's drop_params).",
            ),
        ] = False,
    ) -> None:
        """Serve an OpenAI-compatible API: model 'expertmix' (routed + merged), each expert, '__base__'."""
        from dataclasses import replace

        from expertmix.errors import ConfigError
        from orchestrator.config import load_config

        cfg = load_config(config)
        s = cfg.server
        s = replace(
            s,
            batching=batching if batching is not None else s.batching,
            host=host if host is not None else s.host,
            port=port if port is not None else s.port,
            api_key=api_key if api_key is not None else s.api_key,
            max_batch_size=max_batch_size if max_batch_size is not None else s.max_batch_size,
            max_wait_ms=max_wait_ms if max_wait_ms is not None else s.max_wait_ms,
            drop_params=drop_params or s.drop_params,
        )
        if not 0 < s.port < 65536:
            raise ConfigError(f"--port {s.port} is not a TCP port")
        if s.max_batch_size < 1 or s.max_wait_ms < 0:
            raise ConfigError("--max-batch-size must be >= 1 and --max-wait-ms >= 0")
        _check_port_free(s.host, s.port)
        if s.host not in _LOOPBACK and not s.api_key:
            typer.echo(
                f"warning: listening on {s.host} without --api-key: anyone who can reach it can use it",
                err=True,
            )

        import uvicorn

        from orchestrator.core import Orchestrator
        from orchestrator.server.app import create_app

        om = Orchestrator(cfg, batching=s.batching)
        app_ = create_app(om, settings=s, batching=s.batching, owns_orchestrator=True)
        typer.echo(
            f"expertmix: serving {', '.join(om.expert_names)} + expertmix on http://{s.host}:{s.port}/v1",
            err=True,
        )
        from orchestrator.client import remove_port_file, write_port_file

        class _Server(uvicorn.Server):
            # uvicorn re-raises SIGTERM/SIGINT after a graceful shutdown, so a `finally` after run() never
            # runs: take the port file down when shutdown starts.
            async def shutdown(self, sockets: Any = None) -> None:
                remove_port_file()
                await super().shutdown(sockets=sockets)

        server = _Server(
            uvicorn.Config(
                app_,
                host=s.host,
                port=s.port,
                log_level=log_level,
                timeout_graceful_shutdown=10,
                access_log=log_level == "debug",
            )
        )
        from orchestrator.server.background import graceful_shutdown

        graceful_shutdown(server, app_)  # SIGTERM: 503 to new requests, drain in-flight work, then exit

        # `expertmix ask/route/generate` with the same config find this server through the port file.
        client_host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
        write_port_file(
            url=f"http://{'[' + client_host + ']' if ':' in client_host else client_host}:{s.port}",
            config=config,
        )
        try:
            server.run()
        finally:
            remove_port_file()
