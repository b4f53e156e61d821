"""Register-changing augmentation, OOD scores, and abstain rules that survive a save/load."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from router_training.abstain import PREFERRED, choose
from router_training.artifact import AbstainRule, RouterModel, load_model, save_model
from router_training.augment import cross_forms, frame, question_forms, text_form
from router_training.ood import fit_mahalanobis, knn_similarity, mahalanobis_score


def test_text_forms_and_rewrites() -> None:
    story = "As a site admin, I want to export the user list so that I can send a newsletter."
    req = "The system shall respond to a search within 2 seconds."
    assert [text_form(t) for t in (story, req, "reverse a list in python", "What is a bond?")] == [
        "story", "requirement", "imperative", "question"
    ]
    forms = question_forms(story, copies=3, seed=0)
    assert len(forms) == 3 and all("export the user list" in f for f in forms)
    assert any("site admin" in f for f in forms)
    assert question_forms("What is a bond?", copies=2) == []
    r = question_forms(req, copies=5, seed=1)
    assert len(r) == 5 and all("respond to a search within 2 seconds" in f for f in r)
    assert question_forms("reverse a list in python", copies=1, seed=0)[0].endswith("reverse a list in python?") or \
        "reverse a list in python" in question_forms("reverse a list in python", copies=1, seed=0)[0]


def test_cross_forms_turn_stories_and_requirements_into_each_other() -> None:
    story = "As a moderator I want to delete a comment so that the board stays clean"
    to_req = cross_forms(story, copies=3, seed=0)
    assert len(to_req) == 3 and all(text_form(t) == "requirement" for t in to_req)
    assert all("moderator" in t and "delete a comment" in t and "so that" not in t for t in to_req)
    req = "The system shall allow the administrator to approve a review."
    assert cross_forms(req, copies=1) == ["As the administrator, I want to be able to approve a review"]
    generic = cross_forms("The product shall be available 99.5% of the time.", copies=2, seed=0)
    assert all(text_form(t) == "story" and "the product to be available 99.5% of the time" in t for t in generic)
    assert cross_forms("What is a bond?", copies=3) == [] and cross_forms("reverse a list", copies=3) == []


def test_source_weights_balance_labels_and_sources() -> None:
    from router_training.train import source_weights

    y = np.array([0] * 90 + [0] * 10 + [1] * 20 + [1] * 2)
    src = ["big"] * 90 + ["small"] * 10 + ["only"] * 20 + ["feedback"] * 2
    w = source_weights(y, src)
    assert np.isclose(w.mean(), 1.0)
    assert np.isclose(w[:90].sum(), w[90:100].sum())  # each source of label 0 weighs the same
    assert np.isclose(w[y == 0].sum(), w[y == 1].sum())  # and each label
    assert np.isclose(w[-1], w[100:120].mean())  # feedback rows weigh like an average row
    m = source_weights(y, src, multiplier=np.r_[np.ones(80), np.full(10, 3.0), np.ones(32)])
    assert np.isclose(m[85], 3 * m[0]) and np.isclose(m[:90].sum(), m[90:100].sum())  # a rewrite weighs 3x


def test_abstain_choice_keeps_the_distance_score_unless_clearly_beaten() -> None:
    other = "combined:knn+in_domain"
    names = ["max_prob", PREFERRED, other]
    # CLINC150 as trained by a user: 50 held-out oos rows, 94% vs 92% is noise
    assert choose({"max_prob": 0.3, PREFERRED: 0.92, other: 0.94}, names, 50) == PREFERRED
    # the shipped router: 900 held-out rows, 80% vs 61% is not
    assert choose({"max_prob": 0.3, PREFERRED: 0.61, other: 0.80}, names, 900) == other
    assert choose({}, names, 0) == PREFERRED
    assert choose({"max_prob": 0.5}, ["max_prob"], 10) == "max_prob"


def test_augmentation_is_per_text_deterministic() -> None:
    a = frame(["one text", "two text"], 1, seed=3)
    b = frame(["other", "two text", "one text"], 1, seed=3)
    assert a[0] == b[2] and a[1] == b[1]  # the same text gets the same frame in any batch
    assert question_forms("The app must work offline.", copies=2, seed=0)[0] == question_forms(
        "The app must work offline.", copies=1, seed=0
    )[0]


def test_distance_scores_rank_far_points_lower() -> None:
    rng = np.random.default_rng(0)
    centers = np.eye(8)[:2] * 3
    x = np.vstack([c + 0.1 * rng.standard_normal((50, 8)) for c in centers])
    unit = np.repeat([0, 1], 50)
    near, far = centers[:1] + 0.05, np.full((1, 8), 1.5)
    means, prec = fit_mahalanobis(x, unit, 2)
    assert mahalanobis_score(near, means, prec)[0] > mahalanobis_score(far, means, prec)[0]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = np.vstack([near, far])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s1, s5 = knn_similarity(q, xn, 1), knn_similarity(q, xn, 5)
    assert s1[0] > s1[1] and np.all(s1 >= s5)


def _model(dim: int = 8) -> RouterModel:
    rng = np.random.default_rng(1)
    return RouterModel(
        labels=("engineering", "finance"),
        coef=rng.standard_normal((2, dim)).astype(np.float32),
        intercept=np.zeros(2, np.float32),
        embedding={"name": "test-encoder", "dim": dim},
    )


@pytest.mark.parametrize("score", ["knn", "mahalanobis", "energy", "combined"])
def test_every_abstain_score_round_trips(tmp_path: Path, score: str) -> None:
    rng = np.random.default_rng(2)
    model = _model()
    bank = rng.standard_normal((20, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    means, prec = fit_mahalanobis(bank, np.repeat([0, 1], 10), 2)
    rule = AbstainRule(score=score, threshold=0.1, knn_k=3, bank=bank, maha_means=means, maha_precision=prec,
                       ood_coef=rng.standard_normal(8).astype(np.float32), ood_intercept=0.5)
    if score == "combined":
        rule = replace(rule, components=("knn", "mahalanobis", "in_domain"),
                       mean={"knn": 0.2, "mahalanobis": -10.0, "in_domain": 0.0},
                       scale={"knn": 0.1, "mahalanobis": 5.0, "in_domain": 2.0})
    model.abstain = rule
    x = bank[:5]
    before = model.confidence(x, model.predict_proba(x))
    again = load_model(save_model(model, tmp_path / score))
    after = again.confidence(x, again.predict_proba(x))
    assert np.allclose(before, after, atol=1e-3) and again.abstain.describe() == rule.describe()
    assert again.abstain.components == rule.components


def test_embedding_cache_is_per_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router_training.embed import Encoder

    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    enc = Encoder()
    first = [f"cache probe sentence number {i}" for i in range(20)]
    a = enc.encode(first)
    calls: list[int] = []
    real = enc._encode_batches
    monkeypatch.setattr(enc, "_encode_batches", lambda texts, progress: calls.append(len(texts)) or real(texts, progress=progress))
    b = enc.encode(first[5:] + ["a new sentence one", "a new sentence two"])
    assert calls == [2]  # only the two new texts were encoded
    assert np.allclose(b[:15], a[5:], atol=1e-6)
