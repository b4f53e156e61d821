"""Feedback → retrain → promote, with the real encoder on a small sample of the shared routing data.

The base router never sees the ``promise_nfr`` product source (non-functional requirements), so it
misroutes some of them; 20 of those questions come back as corrections (``expert = product``), half
carrying their text, half joined with the answer log. Retraining with ``--feedback`` must route
>= 90 % of them to product and lose <= 1 point of validation macro-F1; ``router promote`` accepts
the retrained router and refuses the old one (it fails the corrected-feedback gate) unless forced.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from expertmix.errors import RouterError
from orchestrator.cli_router import _routed_as_corrected, register
from orchestrator.feedback import Feedback, FeedbackLog
from orchestrator.routing import Router
from router_training.artifact import RouterStore


def _cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def _per_source(rows: list[dict], n: int, skip: set[str] = frozenset()) -> list[dict]:
    got: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for r in rows:
        key = (r["label"], r["source"])
        if r["source"] in skip or got[key] >= n:
            continue
        got[key] += 1
        out.append(r)
    return out


def _run(args: list[str]) -> str:
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    return res.output


def _macro_f1(store: RouterStore, version: str, val: Path) -> float:
    out = _run(["router", "eval", str(val), "--router", str(store.path(version)), "--json"])
    return float(json.loads(out[out.index("{"):])["macro_f1"])


@pytest.mark.slow
def test_feedback_retrain_promote(shared_data: Path, tmp_path: Path) -> None:
    routing = shared_data / "routing"
    train_all, val_all = _read(routing / "train.jsonl"), _read(routing / "val.jsonl")
    train = _write(tmp_path / "train.jsonl", _per_source(train_all, 25, skip={"promise_nfr"}))
    val = _write(tmp_path / "val.jsonl", _per_source(val_all, 20))
    ood = _write(tmp_path / "ood.jsonl", _read(routing / "ood_train.jsonl")[:40])
    ood_val = _write(tmp_path / "ood_val.jsonl", _read(routing / "ood_val.jsonl")[:40])
    store = RouterStore(tmp_path / "routers")
    common = ["--val", str(val), "--ood", str(ood), "--ood-val", str(ood_val), "--out", str(store.root),
              "--augment", "0", "--question-forms", "0"]

    out = _run(["router", "train", str(train), *common])
    assert store.current() == "v0001" and "first version" in out

    # 20 corrected questions: NFR requirements the base router gets wrong first, then others
    nfr = [r["text"] for r in train_all if r["source"] == "promise_nfr"][:200]
    router = Router.load(store.path("v0001"), warm=False)
    routed = router.route_batch(nfr, k=1)
    wrong = [t for t, r in zip(nfr, routed) if r.abstained or r.experts[0].name != "product"]
    questions = (wrong + [t for t in nfr if t not in wrong])[:20]
    assert len(wrong) >= 5, f"the base router misroutes only {len(wrong)} NFR questions; the scenario needs >= 5"

    answers = tmp_path / "answers.jsonl"
    log = FeedbackLog(tmp_path / "answers.feedback.jsonl")
    _write(answers, [{"id": f"chatcmpl-{i}", "query": q, "routing": {"experts": [{"name": "engineering"}],
                                                                     "abstained": False}}
                     for i, q in enumerate(questions) if i % 2])
    for i, q in enumerate(questions):  # odd ones carry no text: it comes from the answer log
        log.append(Feedback(f"chatcmpl-{i}", "bad", expert="product", text=None if i % 2 else q, ts=i))
    log.append(Feedback("chatcmpl-gone", "bad", expert="product", ts=99))  # no text anywhere: skipped
    log.append(Feedback("chatcmpl-1", "good", ts=100))  # a good rating: unused without --feedback-good

    out = _run(["router", "train", str(train), *common, "--feedback", str(log.path)])
    assert "corrections 20" in out and "skipped_no_text 1" in out, out
    assert "20 row(s) used as 40 training copies" in out, out
    assert "v0002 is NOT current" in out and "router promote v0002" in out and "[router] path" in out
    assert store.current() == "v0001"
    meta = json.loads((store.path("v0002") / "router.json").read_text("utf-8"))
    assert meta["training"]["feedback"]["used"] == 20

    rows = [{"text": q, "label": "product"} for q in questions]
    fixed_new, n = _routed_as_corrected(rows)(store.path("v0002"))
    fixed_old, _ = _routed_as_corrected(rows)(store.path("v0001"))
    f1_new, f1_old = _macro_f1(store, "v0002", val), _macro_f1(store, "v0001", val)
    print(f"\ncorrected questions routed as corrected: v0001 {fixed_old}/{n}, v0002 {fixed_new}/{n}; "
          f"val macro-F1 v0001 {f1_old:.4f}, v0002 {f1_new:.4f} (n_val={len(_read(val))})")
    assert fixed_new >= 0.9 * n
    assert f1_new >= f1_old - 0.01

    out = _run(["router", "promote", "v0002", "--store", str(store.root), "--val", str(val)])
    assert store.current() == "v0002", out
    assert re.search(r"held-out macro-F1 [\d.]+ vs [\d.]+ for v0001", out), out
    assert re.search(r"routed as corrected \d+/20", out), out

    # the old router fails the feedback gate: refused, current unchanged, both numbers shown
    res = CliRunner().invoke(_cli(), ["router", "promote", "v0001", "--store", str(store.root), "--val", str(val),
                                      "--feedback", str(log.path)])
    assert res.exit_code != 0 and "not promoted" in res.output and "corrected questions" in res.output, res.output
    assert "held-out macro-F1" in res.output and store.current() == "v0002"
    out = _run(["router", "promote", "v0001", "--store", str(store.root), "--val", str(val),
                "--feedback", str(log.path), "--force"])
    assert "(forced)" in out and store.current() == "v0001"


def test_promote_gate_needs_both(tmp_path: Path) -> None:
    """The store's gate on plain numbers: worse held-out score or too few fixes refuse; --max-drop, force."""
    store = RouterStore(tmp_path)
    for v in ("v0001", "v0002"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "router.json").write_text("{}", "utf-8")
    store.set_current("v0001")
    f1 = {"v0001": 0.90, "v0002": 0.895}
    fixes = {"v0001": (3, 20), "v0002": (19, 20)}
    with pytest.raises(RouterError, match=r"scores worse.*0\.8950 < 0\.9000.*19/20"):
        store.promote("v0002", score=lambda p: f1[p.name], feedback=lambda p: fixes[p.name])
    assert store.current() == "v0001"
    msg = store.promote("v0002", score=lambda p: f1[p.name], feedback=lambda p: fixes[p.name], max_drop=0.01)
    assert "v0002 is now current" in msg and "19/20 (95%; v0001: 3/20)" in msg
    with pytest.raises(RouterError, match=r"routes 3/20 corrected questions.*needs 80%"):
        store.promote("v0001", score=lambda p: 1.0, feedback=lambda p: fixes[p.name])
    assert store.current() == "v0002"
