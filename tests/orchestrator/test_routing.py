"""Run-time routing with the shipped router (real MiniLM), and the router CLI."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from expertmix.errors import InputError, RouterArtifactError, RouterMismatch
from orchestrator.routing import Router, Routing, check_labels

REPO = Path(__file__).resolve().parents[2]


def _probe_module():
    spec = importlib.util.spec_from_file_location("probe_set", REPO / "tests" / "router_training" / "probe_set.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path_factory.getbasetemp() / "routing-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def router() -> Router:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Router.load(REPO / "router_training" / "default")


def test_python_question_goes_to_engineering(router: Router) -> None:
    r = router.route("How do I reverse a list in Python?")
    assert r.experts[0].name == "engineering" and not r.abstained


def test_weights_sum_to_one_and_follow_probabilities(router: Router) -> None:
    r = router.route("Should I refinance my mortgage to build a feature backlog for the app?", k=3)
    assert len(r.experts) == 3
    assert sum(e.weight for e in r.experts) == pytest.approx(1.0)
    assert [e.weight for e in r.experts] == sorted((e.weight for e in r.experts), reverse=True)
    by_prob = sorted(r.probabilities, key=r.probabilities.__getitem__, reverse=True)
    assert [e.name for e in r.experts] == by_prob
    assert sum(r.probabilities.values()) == pytest.approx(1.0)
    two = router.route("Should I refinance my mortgage to build a feature backlog for the app?", k=2)
    p0, p1 = (r.probabilities[e.name] for e in two.experts)
    assert two.experts[0].weight == pytest.approx(p0 / (p0 + p1))


def test_min_weight_drops_small_experts_keeps_top(router: Router) -> None:
    r = router.route("How do I reverse a list in Python?", k=3, min_weight=0.5)
    assert len(r.experts) == 1 and r.experts[0].weight == pytest.approx(1.0)
    with pytest.raises(InputError):
        router.route("   ")


def test_abstains_on_off_topic(router: Router) -> None:
    off = _probe_module().OFF_TOPIC
    results = router.route_batch(list(off))
    assert sum(r.abstained for r in results) >= len(off) - 1
    assert all(r.reason and "threshold" in r.reason for r in results if r.abstained)


def test_probe_set_mostly_correct(router: Router) -> None:
    probe = _probe_module().PROBE
    results = router.route_batch([q for q, _ in probe])
    correct = sum(r.experts[0].name == lab for r, (_, lab) in zip(results, probe, strict=True))
    assert correct >= 0.8 * len(probe), correct
    assert sum(r.abstained for r in results) <= 0.2 * len(probe)


def test_batch_equals_single_and_cache(router: Router) -> None:
    qs = ["What is a good P/E ratio?", "Write a user story for the login page", "git revert last commit"]
    batch = router.route_batch(qs)
    for q, b in zip(qs, batch, strict=True):
        s = router.route(q)
        assert [e.name for e in s.experts] == [e.name for e in b.experts]
        assert np.allclose(list(s.probabilities.values()), list(b.probabilities.values()), atol=1e-5)
    hits = router._cache.hits
    router.route(qs[0])
    assert router._cache.hits == hits + 1


def test_check_labels(router: Router) -> None:
    check_labels(router, ["finance", "product", "engineering"])
    with pytest.raises(RouterMismatch, match="legal") as ei:
        check_labels(router, ["finance", "engineering", "legal"])
    assert "product" in str(ei.value)


def test_routing_to_dict_schema(router: Router) -> None:
    d = router.route("What is EBITDA?").to_dict()
    assert set(d) == {"experts", "abstained", "probabilities", "confidence", "reason"}
    assert isinstance(Routing(experts=(), abstained=True, probabilities={}, confidence=0.0).to_dict(), dict)


def _app() -> typer.Typer:
    from orchestrator.cli import app  # `route` is a top-level command of the real CLI

    return app


def test_cli_route_json(router: Router) -> None:
    res = CliRunner().invoke(_app(), ["route", "How do I reverse a list in Python?", "--json", "--k", "2", "--min-weight", "0", "--local"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["query"] == "How do I reverse a list in Python?"
    assert [set(e) for e in out["experts"]] == [{"name", "weight"}] * 2
    assert out["experts"][0]["name"] == "engineering" and out["abstained"] is False
    assert set(out["probabilities"]) == {"engineering", "finance", "product"}


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(_app(), ["route", "hello", "--router", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and "Traceback" not in res.output


def test_cli_eval_json(tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    rows = [("How do I merge two dicts in Python?", "engineering"), ("What is a dividend yield?", "finance"),
            ("As a project manager, I want to see the release roadmap so that I can plan the next sprint.", "product"),
            ("what's the weather tomorrow", "oos")]
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    res = CliRunner().invoke(_app(), ["router", "eval", str(data), "--ood-label", "oos", "--json",
                                      "--router", str(REPO / "router_training" / "default")])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    for key in ("n", "accuracy", "macro_f1", "top2_accuracy", "ece", "ood_auroc", "ood_recall", "false_reject_rate"):
        assert key in m
    assert m["n"] == 3 and m["accuracy"] == 1.0


def test_missing_artifact_is_typed(tmp_path: Path) -> None:
    with pytest.raises(RouterArtifactError):
        Router.load(tmp_path)
