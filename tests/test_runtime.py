"""The OpenMP default applied before torch loads (expertmix/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from expertmix.runtime import SPINCOUNT, openmp_defaults


def test_short_spin_is_the_default_and_a_users_choice_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    openmp_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    openmp_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    openmp_defaults()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_importing_the_package_sets_it_before_torch_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, sys, orchestrator; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [SPINCOUNT, "False"]
