"""The public API is explicit: every name in ``__all__`` exists (httpx's habit)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module", ["orchestrator", "experts", "router_training", "expertmix.errors", "expertmix.io"])
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__, module
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


def test_one_error_root() -> None:
    from expertmix import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ExpertmixError)
