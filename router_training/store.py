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
        feedback: Callable[[Path], tuple[int, int]] | None = None,
        min_feedback: float = 0.8,
        max_drop: float = 0.0,
    ) -> str:
        """Make ``version`` current; refuse one that is worse than the current one.

        Held-out: macro-F1 on the same evaluation data, ``score(path)`` when given, else the
        metrics stored in both artifacts when their evaluation-data hashes agree; the candidate
        may lose at most ``max_drop``. Feedback: ``feedback(path)`` gives (routed as corrected,
        corrected questions); the candidate must reach ``min_feedback`` of them. ``force``
        promotes anyway. Returns a one-line summary with the numbers.
        """
        cand_path = self.path(version)
        cur = self.current()
        if cur is None or cur == version:
            self.set_current(version)
            return f"{version} is now current"
        cur_path = self.path(cur)
        parts: list[str] = []
        refused: list[str] = []
        s_cand: float | None = None
        s_cur: float | None = None
        if score is not None:
            s_cand, s_cur = score(cand_path), score(cur_path)
        else:
            m_cand, m_cur = _metrics(cand_path), _metrics(cur_path)
            h = m_cand.get("eval_data_hash")
            same = bool(h) and h == m_cur.get("eval_data_hash")
            if not same and not force:
                raise RouterError(
                    f"{version} and current {cur} were evaluated on different data; "
                    "pass --val FILE to compare them on the same data, or --force"
                )
            if same:
                s_cand, s_cur = float(m_cand["macro_f1"]), float(m_cur["macro_f1"])
        if s_cand is not None and s_cur is not None:
            parts.append(f"held-out macro-F1 {s_cand:.4f} vs {s_cur:.4f} for {cur}")
            if s_cand + max_drop + 1e-9 < s_cur:
                refused.append(f"it scores worse than current {cur} (macro-F1 {s_cand:.4f} < {s_cur:.4f})")
        if feedback is not None:
            (fixed, n), (cur_fixed, _) = feedback(cand_path), feedback(cur_path)
            if n:
                parts.append(
                    f"corrected feedback routed as corrected {fixed}/{n} "
                    f"({fixed / n:.0%}; {cur}: {cur_fixed}/{n})"
                )
                if fixed < min_feedback * n - 1e-9:
                    refused.append(
                        f"it routes {fixed}/{n} corrected questions as corrected (needs {min_feedback:.0%})"
                    )
        numbers = f" ({'; '.join(parts)})" if parts else ""
        if refused and not force:
            raise RouterError(
                f"{version} not promoted: {'; '.join(refused)}{numbers}; use --force to promote it anyway"
            )
        self.set_current(version)
        return f"{version} is now current" + (" (forced)" if force else "") + numbers


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
