"""expertmix.toml: typed, validated; errors name the file and key; unknown keys warn."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmix.errors import ConfigError
from orchestrator.config import default_config_path, load_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "expertmix.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_shipped_default_lists_three_experts() -> None:
    cfg = load_config()
    assert [e.name for e in cfg.experts] == ["finance", "engineering", "product"]
    assert all(e.adapter is not None and e.adapter.is_absolute() for e in cfg.experts)
    assert cfg.path == str(default_config_path())
    assert cfg.server.host == "127.0.0.1"


def test_relative_adapter_paths_resolve_against_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, '[[experts]]\nname = "legal"\nadapter = "ad/legal"\n')
    cfg = load_config(p)
    assert cfg.experts[0].adapter == (tmp_path / "ad" / "legal").resolve()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[base\nmodel = 1", "malformed TOML"),
        ('[[experts]]\nname = "Finance"\nadapter = "x"', r"experts\[0\]\.name.*lowercase"),
        ('[[experts]]\nname = "a"\nadapter = "x"\n[[experts]]\nname = "a"\nadapter = "y"', "duplicate expert name"),
        ('[[experts]]\nname = "__base__"\nadapter = "x"', "reserved"),
        ('[[experts]]\nname = "a"', r"needs 'adapter'"),
        ('[[experts]]\nname = "a"\nbackend = "openai"', "needs 'base_url'"),
        ('[[experts]]\nname = "a"\nadapter = "x"\nbackend = "tgi"', "unknown backend"),
        ('[router]\nk = 0', r"router\.k"),
        ('[orchestrator]\nmax_new_tokens = "many"', r"orchestrator\.max_new_tokens.*must be int"),
        ('[orchestrator]\naggregator = "legal"', "aggregator"),
        ('[base]\ndtype = "int3"', "unknown dtype"),
        ('experts = "finance"', "array of tables"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_missing_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_bytes(b'[base]\nmodel = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)


def test_unknown_keys_warn_but_load(tmp_path: Path) -> None:
    p = _write(tmp_path, '[base]\nmodel = "smollm2-135m-instruct"\nflash = true\n[future]\nx = 1\n')
    with pytest.warns(UserWarning, match="flash"):
        cfg = load_config(p)
    assert cfg.base.model == "smollm2-135m-instruct"
