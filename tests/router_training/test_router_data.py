"""Loading and validating labeled routing data."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmix.errors import DataError
from router_training.data import DataConfig, load_labeled, load_texts


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, "utf-8")
    return p


def _rows(n: int, label: str, start: int = 0) -> str:
    return "".join(f'{{"text": "question {label} {i}", "label": "{label}"}}\n' for i in range(start, start + n))


def test_invalid_json_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", _rows(2, "finance") + "{not json\n")
    with pytest.raises(DataError) as ei:
        load_labeled(p)
    assert ei.value.line == 3 and "line 3" in str(ei.value)


def test_empty_text_names_line_and_field(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", _rows(1, "finance") + '{"text": "   ", "label": "finance"}\n')
    with pytest.raises(DataError) as ei:
        load_labeled(p)
    assert (ei.value.line, ei.value.field) == (2, "text")


def test_missing_and_non_string_fields(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", _rows(1, "finance") + '{"text": "hello"}\n')
    with pytest.raises(DataError, match="line 2: missing field 'label'"):
        load_labeled(p)
    p = _write(tmp_path, "e.jsonl", '{"text": 5, "label": "finance"}\n')
    with pytest.raises(DataError, match="line 1: field 'text' must be a string"):
        load_labeled(p)


def test_bad_label_name(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", _rows(6, "finance") + '{"text": "x y", "label": "fin ance"}\n')
    with pytest.raises(DataError, match="line 7: label 'fin ance' is not a valid expert name"):
        load_labeled(p)


def test_label_outside_allowed(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", '{"text": "a", "label": "fin"}\n')
    with pytest.raises(DataError, match="label 'fin' is not one of engineering, finance"):
        load_labeled(p, allowed_labels=["finance", "engineering"], require_classes=False)


def test_conflicting_duplicate_is_error_plain_duplicate_reported(tmp_path: Path) -> None:
    body = _rows(6, "finance") + _rows(6, "product")
    p = _write(tmp_path, "d.jsonl", body + '{"text": "Question finance 0", "label": "finance"}\n')
    d = load_labeled(p)
    assert len(d.texts) == 12 and any("1 duplicate" in i for i in d.issues)
    p = _write(tmp_path, "e.jsonl", body + '{"text": "question finance 1", "label": "product"}\n')
    with pytest.raises(DataError, match="line 13: text also appears on line 2"):
        load_labeled(p)


def test_one_label_refused_two_accepted(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 2 labels"):
        load_labeled(_write(tmp_path, "one.jsonl", _rows(10, "finance")))
    d = load_labeled(_write(tmp_path, "two.jsonl", _rows(10, "finance") + _rows(10, "product")))
    assert d.labels_set == ["finance", "product"]


def test_min_per_label(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.jsonl", _rows(10, "finance") + _rows(2, "product"))
    with pytest.raises(DataError, match=r"fewer than 5 rows: product \(2\)"):
        load_labeled(p)


def test_ood_label_rows_are_not_a_class(tmp_path: Path) -> None:
    body = _rows(6, "finance") + _rows(6, "product") + '{"text": "play music", "label": "oos"}\n'
    d = load_labeled(_write(tmp_path, "d.jsonl", body), DataConfig(ood_label="oos"))
    assert d.labels_set == ["finance", "product"] and d.ood_texts == ["play music"]


def test_csv_with_custom_fields(tmp_path: Path) -> None:
    rows = ["q,dept"] + [f"question {i},finance" for i in range(5)] + [f"ask {i},product" for i in range(5)]
    d = load_labeled(_write(tmp_path, "d.csv", "\n".join(rows) + "\n"), DataConfig(text_field="q", label_field="dept"))
    assert d.counts() == {"finance": 5, "product": 5} and d.lines[0] == 2
    p = _write(tmp_path, "bad.csv", "question,label\na,finance\n")
    with pytest.raises(DataError, match="CSV header lacks column"):
        load_labeled(p, DataConfig(text_field="q"))


def test_load_texts_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 2"):
        load_texts(_write(tmp_path, "o.jsonl", '{"text": "a"}\n{"text": ""}\n'))
