"""Feedback → router training rows: corrections, good ratings, text from the answer log, dedup, counts."""

from __future__ import annotations

import json

import pytest

from orchestrator.feedback import Feedback, FeedbackLog, answers_by_id, parse_feedback, training_rows


def test_parse_feedback_validates() -> None:
    fb = parse_feedback({"id": "chatcmpl-1", "rating": "good", "comment": " fine "}, experts=["finance"])
    assert fb.comment == "fine" and fb.ts > 0
    from expertmix.errors import InputError

    for bad in ({"id": "x y", "rating": "good"}, {"id": "a", "rating": "ok"}, {"id": "a", "rating": "bad", "extra": 1},
                {"id": "a", "rating": "bad", "expert": "hr"}, {"id": "a", "rating": "bad", "text": 3}):
        with pytest.raises(InputError):
            parse_feedback(bad, experts=["finance"])


def test_training_rows_from_feedback_and_answer_log(tmp_path) -> None:
    log = [json.dumps({"id": "a1", "query": "What is EBITDA?", "routing": {"experts": [{"name": "engineering"}],
                                                                           "abstained": False}}),
           json.dumps({"id": "a2", "routing": {"experts": [{"name": "product"}], "abstained": False}}),
           json.dumps({"id": "a3", "query": "Write a user story", "routing": {"experts": [{"name": "product"}],
                                                                              "abstained": False}}),
           "{torn"]
    answers = answers_by_id(log)
    assert answers["a1"] == {"query": "What is EBITDA?", "expert": "engineering"} and "a2" in answers
    path = tmp_path / "fb.jsonl"
    flog = FeedbackLog(path)
    flog.append(Feedback("a1", "bad", expert="engineering", ts=1))  # a wrong correction, corrected later
    flog.append(Feedback("a1", "bad", expert="finance", ts=2))  # text from the answer log
    flog.append(Feedback("a2", "bad", expert="finance", ts=3))  # no text anywhere: skipped, counted
    flog.append(Feedback("zz", "bad", expert="product", text="Plan the Q3 roadmap", ts=4))
    flog.append(Feedback("a3", "good", ts=5))
    with open(path, "a") as fh:
        fh.write('{"id": "torn"')
    fbs = flog.read()
    assert len(fbs) == 5
    rows, counts = training_rows(fbs, answers=answers)
    assert {(r["text"], r["label"], r["weight"]) for r in rows} == {("What is EBITDA?", "finance", 1.0),
                                                                     ("Plan the Q3 roadmap", "product", 1.0)}
    assert counts == {**counts, "corrections": 2, "good": 0, "skipped_no_text": 1, "duplicates": 1, "conflicts": 1}
    rows, counts = training_rows(fbs, answers=answers, good_weight=0.5)
    assert ("Write a user story", "product", 0.5) in {(r["text"], r["label"], r["weight"]) for r in rows}
    assert counts["good"] == 1
