"""JSON Lines / CSV readers: records end at \\n or \\r\\n only, BOM, line numbers, label conflicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmix.errors import DataError
from expertmix.io import read_records
from router_training.data import DataConfig, load_labeled

SEPARATORS = ("\u0085", "\u2028", "\u2029")  # json.dumps escapes C0 controls such as \x0b itself


def _jsonl(rows: list[dict], *, newline: str = "\n", bom: bool = False) -> bytes:
    body = newline.join(json.dumps(r, ensure_ascii=False) for r in rows) + newline
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8")


@pytest.mark.parametrize("sep", SEPARATORS)
def test_unicode_line_separators_inside_strings_are_text(tmp_path: Path, sep: str) -> None:
    rows = [{"text": f"first{sep}half", "label": "finance"}, {"text": "second", "label": "product"}]
    p = tmp_path / "d.jsonl"
    p.write_bytes(_jsonl(rows))
    got = read_records(p, ["text", "label"])
    assert [(ln, r["text"]) for ln, r in got] == [(1, f"first{sep}half"), (2, "second")]
    # a broken line after the separator keeps its true line number
    p.write_bytes(_jsonl(rows) + b"{broken\n")
    with pytest.raises(DataError) as ei:
        read_records(p, ["text", "label"])
    assert ei.value.line == 3


def test_bom_and_crlf_jsonl(tmp_path: Path) -> None:
    rows = [{"text": f"q{i}\u2028x", "label": "finance"} for i in range(3)]
    p = tmp_path / "d.jsonl"
    p.write_bytes(_jsonl(rows, newline="\r\n", bom=True))
    got = read_records(p, ["text", "label"])
    assert [ln for ln, _ in got] == [1, 2, 3] and got[0][1]["text"] == "q0\u2028x"
    p.write_bytes(_jsonl(rows, newline="\r\n", bom=True) + b"\r\n" + b'{"text": 1, "label": "x"}\r\n')
    with pytest.raises(DataError, match="line 5: field 'text' must be a string"):
        read_records(p, ["text", "label"])


def test_csv_bom_crlf_quoted_newlines_and_separators(tmp_path: Path) -> None:
    body = (
        "text,label\r\n"
        '"multi\r\nline",finance\r\n'
        "a\u0085b,product\r\n"
        "\r\n"
        "c\u2028d,engineering\r\n"
    )
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    got = read_records(p, ["text", "label"])
    assert [(ln, r["text"], r["label"]) for ln, r in got] == [
        (2, "multi\r\nline", "finance"),
        (4, "a\u0085b", "product"),
        (6, "c\u2028d", "engineering"),
    ]
    p.write_bytes(b"\xef\xbb\xbf" + (body + "e,\r\n").encode("utf-8"))
    got = read_records(p, ["text", "label"])
    assert got[-1] == (7, {"text": "e", "label": ""})
    p.write_bytes(("text,label\r\n" + "x\u2029y\r\n").encode("utf-8"))
    with pytest.raises(DataError, match="line 2: missing field 'label'"):
        read_records(p, ["text", "label"])


def _conflicting(tmp_path: Path) -> Path:
    rows = [{"text": f"question {lab} {i}", "label": lab} for lab in ("finance", "product") for i in range(6)]
    rows += [{"text": "Question finance 1", "label": "product"}, {"text": "question finance 1", "label": "finance"}]
    p = tmp_path / "c.jsonl"
    p.write_bytes(_jsonl(rows))
    return p


def test_conflicts_error_in_training_dropped_on_request(tmp_path: Path) -> None:
    p = _conflicting(tmp_path)
    with pytest.raises(DataError, match="line 13: text also appears on line 2.*--on-conflict drop"):
        load_labeled(p)
    d = load_labeled(p, DataConfig(on_conflict="drop"))
    assert d.conflicts == 1 and len(d.texts) == 11 and "question finance 1" not in d.texts
    assert any("1 text(s) with conflicting labels skipped" in i for i in d.issues)
    assert d.lines == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    with pytest.raises(DataError, match="on_conflict"):
        DataConfig(on_conflict="keep")


def test_source_field_is_optional(tmp_path: Path) -> None:
    rows = [{"text": f"t {i}", "label": "finance", "source": "a" if i % 2 else "b"} for i in range(4)]
    rows += [{"text": "no source", "label": "finance"}]
    p = tmp_path / "s.jsonl"
    p.write_bytes(_jsonl(rows))
    d = load_labeled(p, require_classes=False)
    assert d.sources == ["b", "a", "b", "a", ""]
