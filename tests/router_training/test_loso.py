"""Leave-one-source-out evaluation, from Python and from `expertmix router eval --loso`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from expertmix.errors import DataError
from orchestrator.cli_router import register
from router_training.data import load_labeled
from router_training.loso import held_out_sources


def _tiny(shared_data: Path, dst: Path, per_source: int = 6) -> Path:
    counts: dict[tuple[str, str], int] = {}
    out = []
    for line in (shared_data / "routing" / "train.jsonl").read_text("utf-8").split("\n"):
        if not line:
            continue
        rec = json.loads(line)
        key = (rec["label"], rec["source"])
        if counts.get(key, 0) < per_source:
            counts[key] = counts.get(key, 0) + 1
            out.append(line)
    dst.write_text("\n".join(out) + "\n", "utf-8")
    return dst


def test_held_out_sources_need_two_per_label(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "finance" if i < 10 else "product", "source": "a" if i < 5 else "b"}
            for i in range(15)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert held_out_sources(load_labeled(p)) == [("finance", "a"), ("finance", "b")]
    q = tmp_path / "nosource.jsonl"
    q.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    with pytest.raises(DataError, match="source field"):
        held_out_sources(load_labeled(q))


def test_cli_eval_loso(shared_data: Path, tmp_path: Path) -> None:
    data = _tiny(shared_data, tmp_path / "tiny.jsonl")
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    res = CliRunner().invoke(
        app, ["router", "eval", "--loso", str(data), "--quick", "--augment", "0", "--question-forms", "1", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["per_source"]) == {"fiqa", "tatqa", "h2o_evals", "conala", "askubuntu", "webapps",
                                      "dalpiaz_user_stories", "promise_nfr"}
    assert 0.0 <= out["macro_accuracy"] <= 1.0
    assert all(d["n"] == 6 for d in out["details"].values())
