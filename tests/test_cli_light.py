"""The CLI starts light: --help imports no torch; every command has --help; errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from orchestrator.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'sklearn', 'sentence_transformers', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(
    "cmd",
    [[], ["ask"], ["generate"], ["stats"], ["route"], ["experts"], ["experts", "list"], ["experts", "train"],
     ["router"], ["router", "train"], ["router", "eval"], ["router", "promote"], ["serve"]],
)
def test_every_command_has_help(cmd: list[str]) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    res = CliRunner().invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_experts_list_json() -> None:
    res = _run("experts", "list", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["finance", "engineering", "product"]
    assert set(rows[0]) == {"name", "description", "adapter", "backend"}


def test_config_error_is_one_line(tmp_path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[base\n")
    res = _run("experts", "list", "--config", str(bad))
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


def test_generate_unknown_expert_and_empty_prompt() -> None:
    res = _run("generate", "--expert", "legal", "hi")
    assert res.returncode == 1 and "unknown expert 'legal'" in res.stderr and "Traceback" not in res.stderr
    res = _run("generate", "--expert", "__base__", "   ")
    assert res.returncode == 1 and "empty" in res.stderr


def test_non_utf8_argument_is_a_clear_error() -> None:
    # argv bytes that are not UTF-8 arrive as surrogate escapes
    res = subprocess.run(
        [sys.executable.encode(), b"-m", b"orchestrator.cli", b"generate", b"--expert", b"__base__", b"caf\xe9"],
        capture_output=True, timeout=120,
    )
    assert res.returncode == 1
    assert b"UTF-8" in res.stderr and b"Traceback" not in res.stderr
