"""Small I/O helpers shared by every package: atomic writes, labeled-record readers, hashing."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from expertmix.errors import DataError

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "expertmix_home",
    "file_sha256",
    "read_records",
]


def expertmix_home() -> Path:
    """Root of expertmix's caches: ``$EXPERTMIX_HOME`` or the user cache dir."""
    env = os.environ.get("EXPERTMIX_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("expertmix"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``target``.

    If the body raises, the temporary directory is removed and ``target`` is untouched,
    so an interrupted job never leaves a half-written artifact where a loader looks.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    # mkdtemp makes the directory 0700; give the artifact the usual permissions (umask applies)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(*paths: str | Path) -> str:
    """SHA-256 over the bytes of one or more files (in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_records(
    path: str | Path,
    fields: Sequence[str],
    *,
    optional: Sequence[str] = (),
) -> list[tuple[int, dict[str, Any]]]:
    """Read JSON Lines (``.jsonl``/``.json``) or CSV rows as ``(line_number, row)``.

    Each row must hold every name in ``fields`` as a string; names in ``optional`` are
    kept when present. Errors name the file, the line and the field (1-based physical lines:
    records end at ``\n`` or ``\r\n`` only; a UTF-8 BOM is skipped). Blank lines in JSON
    Lines files are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=path, line=bad_line) from exc
    raw = raw.removeprefix("\ufeff")  # UTF-8 BOM (Excel, Notepad)
    rows: list[tuple[int, dict[str, Any]]] = []
    # Records end at "\n" (or "\r\n") only. str.splitlines would also split on U+0085,
    # U+2028, U+2029, \v, \f, ... which are ordinary characters inside JSON strings and
    # CSV fields, and would shift every line number after them.
    lines = raw.split("\n")
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, lines, fields)
    else:
        for lineno, line in enumerate(lines, start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg})", path=path, line=lineno) from exc
            if not isinstance(rec, dict):
                raise DataError("each line must be a JSON object", path=path, line=lineno)
            rows.append((lineno, rec))
    out: list[tuple[int, dict[str, Any]]] = []
    for lineno, rec in rows:
        row: dict[str, Any] = {}
        for f in fields:
            if f not in rec or rec[f] is None:
                raise DataError(f"missing field '{f}'", path=path, line=lineno, field=f)
            if not isinstance(rec[f], str):
                raise DataError(
                    f"field '{f}' must be a string, got {type(rec[f]).__name__}",
                    path=path,
                    line=lineno,
                    field=f,
                )
            row[f] = rec[f]
        for f in optional:
            if f in rec:
                row[f] = rec[f]
        out.append((lineno, row))
    if not out:
        raise DataError("no rows", path=path)
    return out


def _csv_rows(path: Path, lines: list[str], fields: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """CSV records as ``(first physical line, {column: value})``; quoted fields may span lines."""
    if lines and not lines[-1]:
        lines = lines[:-1]
    reader = csv.reader(line + "\n" for line in lines)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"invalid CSV header ({exc})", path=path, line=1) from exc
    missing = [f for f in fields if f not in (header or [])]
    if header is None or missing:
        raise DataError(
            f"CSV header lacks column(s) {', '.join(missing)} (header: {header})",
            path=path,
            line=1,
            field=missing[0] if missing else None,
        )
    rows: list[tuple[int, dict[str, Any]]] = []
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"invalid CSV ({exc})", path=path, line=start) from exc
        if rec is None:
            return rows
        if not rec:
            continue  # blank line
        rows.append((start, {name: (rec[i] if i < len(rec) else None) for i, name in enumerate(header)}))
