"""The cross-department evaluation set (bench/composite.py): deterministic, parts cover the request, spans right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from composite import CONNECTORS, DOMAINS, build_composite, eligible_questions


def _write_val(root: Path) -> Path:
    rows = {
        "finance": [
            ("What is a bond yield?", "The return on a bond."),
            ("How do I hedge EUR revenue", "Use forwards."),
            ("What does EBITDA measure?", "Operating profit before D&A."),
            ("Explain a 401k match.", "Employer contributions."),
        ],
        "engineering": [
            ('get value of environment variable "HOME"', "os.environ['HOME']"),
            ("sort list `l` in reverse order", "l.sort(reverse=True)"),
            ("Convert string `s` to lowercase", "s.lower()"),
        ],
        "product": [
            ("Write a user story for the NSF product.", "As a user, I want to search."),
            ("Write a security requirement for the 3 system.", "The system shall encrypt data."),
        ],
    }
    for d, pairs in rows.items():
        p = root / "experts" / d
        p.mkdir(parents=True)
        lines = [json.dumps({"instruction": q, "response": r, "source": "t"}) for q, r in pairs]
        lines.insert(
            1, json.dumps({"instruction": "multi\nline question here", "response": "x", "source": "t"})
        )
        (p / "val.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_val(tmp_path_factory.mktemp("shared"))


def test_deterministic_and_seeded(data: Path) -> None:
    a = build_composite(data, 24, 0)
    b = build_composite(data, 24, 0)
    c = build_composite(data, 24, 1)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert [r.request for r in a] != [r.request for r in c]
    assert len({r.id for r in a}) == len(a) == 24


def test_parts_spans_and_references(data: Path) -> None:
    rows = build_composite(data, 36, 3)
    assert {r.connector for r in rows} == set(CONNECTORS)  # every connector is used
    assert {len(r.parts) for r in rows} == {2, 3}
    for r in rows:
        domains = r.domains
        assert len(set(domains)) == len(domains), "parts come from different domains"
        assert set(domains) <= set(DOMAINS)
        prev_end = 0
        for p in r.parts:
            a, b = p.span
            assert r.request[a:b] == p.text, "the span locates the part's text"
            assert a >= prev_end, "parts are in order and do not overlap"
            prev_end = b
            # the part says what the source question asked (modulo case of the first letter and end punctuation)
            core = p.question.rstrip("?.!;: ").strip()
            assert core[1:] in p.text
        # the parts cover the request: what lies between them is only connector text
        gaps = [r.request[: r.parts[0].span[0]]]
        gaps += [r.request[x.span[1] : y.span[0]] for x, y in zip(r.parts, r.parts[1:])]
        gaps.append(r.request[r.parts[-1].span[1] :])
        assert sum(len(g) for g in gaps) + sum(len(p.text) for p in r.parts) == len(r.request)
        assert all(len(g) <= 40 for g in gaps), gaps
        assert r.reference == "\n\n".join(p.reference for p in r.parts)


def test_filters_multiline_questions(data: Path) -> None:
    qs = eligible_questions(data, "finance")
    assert [q.line for q in qs] == [1, 3, 4, 5]
    assert all("\n" not in q.question for q in qs)


def test_real_shared_data_if_present() -> None:
    root = REPO.parent / "shared" / "data"
    if not (root / "experts" / "finance" / "val.jsonl").exists():
        pytest.skip("shared data not present")
    rows = build_composite(root, 12, 0)
    assert len(rows) == 12 and sum(len(r.parts) == 3 for r in rows) == 3
    for r in rows:
        for p in r.parts:
            assert r.request[p.span[0] : p.span[1]] == p.text
