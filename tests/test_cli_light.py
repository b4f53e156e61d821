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
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from orchestrator.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'sklearn', 'sentence_transformers', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(
    "cmd",
    [
        [],
        ["ask"],
        ["generate"],
        ["stats"],
        ["route"],
        ["experts"],
        ["experts", "list"],
        ["experts", "train"],
        ["router"],
        ["router", "train"],
        ["router", "eval"],
        ["router", "promote"],
        ["serve"],
        ["config"],
        ["config", "show"],
        ["config", "validate"],
        ["config", "schema"],
    ],
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
        [
            sys.executable.encode(),
            b"-m",
            b"orchestrator.cli",
            b"generate",
            b"--expert",
            b"__base__",
            b"caf\xe9",
        ],
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert b"UTF-8" in res.stderr and b"Traceback" not in res.stderr


def test_version_and_completion() -> None:
    from importlib.metadata import version

    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"expertmix {version('expertmix')}"
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    assert "--install-completion" in out and "--show-completion" in out


def test_help_shows_defaults() -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    def flat(args: list[str]) -> str:  # the help table wraps inside box-drawing borders
        return " ".join(CliRunner().invoke(app, args).output.replace("│", " ").split())

    out = flat(["ask", "--help"])
    from orchestrator.config import OrchestratorSettings

    assert "router.k; 2 if unset" in out
    assert f"orchestrator.strategy; {OrchestratorSettings.strategy} if unset" in out
    out = flat(["experts", "train", "--help"])
    assert "default: 16" in out  # --rank


def test_bad_argv_bytes_are_one_clean_line_for_route_and_ask() -> None:
    for cmd in (b"route", b"ask"):
        res = subprocess.run(
            [sys.executable.encode(), b"-m", b"orchestrator.cli", cmd, b"\xff"],
            check=False,
            capture_output=True,
            timeout=120,
        )
        assert res.returncode == 1, res.stderr
        assert res.stderr.startswith(b"error: ") and res.stderr.count(b"\n") == 1 and b"UTF-8" in res.stderr


def test_config_show_validate_schema(tmp_path) -> None:
    from orchestrator.cli_config import to_toml
    from orchestrator.config import load_config

    res = _run("config", "show")
    assert res.returncode == 0, res.stderr
    assert "min_weight = 0.05" in res.stdout and "max_wait_ms = 10.0" in res.stdout
    # what `config show` prints is a config that loads back to the same values
    p = tmp_path / "effective.toml"
    p.write_text(to_toml(load_config().to_dict()), encoding="utf-8")
    assert load_config(p).to_dict() == load_config().to_dict()
    bad = tmp_path / "bad.toml"
    bad.write_text('[orchestrator]\nstrategy = "bogus"\n')
    res = _run("config", "validate", str(bad))
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "[orchestrator.strategy]" in res.stderr and "synthesis" in res.stderr and str(bad) in res.stderr
    res = _run("config", "validate", str(p))
    assert res.returncode == 0 and ": ok (3 experts" in res.stdout
    res = _run("config", "schema")
    assert json.loads(res.stdout)["properties"]["router"]["properties"]["k"]["default"] == 2


def test_stats_skips_torn_and_wrong_shaped_lines(tmp_path) -> None:
    good = {
        "ts": 1,
        "strategy": "top1",
        "routing": {"abstained": False},
        "experts": [{"expert": "finance", "weight": 1.0, "tokens": 3, "latency_s": 0.5, "error": None}],
    }
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            [
                json.dumps(good),
                "[1, 2]",
                '{"experts": "x"}',
                '{"experts": [3]}',
                json.dumps(good),
                json.dumps(good)[:25],
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    res = _run("stats", str(log), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["queries"] == 2 and s["skipped_lines"] == 4 and s["experts"]["finance"]["queries"] == 2
    res = _run("stats", str(tmp_path / "none.jsonl"))
    assert res.returncode == 1 and "log_file" in res.stderr


def test_train_checks_out_before_training(tmp_path) -> None:
    from orchestrator.cli_train import preflight_out

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run(
        "experts", "train", "--name", "legal", "--data", str(data), "--out", str(blocker / "x"), "--quiet"
    )
    assert res.returncode == 1 and "not a writable directory" in res.stderr, res.stderr
    res = _run("experts", "train", "--name", "legal", "--data", str(data), "--epochs", "inf", "--quiet")
    assert res.returncode == 1 and "--epochs must be a finite number" in res.stderr, res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    preflight_out(empty)  # an existing empty directory is accepted: the adapter replaces it
    assert not empty.exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    res = _run("experts", "train", "--name", "legal", "--data", str(data), "--out", str(full), "--quiet")
    assert res.returncode == 1 and "non-empty" in res.stderr and (full / "notes.txt").exists(), res.stderr


def test_route_applies_the_configs_min_weight_like_ask(tmp_path) -> None:
    """The shipped config drops experts under 5 %: `route` shows what `ask` uses (was: finance 0.0004)."""
    from orchestrator.cli_config import to_toml
    from orchestrator.config import load_config

    q = "How do I reverse a list in Python?"
    assert load_config().router.min_weight == 0.05
    res = _run("route", "--json", q)
    assert res.returncode == 0, res.stderr
    assert [e["name"] for e in json.loads(res.stdout)["experts"]] == ["engineering"]
    d = load_config().to_dict()
    d["router"]["min_weight"] = 0.0
    cfg = tmp_path / "keep-all.toml"
    cfg.write_text(to_toml(d), encoding="utf-8")
    res = _run("route", "--json", "--config", str(cfg), q)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["experts"]) == 2  # k = 2, nothing dropped


FAST_LINES = [
    ["ask", "What is EBITDA?"],
    ["ask", "q", "--k", "1", "--strategy", "top1", "--json", "--stream", "--min-weight", "0.1"],
    [
        "ask",
        "--max-new-tokens=8",
        "-k",
        "3",
        "q",
        "--temperature",
        "0.5",
        "--seed",
        "7",
        "--local",
        "-c",
        "x.toml",
    ],
    ["route", "q", "--json", "--router", "some/dir", "--server", "http://127.0.0.1:1"],
    ["generate", "-e", "__base__", "q", "--max-new-tokens", "4"],
]


@pytest.mark.parametrize("argv", FAST_LINES, ids=[" ".join(a) for a in FAST_LINES])
def test_fast_parser_agrees_with_typer(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from orchestrator.cli import app
    from orchestrator.cli_fast import parse

    monkeypatch.delenv("EXPERTMIX_SERVER", raising=False)
    monkeypatch.delenv("EXPERTMIX_MAX_NEW_TOKENS", raising=False)
    group = typer.main.get_command(app)
    ctx = group.commands[argv[0]].make_context(argv[0], list(argv[1:]))
    parsed = parse(argv)
    assert parsed is not None and parsed[0] == argv[0]
    assert parsed[1] == ctx.params


@pytest.mark.parametrize(
    "argv",
    [
        ["ask", "--help"],
        ["ask", "q", "--k", "0"],
        ["ask", "q", "--bogus"],
        ["ask"],
        ["ask", "a", "b"],
        ["ask", "q", "--temperature", "nan"],
        ["generate", "q"],
        ["experts", "list"],
        [],
    ],
)
def test_fast_parser_leaves_anything_unusual_to_typer(argv: list[str]) -> None:
    from orchestrator.cli_fast import parse

    assert parse(argv) is None
