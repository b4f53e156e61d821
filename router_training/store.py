"""Versioned routers: a store is a directory of versions plus a ``CURRENT`` file.

    <store>/v0001/router.json ...   <store>/CURRENT  ("v0001")

    >>> RouterStore("routers").promote("v0002")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expertmix.errors import RouterArtifactError, RouterError
from expertmix.io import atomic_write_text

__all__ = ["RouterStore", "resolve_router_path"]

ROUTER_JSON = "router.json"
_VERSION_RE = re.compile(r"^v\d{4,}$")


class RouterStore:
    """Versioned routers under one root; ``CURRENT`` names the promoted one."""

    def __init__(self, root: str | Path | None = None) -> None:
        from router_training.artifact import default_store_root

        self.root = Path(root) if root is not None else default_store_root()

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _VERSION_RE.match(p.name) and p.is_dir())

    def current(self) -> str | None:
        f = self.root / "CURRENT"
        if not f.is_file():
            return None
        name = f.read_text("utf-8").strip()
        return name or None

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version) or not (self.root / version / ROUTER_JSON).is_file():
            known = ", ".join(self.versions()) or "none"
            raise RouterError(f"no router version {version!r} in {self.root} (versions: {known})")
        return self.root / version

    def next_version(self) -> str:
        nums = [int(v[1:]) for v in self.versions()]
        return f"v{max(nums, default=0) + 1:04d}"

    def set_current(self, version: str) -> None:
        self.path(version)
        atomic_write_text(self.root / "CURRENT", version + "\n")

    def promote(
        self,
        version: str,
        *,
        force: bool = False,
        score: Callable[[Path], float] | None = None,
    ) -> str:
        """Make ``version`` current; refuse one that scores worse than the current one.

        Scores are macro-F1 on the same evaluation data: the metrics stored in both
        artifacts when their evaluation-data hashes agree, else ``score(path)`` when
        given. Returns a one-line summary.
        """
        cand_path = self.path(version)
        cur = self.current()
        if cur is None or cur == version or force:
            self.set_current(version)
            return f"{version} is now current" + (" (forced)" if force and cur not in (None, version) else "")
        cur_path = self.path(cur)
        if score is not None:
            s_cand, s_cur = score(cand_path), score(cur_path)
        else:
            m_cand, m_cur = _metrics(cand_path), _metrics(cur_path)
            if not m_cand.get("eval_data_hash") or m_cand.get("eval_data_hash") != m_cur.get("eval_data_hash"):
                raise RouterError(
                    f"{version} and current {cur} were evaluated on different data; "
                    "pass --data FILE to compare them on the same data, or --force"
                )
            s_cand, s_cur = float(m_cand["macro_f1"]), float(m_cur["macro_f1"])
        if s_cand + 1e-9 < s_cur:
            raise RouterError(
                f"{version} scores worse than current {cur} (macro-F1 {s_cand:.4f} < {s_cur:.4f}); "
                "use --force to promote it anyway"
            )
        self.set_current(version)
        return f"{version} is now current (macro-F1 {s_cand:.4f} vs {s_cur:.4f} for {cur})"


def _metrics(path: Path) -> dict[str, Any]:
    meta = json.loads((path / ROUTER_JSON).read_text("utf-8"))
    return dict(meta.get("metrics") or {})


def resolve_router_path(path: str | Path | None = None) -> Path:
    """An artifact directory from: None (store's current, else shipped), an artifact, or a store."""
    from router_training.artifact import default_router_path

    if path is None:
        store = RouterStore()
        cur = store.current()
        return store.path(cur) if cur else default_router_path()
    p = Path(path).expanduser()
    if (p / ROUTER_JSON).is_file():
        return p
    if (p / "CURRENT").is_file():
        store = RouterStore(p)
        cur = store.current()
        if cur:
            return store.path(cur)
    raise RouterArtifactError("not a router artifact (no router.json) nor a store with a CURRENT version", path=p)
