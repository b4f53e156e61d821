"""The fast CLI: `expertmix ask/generate` through a running server print what the in-process path prints.

One real orchestrator (SmolLM2 + random adapters) behind a real server on loopback; the CLI runs as
a subprocess that never loads a model (it only talks HTTP), so each call takes about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

Q = "How do I reverse a list in Python?"
TOKENS = 4


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, random_adapters: dict[str, Path]) -> Path:
    d = tmp_path_factory.mktemp("cfg")
    text = "[orchestrator]\nmax_new_tokens = 6\nexpert_timeout_s = 120\n"
    for name, path in random_adapters.items():
        text += f'\n[[experts]]\nname = "{name}"\nadapter = "{path}"\n'
    p = d / "expertmix.toml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def om(config_file: Path):
    from orchestrator.core import Orchestrator

    with Orchestrator.from_config(config_file) as o:
        yield o


@pytest.fixture(scope="module")
def server(om):
    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    with BackgroundServer(create_app(om)) as srv:
        yield srv


def _cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("EXPERTMIX_SERVER", "EXPERTMIX_API_KEY")}
    full.update(EXPERTMIX_HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
    )


def _same(a: dict, b: dict) -> None:
    """Answer and trace equal, apart from measured times."""
    for d in (a, b):
        d.pop("timings", None)
        d.pop("id", None)
        for c in d.get("contributions", []):
            c.pop("latency_s", None)
    assert a == b


def test_ask_through_the_server_equals_in_process(server, om, tmp_path: Path) -> None:
    res = _cli("ask", "--json", "--max-new-tokens", str(TOKENS), "--server", server.url, Q, home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "loaded in" not in res.stderr  # no model was loaded in the CLI process
    remote = json.loads(res.stdout)
    local = json.loads(json.dumps(om.ask(Q, max_new_tokens=TOKENS).to_dict()))
    _same(remote, local)


def test_stream_json_lines_through_the_server(server, om, tmp_path: Path) -> None:
    res = _cli(
        "ask",
        "--stream",
        "--json",
        "--max-new-tokens",
        str(TOKENS),
        Q,
        home=tmp_path,
        EXPERTMIX_SERVER=server.url,
    )
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[-1]["type"] == "answer" and all(r["type"] == "delta" for r in rows[:-1])
    assert "".join(r["text"] for r in rows[:-1]).strip() == rows[-1]["answer"].strip()
    assert rows[-1]["usage"]["completion_tokens"] > 0


def test_port_file_discovery_needs_the_same_config(
    server, config_file: Path, tmp_path: Path, monkeypatch
) -> None:
    from orchestrator.client import port_file, remove_port_file, write_port_file

    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    write_port_file(url=server.url, config=config_file)
    assert port_file().is_file()
    res = _cli(
        "generate",
        "--expert",
        "__base__",
        "--max-new-tokens",
        str(TOKENS),
        "--json",
        "--config",
        str(config_file),
        Q,
        home=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "loaded in" not in res.stderr and json.loads(res.stdout)["tokens"] >= 1
    remove_port_file()
    assert not port_file().exists()


def test_named_server_that_is_down_is_one_line(tmp_path: Path) -> None:
    res = _cli("ask", "--server", "http://127.0.0.1:9", Q, home=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("error: no expertmix server answers")
    assert res.stderr.count("\n") == 1


def test_route_through_the_server_equals_in_process(server, om, tmp_path: Path) -> None:
    res = _cli("route", "--json", "--server", server.url, Q, home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "loaded in" not in res.stderr
    local = {"query": Q, **json.loads(json.dumps(om.route(Q).to_dict()))}
    assert json.loads(res.stdout) == local
