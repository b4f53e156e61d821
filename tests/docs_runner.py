"""Run the command blocks of README.md and docs/*.md the way a reader pastes them (used by tests/test_docs.py).

Fences: every fenced block has an info string. ``bash`` / ``sh`` / ``shell`` / ``python`` blocks are
commands and run; a command block that cannot run here says why in its info string,
```` ```bash no-run: needs a GPU and vLLM ````. Anything else (output, diagrams, TOML, JSON) uses
its own language (``text``, ``toml``, ``json``) and is not run.

A document's command blocks run in order in ONE bash session (python blocks as ``python FILE``
inside it), so a server one block starts in the background serves the blocks after it and the
models load once per server, not once per block. The session runs in a sandbox that mirrors a
fresh clone beside the shared data: ``ROOT/main`` holds a copy of the repository's files (its
``.venv`` a link to this one), ``ROOT/shared/data`` links to the shared data, and
``EXPERTMIX_HOME`` is a fresh directory that links to the cached converted base model,
embeddings and built CPU kernels (not converted or built again). Nothing is written into the repository.

Short settings come from environment variables the commands honour, so the blocks run as written:
``EXPERTMIX_MAX_NEW_TOKENS=4`` (answers) and ``EXPERTMIX_TRAIN_SMOKE=1`` (``experts train``: one
step on two rows, four validation rows) and ``EXPERTMIX_ROUTER_SMOKE=1`` (``router train``: C fixed
at 0.1, the value the full search picks on the shared data, so no leave-one-source-out search). The one rewrite: every port (``127.0.0.1:PORT``, ``localhost:PORT``,
``--port PORT``; ``expertmix serve`` without ``--port`` means 8000) becomes a free port. Background jobs are
stopped when the session ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGS = frozenset({"bash", "sh", "shell"})
COMMAND_LANGS = SHELL_LANGS | {"python"}
# Never run: output, diagrams, data and config samples. Any other language (console, zsh, …) is refused.
TEXT_LANGS = frozenset({"text", "toml", "json", "jsonl", "yaml", "ini", "csv", "diff", "http", "markdown"})
NO_RUN = "no-run:"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
_MARK = "@@docs-block "
_SKIP_COPY = {".git", ".venv", ".expertmix-home", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # line of the opening fence
    lang: str
    reason: str | None  # why a command block does not run (``no-run: …``); None = it runs
    code: str
    extra: str = ""  # the info string after the language

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in COMMAND_LANGS and self.reason is None


def fences(path: Path, repo: Path) -> list[Block]:
    """Every fenced block of one Markdown file."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        info = m.group(1).strip()
        lang, _, rest = info.partition(" ")
        reason = rest.strip()[len(NO_RUN) :].strip() if rest.strip().startswith(NO_RUN) else None
        line = text[: m.start()].count("\n") + 1
        out.append(Block(str(path.relative_to(repo)), line, lang, reason, m.group(2), rest.strip()))
    return out


def fence_problems(block: Block) -> list[str]:
    """What is wrong with a fence's info string: no language, a marker without a reason, unknown words."""
    if not block.lang:
        return [f"{block.where}: fence without a language (commands: bash or python; output: text)"]
    if block.lang not in COMMAND_LANGS | TEXT_LANGS:
        others = ", ".join(sorted(TEXT_LANGS))
        return [f"{block.where}: language {block.lang!r}: commands are bash or python, anything else one of {others}"]
    if block.lang in COMMAND_LANGS and block.reason == "":
        return [f"{block.where}: 'no-run:' needs a reason, e.g. 'no-run: needs a GPU'"]
    if block.extra and (block.lang not in COMMAND_LANGS or block.reason is None):
        hint = "only command blocks take 'no-run: REASON'; every other command block runs"
        return [f"{block.where}: unexpected {block.extra!r} after the language ({hint})"]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rewrite(code: str, ports: dict[int, int]) -> str:
    """Every loopback port → a free one (``ports`` maps them): the only change made to a block before it runs."""

    def port(m: re.Match[str]) -> str:
        return str(ports.setdefault(int(m.group(2)), free_port()))

    code = re.sub(r"(\b127\.0\.0\.1:|\blocalhost:|--port )(\d{4,5})\b", lambda m: m.group(1) + port(m), code)
    default = ports.setdefault(8000, free_port())
    return re.sub(r"(expertmix serve)(?![^\n&|;#]*--port)", rf"\g<1> --port {default}", code)


