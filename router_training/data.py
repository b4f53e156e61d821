"""Load and validate labeled routing data (JSON Lines or CSV); errors carry file and line.

    >>> data = load_labeled("train.jsonl", ood_label="oos")      # doctest: +SKIP
    >>> data.labels_set, len(data.texts), len(data.ood_texts)    # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from expertmix.errors import DataError
from expertmix.io import file_sha256, read_records
from router_training.schema import label_problem

__all__ = ["DataConfig", "LabeledData", "check_label_name", "data_hash", "load_labeled", "load_texts"]



@dataclass
class DataConfig:
    """Field names and validation limits for routing data."""

    text_field: str = "text"
    label_field: str = "label"
    ood_label: str | None = None
    """Rows with this label are out-of-domain examples, not a class (e.g. ``oos``)."""
    min_per_label: int = 5
    """Every label needs at least this many rows."""
    max_chars: int = 10_000
    """Longer texts are refused (they are almost always a parsing accident)."""
    source_field: str | None = "source"
    """Optional field naming where a row came from (leave-one-source-out evaluation)."""
    on_conflict: str = "error"
    """One text with two labels: ``error`` (training default) or ``drop`` (every row of that
    text is dropped, counted in ``LabeledData.conflicts`` and reported; evaluation default)."""

    def __post_init__(self) -> None:
        if self.on_conflict not in ("error", "drop"):
            raise DataError(f"on_conflict must be 'error' or 'drop', got {self.on_conflict!r}")


@dataclass
class LabeledData:
    """In-domain texts with labels, plus the out-of-domain texts found in the same file."""

    texts: list[str]
    labels: list[str]
    lines: list[int]
    ood_texts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    """Non-fatal findings (duplicates dropped), for the report."""
    sources: list[str] = field(default_factory=list)
    """Per row, the value of the source field ("" when absent); parallel to ``texts``."""
    conflicts: int = 0
    """Texts dropped because they appeared with two labels (``on_conflict="drop"``)."""

    @property
    def labels_set(self) -> list[str]:
        return sorted(set(self.labels))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


def check_label_name(label: str) -> str | None:
    """Why ``label`` cannot name an expert, or None when it can (the expert-name rule)."""
    return label_problem(label)


def _clean(text: str) -> str:
    return text.strip().lstrip("\ufeff").strip()


def load_labeled(
    path: str | Path,
    config: DataConfig | None = None,
    *,
    allowed_labels: Sequence[str] | None = None,
    require_classes: bool = True,
) -> LabeledData:
    """Read and validate one labeled file.

    Empty texts, bad label names and labels outside ``allowed_labels`` are errors naming
    the line. One text with two labels is an error too, unless ``config.on_conflict`` is
    ``drop``: then every row of that text is left out and counted. Exact duplicates are
    dropped and reported in ``issues``. With ``require_classes`` the file must hold at
    least two labels with ``min_per_label`` rows each (training data); evaluation data
    may hold fewer.
    """
    cfg = config or DataConfig()
    optional = [cfg.source_field] if cfg.source_field else []
    rows = read_records(path, [cfg.text_field, cfg.label_field], optional=optional)
    allowed = set(allowed_labels) if allowed_labels is not None else None
    kept: dict[str, tuple[str, str, int, str]] = {}  # key -> (text, label, line, source)
    conflicted: dict[str, tuple[str, int]] = {}
    seen_ood: dict[str, str] = {}
    dups = 0
    for lineno, row in rows:
        text = _clean(row[cfg.text_field])
        label = row[cfg.label_field].strip()
        _check_text(text, cfg, path, lineno)
        key = text.lower()
        if cfg.ood_label is not None and label == cfg.ood_label:
            if key in seen_ood:
                dups += 1
            else:
                seen_ood[key] = text
            continue
        why = check_label_name(label)
        if why:
            raise DataError(why, path=path, line=lineno, field=cfg.label_field)
        if allowed is not None and label not in allowed:
            raise DataError(
                f"label {label!r} is not one of {', '.join(sorted(allowed))}",
                path=path,
                line=lineno,
                field=cfg.label_field,
            )
        if key in conflicted:
            continue
        if key in kept:
            _, first_label, first_line, _ = kept[key]
            if first_label == label:
                dups += 1
                continue
            if cfg.on_conflict == "error":
                raise DataError(
                    f"text also appears on line {first_line} with label {first_label!r} "
                    f"(here {label!r}); keep one, or pass --on-conflict drop to leave such texts out",
                    path=path,
                    line=lineno,
                    field=cfg.text_field,
                )
            conflicted[key] = (first_label, first_line)
            del kept[key]
            continue
        source = row.get(cfg.source_field, "") if cfg.source_field else ""
        kept[key] = (text, label, lineno, str(source) if source is not None else "")
    data = LabeledData(texts=[], labels=[], lines=[], paths=[str(path)])
    for text, label, lineno, source in kept.values():
        data.texts.append(text)
        data.labels.append(label)
        data.lines.append(lineno)
        data.sources.append(source)
    data.ood_texts = [t for k, t in seen_ood.items() if k not in conflicted]
    if dups:
        data.issues.append(f"{path}: {dups} duplicate text(s) dropped")
    if conflicted:
        data.conflicts = len(conflicted)
        first = ", ".join(f"line {ln}" for _, ln in list(conflicted.values())[:5])
        data.issues.append(
            f"{path}: {len(conflicted)} text(s) with conflicting labels skipped (first seen at {first})"
        )
    if require_classes:
        _check_classes(data, cfg, path)
    elif not data.texts and not data.ood_texts:
        raise DataError("no rows", path=path)
    return data


def _check_text(text: str, cfg: DataConfig, path: str | Path, lineno: int) -> None:
    if not text:
        raise DataError(f"empty text in field '{cfg.text_field}'", path=path, line=lineno, field=cfg.text_field)
    if len(text) > cfg.max_chars:
        raise DataError(
            f"text is {len(text)} characters (limit {cfg.max_chars})",
            path=path,
            line=lineno,
            field=cfg.text_field,
        )


def _check_classes(data: LabeledData, cfg: DataConfig, path: str | Path) -> None:
    counts = data.counts()
    if len(counts) < 2:
        found = ", ".join(counts) or "none"
        raise DataError(f"training needs at least 2 labels, found {len(counts)} ({found})", path=path)
    small = {k: v for k, v in counts.items() if v < cfg.min_per_label}
    if small:
        desc = ", ".join(f"{k} ({v})" for k, v in small.items())
        raise DataError(
            f"label(s) with fewer than {cfg.min_per_label} rows: {desc}; add examples or lower min_per_label",
            path=path,
            field=cfg.label_field,
        )


def load_texts(path: str | Path, *, text_field: str = "text") -> list[str]:
    """Unlabeled texts (out-of-domain examples); empty texts are errors, duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for lineno, row in read_records(path, [text_field]):
        text = _clean(row[text_field])
        if not text:
            raise DataError(f"empty text in field '{text_field}'", path=path, line=lineno, field=text_field)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


def data_hash(paths: Iterable[str | Path | None]) -> str:
    """sha256 over the bytes of the given files (None entries skipped), prefixed ``sha256:``."""
    real = [p for p in paths if p is not None]
    return "sha256:" + file_sha256(*real) if real else ""
