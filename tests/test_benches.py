"""Every benchmark runs in its ``--smoke`` mode (seconds: one row, 4 tokens) and writes clean JSON.

Each bench runs in its own subprocess with a timeout. A bench without ``--smoke`` is a failure,
not a skip: the suite is how we know a bench still runs after the code under it changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = int(os.environ.get("EXPERTMIX_BENCH_SMOKE_TIMEOUT", "420"))


def test_there_are_benches() -> None:
    assert BENCHES, "bench/*.py not found"


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_smoke(bench: Path, tmp_path: Path) -> None:
    if "--smoke" not in bench.read_text(encoding="utf-8"):
        pytest.fail(
            f"bench/{bench.name} has no --smoke mode; add one (one row, 4 tokens, seconds) so the suite can "
            "run it: python bench/NAME.py --smoke --out FILE.json"
        )
    out = tmp_path / f"{bench.stem}.json"
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    try:
        res = subprocess.run(
            [sys.executable, str(bench), "--smoke", "--out", str(out)],
            cwd=REPO,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench/{bench.name} --smoke took more than {TIMEOUT_S} s; a smoke run must take seconds")
    assert res.returncode == 0, (
        f"bench/{bench.name} --smoke failed (exit {res.returncode}):\n{res.stderr[-3000:]}"
    )
    assert "|" in res.stdout, f"bench/{bench.name} --smoke printed no markdown table:\n{res.stdout[-2000:]}"
    assert out.is_file(), f"bench/{bench.name} --smoke --out {out.name} wrote no file"
    text = out.read_text(encoding="utf-8")
    json.loads(text)
    for machine_path in {str(REPO), str(REPO.parent), str(Path.home())} - {"/"}:
        assert machine_path not in text, (
            f"bench/{bench.name}: results JSON holds the machine path {machine_path}"
        )
