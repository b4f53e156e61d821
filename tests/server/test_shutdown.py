"""SIGTERM on a real ``expertmix serve`` process: 503 JSON for new requests, in-flight work finished
or cancelled within the grace period, every request answered (200 or a typed JSON error), exit."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("serve did not come up")


def _answer(url: str, body: dict) -> tuple[int, dict]:
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    except httpx.HTTPError as exc:  # a refused connection after the listener closed is an answer too
        return -1, {"error": {"message": str(exc), "code": "connect"}}
    return r.status_code, r.json()


@pytest.mark.slow
def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EXPERTMIX_SHUTDOWN_GRACE_S": str(GRACE_S), "EXPERTMIX_HOME": os.environ["EXPERTMIX_HOME"],
           "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_up(url, proc)
        short = {"model": "finance", "messages": [{"role": "user", "content": "What is EBITDA?"}], "max_tokens": 4}
        medium = {**short, "max_tokens": 24}
        long = {"model": "engineering", "max_tokens": 1000,
                "messages": [{"role": "user", "content": "Write a long, detailed guide to Python packaging."}]}

        def in_flight_at_least(n: int) -> None:
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health", timeout=5).json()["in_flight"] < n and time.monotonic() < deadline:
                time.sleep(0.02)

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_answer, url, medium)]  # decoding first: it finishes within the grace
            in_flight_at_least(1)
            time.sleep(1.0)
            futures.append(pool.submit(_answer, url, long))  # queued behind it: cancelled when the grace ends
            in_flight_at_least(2)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            probe = httpx.post(url + "/v1/chat/completions", json=short, timeout=10)
            assert probe.status_code == 503, probe.text
            assert probe.json()["error"]["code"] == "shutting_down"
            assert httpx.get(url + "/health", timeout=5).status_code == 503
            results = [f.result(timeout=60) for f in futures]
        proc.wait(timeout=GRACE_S + 20)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert elapsed < GRACE_S + 15, elapsed
    for status, body in results:  # every request answered: an answer, or a typed JSON error
        assert (status == 200 and body["choices"][0]["message"]["content"] is not None) or \
            (status == 503 and body["error"]["code"] in ("cancelled", "shutting_down")), (status, body)
    codes = [s for s, _ in results]
    assert codes == [200, 503], codes  # finished within the grace; 1,000 tokens do not fit: cancelled, typed
