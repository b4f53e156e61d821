"""Docs that cannot drift: every command block of README.md and docs/*.md runs, every relative link resolves.

Every fenced block has a language. ``bash`` and ``python`` blocks are commands and run, a
document's blocks in order in one shell session (see tests/docs_runner.py: sandbox, short
settings, the port rewrite); a command block that cannot run here carries ``no-run: REASON`` in
its info string, and there are at most ``MAX_NO_RUN`` of those. Output samples, diagrams and
config samples use ``text`` / ``toml`` / ``json`` and never run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from docs_runner import Block, fence_problems, fences, keep_probe, python_env, run, sandbox

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TIMEOUT_S = 900  # per page: the README took 384 s at load average 8 on 2 cores
# Command blocks that do not run (each says why in its fence). Raise only with a reason a reviewer accepts.
MAX_NO_RUN = 21
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SHARED_DATA = Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))

BLOCKS = {doc.name: fences(doc, REPO) for doc in DOCS}
RUN_DOCS = [name for name, blocks in BLOCKS.items() if any(b.runs for b in blocks)]


def test_every_fence_is_a_command_that_runs_or_says_why_not() -> None:
    every = [b for blocks in BLOCKS.values() for b in blocks]
    problems = [p for b in every for p in fence_problems(b)]
    assert not problems, "\n".join(problems)
    exempt = [b for b in every if b.reason is not None]
    assert len(exempt) <= MAX_NO_RUN, "too many command blocks that do not run:\n" + "\n".join(
        f"{b.where}: {b.reason}" for b in exempt
    )
    assert any(b.runs for b in BLOCKS["README.md"]), "README.md has no command block that runs"


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_command_blocks_run(doc: str, tmp_path: Path) -> None:
    blocks: list[Block] = [b for b in BLOCKS[doc] if b.runs]
    if not SHARED_DATA.is_dir() and any("shared/data" in b.code for b in blocks):
        pytest.skip(f"{doc} uses the shared data, not found at {SHARED_DATA} (set EXPERTMIX_SHARED_DATA)")
    home_cache = Path(os.environ["EXPERTMIX_HOME"])  # conftest: the converted base model lives here
    work, home = sandbox(REPO, tmp_path / "clone", home_cache=home_cache, shared_data=SHARED_DATA)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = python_env()
    env.update(
        EXPERTMIX_HOME=str(home),
        EXPERTMIX_MAX_NEW_TOKENS="4",
        EXPERTMIX_TRAIN_SMOKE="1",
        EXPERTMIX_ROUTER_SMOKE="1",
        EXPERTMIX_DOCS_TEST="1",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        TMPDIR=str(scratch),
    )
    res = run(blocks, cwd=work, env=env, scratch=scratch, timeout_s=TIMEOUT_S)
    keep_probe(home, home_cache)
    print(f"\n{doc}: {len(blocks)} blocks in {res.seconds:.0f} s: {res.timings}")
    if res.rc != 0:
        failed = next((b for b in blocks if b.where == res.failed), None)
        what = f"took more than {TIMEOUT_S} s" if res.rc == -1 else f"exit {res.rc}"
        pytest.fail(
            f"{res.failed or doc} failed ({what}):\n{failed.code if failed else ''}\n"
            f"--- output (tail) ---\n{res.log[-4000:]}"
        )
    shutil.rmtree(tmp_path / "clone", ignore_errors=True)


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


def test_short_settings_reach_every_door(monkeypatch: pytest.MonkeyPatch) -> None:
    """EXPERTMIX_MAX_NEW_TOKENS (what the blocks run with) is the default of the one place settings are built."""
    from expertmix.errors import InputError
    from orchestrator.config import OrchestratorSettings
    from orchestrator.request import RequestOptions

    settings = OrchestratorSettings()
    monkeypatch.delenv("EXPERTMIX_MAX_NEW_TOKENS", raising=False)
    assert RequestOptions().generation(settings).max_new_tokens == settings.max_new_tokens
    monkeypatch.setenv("EXPERTMIX_MAX_NEW_TOKENS", "4")
    assert RequestOptions().generation(settings).max_new_tokens == 4
    assert RequestOptions(max_new_tokens=9).generation(settings).max_new_tokens == 9  # a request's own wins
    monkeypatch.setenv("EXPERTMIX_MAX_NEW_TOKENS", "lots")
    with pytest.raises(InputError, match="EXPERTMIX_MAX_NEW_TOKENS"):
        RequestOptions().generation(settings)


def test_router_smoke_fits_what_the_full_search_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """EXPERTMIX_ROUTER_SMOKE (what the blocks run with) fixes C at the value the full search chose for the
    shipped router, with one unit per label, so `router train` in the docs fits the same router."""
    import json

    from orchestrator.cli_router import _smoke, _train_config

    shipped = json.loads((REPO / "router_training" / "default" / "router.json").read_text(encoding="utf-8"))
    for value, on in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("EXPERTMIX_ROUTER_SMOKE", value)
        assert _smoke() is on
    cfg = _train_config("logreg", 0.03, 1, 2, "auto", quick=True)
    searched = shipped["classifier"]["cv_macro_f1"]
    assert cfg.c_grid == (shipped["classifier"]["C"],), "the shipped router's search chose another C"
    assert cfg.subclasses == shipped["classifier"]["units"] // len(shipped["labels"]) == 1
    assert list(searched) == ["subclasses=1"] and len(searched["subclasses=1"]) > 1  # it did search
