"""Docs that cannot drift: every runnable block of README.md and docs/*.md runs, every relative link resolves.

A fenced block is runnable when its info string says so: ```` ```bash runnable ```` or
```` ```python runnable ````. Blocks run from the repository root as a reader who did
``source .venv/bin/activate`` would run them (the venv's bin first on PATH), with short settings:
``EXPERTMIX_MAX_NEW_TOKENS=4`` and ``EXPERTMIX_DOCS_TEST=1``. A block must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TIMEOUT_S = 300
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _blocks() -> list[tuple[str, str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            info = m.group(1).split()
            if len(info) >= 2 and "runnable" in info[1:]:
                line = text[: m.start()].count("\n") + 1
                out.append((f"{doc.relative_to(REPO)}:{line}", info[0], m.group(2)))
    return out


BLOCKS = _blocks()


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("EXPERTMIX_SERVER", "EXPERTMIX_API_KEY")}
    env.update(
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),
        VIRTUAL_ENV=str(Path(venv_bin).parent),
        EXPERTMIX_MAX_NEW_TOKENS="4",
        EXPERTMIX_DOCS_TEST="1",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    return env


def test_docs_exist_and_have_runnable_blocks() -> None:
    assert (REPO / "docs").is_dir()
    assert any(where.startswith("README.md") for where, _, _ in BLOCKS), "README.md has no runnable block"


@pytest.mark.parametrize(("where", "lang", "code"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_runnable_block(where: str, lang: str, code: str) -> None:
    if lang in ("bash", "sh", "shell", "console"):
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    elif lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        pytest.fail(f"{where}: a runnable block must be bash or python, not {lang!r}")
    try:
        res = subprocess.run(
            cmd, cwd=REPO, env=_env(), check=False, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: took more than {TIMEOUT_S} s")
    assert res.returncode == 0, (
        f"{where} failed (exit {res.returncode}):\n{code}\n--- stderr ---\n{res.stderr[-3000:]}"
    )


def test_relative_links_resolve() -> None:
    dead = []
    for doc in DOCS:
        text = _FENCE.sub("", doc.read_text(encoding="utf-8"))  # links inside code blocks are code
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, in-page anchors
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                dead.append(f"{doc.relative_to(REPO)}: {target}")
    assert not dead, "dead relative links:\n" + "\n".join(dead)


def test_no_machine_paths_in_docs() -> None:
    bad = []
    for doc in [*DOCS, *(REPO / "examples").glob("*")]:
        if not doc.is_file():
            continue
        text = doc.read_text(encoding="utf-8", errors="replace")
        for needle in {str(REPO), str(REPO.parent) + "/", "/work/", "/root/", "/home/"}:
            if needle in text:
                bad.append(f"{doc.relative_to(REPO)}: {needle}")
    assert not bad, "machine paths in docs (write paths relative to the repository):\n" + "\n".join(bad)


def test_every_config_key_is_documented() -> None:
    from dataclasses import fields

    from experts.registry import BaseSpec, ExpertSpec
    from orchestrator.config import OrchestratorSettings, RouterSettings, ServerSettings

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in (BaseSpec, RouterSettings, OrchestratorSettings, ServerSettings, ExpertSpec)
        for f in fields(cls)
        if f"| `{f.name}` |" not in text
    ]
    assert not missing, f"docs/configuration.md lacks a row for: {', '.join(missing)}"