def _repo_files(repo: Path) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo, check=True, capture_output=True, timeout=60,
        ).stdout.decode()
        return [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(repo):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_COPY and not d.endswith(".egg-info")]
            files += [str(Path(dirpath, f).relative_to(repo)) for f in filenames]
        return files


def sandbox(repo: Path, root: Path, *, home_cache: Path, shared_data: Path) -> tuple[Path, Path]:
    """``root/main`` (a copy of the repository + a link to its .venv), ``root/home``; returns both."""
    work, home = root / "main", root / "home"
    for rel in _repo_files(repo):
        src = repo / rel
        if src.is_file() and not src.is_symlink():
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (work / ".venv").symlink_to(repo / ".venv")
    home.mkdir()
    for name in ("models", "embeddings", "kernels"):
        (home_cache / name).mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(home_cache / name)
    if (home_cache / "cpu_tuning.json").is_file():
        shutil.copy2(home_cache / "cpu_tuning.json", home / "cpu_tuning.json")
    if shared_data.is_dir():
        (root / "shared").mkdir()
        (root / "shared" / "data").symlink_to(shared_data)
    return work, home


def keep_probe(home: Path, home_cache: Path) -> None:
    """Hand the sandbox's CPU probe (cpu_tuning.json) back to the shared cache, so the next page does not probe."""
    src = home / "cpu_tuning.json"
    if src.is_file():
        tmp = home_cache / f".cpu_tuning.{os.getpid()}.tmp"
        shutil.copy2(src, tmp)
        os.replace(tmp, home_cache / "cpu_tuning.json")


def script(blocks: list[Block], scratch: Path, ports: dict[int, int]) -> str:
    """One bash session: every block in order, a marker before each; background jobs stopped at exit."""
    lines = [
        "set -euo pipefail",
        "_stop() { local j; j=$(jobs -p); [ -z \"$j\" ] || { kill $j 2>/dev/null; wait $j 2>/dev/null; }; true; }",
        "trap '_rc=$?; set +e; _stop; exit $_rc' EXIT",
    ]
    for b in blocks:
        code = rewrite(b.code, ports)
        lines.append(f"printf '\\n{_MARK}{b.where} %s\\n' \"$(date +%s.%N)\" >&2")
        if b.lang == "python":
            f = scratch / f"block_{Path(b.doc).stem}_{b.line}.py"
            f.write_text(code, encoding="utf-8")
            lines.append(f"python {f}")
        else:
            lines.append(code)
    return "\n".join(lines) + "\n"


@dataclass
class Result:
    rc: int
    log: str
    seconds: float
    failed: str | None  # where the failing block is, from the last marker
    timings: dict[str, float]  # seconds per block


def run(blocks: list[Block], *, cwd: Path, env: dict[str, str], scratch: Path, timeout_s: float) -> Result:
    path = scratch / "session.sh"
    path.write_text(script(blocks, scratch, {}), encoding="utf-8")
    log_path = scratch / "session.log"
    t0, t0_wall = time.perf_counter(), time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            ["bash", str(path)], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -1
        finally:
            try:  # whatever the session left behind (a server it started and did not stop)
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    seconds = time.perf_counter() - t0
    text = log_path.read_text(encoding="utf-8", errors="replace")
    marks = [ln[len(_MARK) :].split() for ln in text.splitlines() if ln.startswith(_MARK)]
    ends = [float(m[1]) for m in marks[1:]] + [t0_wall + seconds]
    timings = {m[0]: round(end - float(m[1]), 1) for m, end in zip(marks, ends)}
    return Result(rc, text, seconds, marks[-1][0] if marks and rc != 0 else None, timings)


def python_env(venv_python: str = sys.executable) -> dict[str, str]:
    """The reader's shell after ``source .venv/bin/activate``, without this process's server/key settings."""
    venv_bin = str(Path(venv_python).parent)
    drop = ("EXPERTMIX_SERVER", "EXPERTMIX_API_KEY", "EXPERTMIX_HOME", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=venv_bin + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=str(Path(venv_bin).parent))
    return env
