"""Append a trained expert to an ``expertmix.toml`` as an ``[[experts]]`` table, atomically.

The file is edited as text so that comments and the layout of the rest survive. A name
that is already listed is refused unless ``force``; then its old table is replaced.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from expertmix.errors import ConfigError
from expertmix.io import atomic_write_text

__all__ = ["check_registration", "register_expert"]


def _load(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 ({exc.reason})", path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", path=path) from exc


def _listed(doc: dict[str, Any]) -> list[str]:
    experts = doc.get("experts", [])
    if not isinstance(experts, list):
        return []
    return [str(t.get("name")) for t in experts if isinstance(t, dict)]


def check_registration(config: str | Path, name: str, *, force: bool) -> None:
    """Raise :class:`ConfigError` if ``config`` already lists ``name`` (and ``force`` is off)."""
    path = Path(config)
    if not path.exists():
        return
    if name in _listed(_load(path)) and not force:
        raise ConfigError(
            f"an expert named {name!r} is already listed; choose another --name or pass --force to replace it",
            path=path,
            key="experts",
        )


def _split_blocks(text: str) -> list[list[str]]:
    """Split TOML text into blocks, each starting at a table header line (the first may have none)."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("[") and not line.lstrip().startswith("[ "):
            blocks.append([line])
        else:
            blocks[-1].append(line)
    return blocks


def _block_name(block: list[str]) -> str | None:
    if not block or block[0].strip() != "[[experts]]":
        return None
    try:
        doc = tomllib.loads("".join(block))
    except tomllib.TOMLDecodeError:
        return None
    tables = doc.get("experts") or [{}]
    name = tables[0].get("name")
    return str(name) if name is not None else None


def register_expert(
    config: str | Path, *, name: str, description: str, adapter: str | Path, force: bool = False
) -> Path:
    """Add (or with ``force`` replace) ``[[experts]] name=…`` in ``config``; create the file if needed.

    The adapter path is written relative to the config file's folder when it lies below it.
    """
    path = Path(config)
    check_registration(path, name, force=force)
    adapter = Path(adapter).resolve()
    try:
        rel = os.path.relpath(adapter, path.resolve().parent)
        adapter_s = adapter.as_posix() if rel.startswith("..") else Path(rel).as_posix()
    except ValueError:  # another drive on Windows
        adapter_s = adapter.as_posix()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    blocks = [b for b in _split_blocks(text) if _block_name(b) != name]
    kept = "".join("".join(b) for b in blocks)
    if kept and not kept.endswith("\n"):
        kept += "\n"
    table = (
        "[[experts]]\n"
        f"name = {json.dumps(name)}\n"
        f"description = {json.dumps(description, ensure_ascii=False)}\n"
        f"adapter = {json.dumps(adapter_s, ensure_ascii=False)}\n"
        'backend = "local"\n'
    )
    new = kept + ("\n" if kept.strip() else "") + table
    try:
        tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"refusing to write invalid TOML after registration: {exc}", path=path) from exc
    atomic_write_text(path, new)
    return path
