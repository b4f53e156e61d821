"""``expertmix experts add/remove`` (tomlkit edits, validated, comments kept) and ``expertmix feedback``
(to a running server, or to the feedback log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from srvutil import KEY

typer_testing = pytest.importorskip("typer.testing")


@pytest.fixture()
def config_file(tmp_path: Path, random_adapters: dict[str, Path]) -> Path:
    lines = ["# my departments (this comment must survive edits)", "[router]", "k = 2", ""]
    for name, path in random_adapters.items():
        lines += ["[[experts]]", f'name = "{name}"', f'description = "{name} questions"', f'adapter = "{path}"', ""]
    p = tmp_path / "expertmix.toml"
    p.write_text("\n".join(lines), encoding="utf-8")
    return p


def _run(*args: str) -> typer_testing.Result:
    from orchestrator.cli import app

    return typer_testing.CliRunner().invoke(app, list(args))


def test_experts_add_and_remove_edit_the_toml(config_file: Path, random_adapters, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from orchestrator.config import load_config

    monkeypatch.delenv("EXPERTMIX_SERVER", raising=False)
    shutil.copytree(random_adapters["finance"], tmp_path / "legal-adapter")
    r = _run("experts", "add", "legal", "--adapter", str(tmp_path / "legal-adapter"), "--description",
             "Contracts and compliance", "--config", str(config_file))
    assert r.exit_code == 0, r.output
    text = config_file.read_text()
    assert "# my departments (this comment must survive edits)" in text
    assert 'adapter = "legal-adapter"' in text  # relative to the config's directory
    cfg = load_config(config_file)
    assert [e.name for e in cfg.experts] == ["finance", "engineering", "product", "legal"]
    assert "router does not know" in r.output

    again = _run("experts", "add", "legal", "--adapter", str(tmp_path / "legal-adapter"), "--description", "x",
                 "--config", str(config_file))
    assert again.exit_code == 1 and "already configured" in again.output
    bad = _run("experts", "add", "Bad Name", "--adapter", str(tmp_path / "legal-adapter"), "--description", "x",
               "--config", str(config_file))
    assert bad.exit_code == 1 and "invalid expert name" in bad.output
    missing = _run("experts", "add", "hr", "--adapter", str(tmp_path / "nope"), "--description", "x",
                   "--config", str(config_file))
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert load_config(config_file).experts[-1].name == "legal"  # failed edits left the file alone

    r = _run("experts", "remove", "legal", "--config", str(config_file))
    assert r.exit_code == 0, r.output
    assert [e.name for e in load_config(config_file).experts] == ["finance", "engineering", "product"]
    assert "# my departments" in config_file.read_text()
    assert _run("experts", "remove", "legal", "--config", str(config_file)).exit_code == 1


def test_feedback_command_without_and_with_a_server(config_file: Path, server, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    monkeypatch.delenv("EXPERTMIX_SERVER", raising=False)
    r = _run("feedback", "chatcmpl-abc123", "--bad", "--expert", "finance", "--text", "What is EBITDA?",
             "--config", str(config_file))
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "feedback.jsonl").read_text().splitlines()[-1])
    assert rec == {**rec, "id": "chatcmpl-abc123", "rating": "bad", "expert": "finance", "text": "What is EBITDA?"}
    assert _run("feedback", "chatcmpl-abc123", "--config", str(config_file)).exit_code == 1  # neither good nor bad
    wrong = _run("feedback", "chatcmpl-abc123", "--bad", "--expert", "hr", "--config", str(config_file))
    assert wrong.exit_code == 1 and "hr" in wrong.output

    monkeypatch.setenv("EXPERTMIX_API_KEY", KEY)
    r = _run("feedback", "chatcmpl-def456", "--good", "--server", server.url, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["recorded_at"] == server.url
    assert json.loads((tmp_path / "feedback.jsonl").read_text().splitlines()[-1])["id"] == "chatcmpl-def456"
