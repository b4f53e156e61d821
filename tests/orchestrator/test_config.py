"""expertmix.toml: typed, validated once at load; errors name file, key and fix; unknown keys warn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmix.errors import ConfigError
from experts.registry import ExpertSpec, name_problem
from orchestrator.config import (
    ExpertmixConfig,
    OrchestratorSettings,
    ServerSettings,
    config_schema,
    default_config_path,
    load_config,
)

DOCS_SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "expertmix.toml"
    p.write_text(text, encoding="utf-8")
    return p


def _adapter(tmp_path: Path, rel: str = "ad/legal") -> str:
    (tmp_path / rel).mkdir(parents=True, exist_ok=True)
    return rel


def test_shipped_default_lists_three_experts() -> None:
    cfg = load_config()
    assert [e.name for e in cfg.experts] == ["finance", "engineering", "product"]
    assert all(e.adapter is not None and e.adapter.is_absolute() and e.adapter.is_dir() for e in cfg.experts)
    assert cfg.path == str(default_config_path())
    assert cfg.server.host == "127.0.0.1"


def test_relative_adapter_paths_resolve_against_the_file(tmp_path: Path) -> None:
    rel = _adapter(tmp_path)
    p = _write(tmp_path, f'[[experts]]\nname = "legal"\nadapter = "{rel}"\n')
    cfg = load_config(p)
    assert cfg.experts[0].adapter == (tmp_path / "ad" / "legal").resolve()


BAD = [
    # (toml, key, message fragment)
    ("[base\nmodel = 1", None, "malformed TOML"),
    ('[[experts]]\nname = "Finance"\nadapter = "x"', "experts[0].name", "lowercase"),
    (
        '[[experts]]\nname = "a"\nadapter = "x"\n[[experts]]\nname = "a"\nadapter = "y"',
        "experts[1].name",
        "duplicate",
    ),
    ('[[experts]]\nname = "__base__"\nadapter = "x"', "experts[0].name", "reserved"),
    ('[[experts]]\nname = "a"', "experts[0].adapter", "needs 'adapter'"),
    ('[[experts]]\nname = "a"\nbackend = "openai"', "experts[0].base_url", "needs 'base_url'"),
    ('[[experts]]\nname = "a"\nadapter = "x"\nbackend = "tgi"', "experts[0].backend", "unknown backend"),
    (
        '[[experts]]\nname = "a"\nbackend = "openai"\nbase_url = "http://h/v1"\ntimeout_s = nan',
        "experts[0].timeout_s",
        "finite",
    ),
    # issue 9 "values accepted that break things later", the config's share of them:
    ('[[experts]]\nname = "legal"\nadapter = "missing/legal"', "experts[0].adapter", "does not exist"),
    ("[orchestrator]\ntemperature = -3", "orchestrator.temperature", ">= 0"),
    ("[orchestrator]\ntemperature = nan", "orchestrator.temperature", "finite"),
    ("[orchestrator]\ntemperature = inf", "orchestrator.temperature", "finite"),
    ("[orchestrator]\nrepetition_penalty = nan", "orchestrator.repetition_penalty", "finite"),
    ("[orchestrator]\nrepetition_penalty = 0", "orchestrator.repetition_penalty", "> 0"),
    ("[orchestrator]\nexpert_timeout_s = nan", "orchestrator.expert_timeout_s", "finite"),
    ("[orchestrator]\nexpert_timeout_s = -1", "orchestrator.expert_timeout_s", "> 0"),
    ("[orchestrator]\nexpert_timeout_s = inf", "orchestrator.expert_timeout_s", "finite"),
    ('[orchestrator]\nstrategy = "bogus"', "orchestrator.strategy", "synthesis"),
    ('[orchestrator]\nplanner = "bogus"', "orchestrator.planner", "unknown planner"),
    ('[orchestrator]\ncompose = "bogus"', "orchestrator.compose", "sections"),
    ("[orchestrator]\nmax_parts = 0", "orchestrator.max_parts", ">= 1"),
    ('[orchestrator]\nmax_new_tokens = "many"', "orchestrator.max_new_tokens", "must be int"),
    ('[orchestrator]\naggregator = "legal"', "orchestrator.aggregator", "__base__"),
    (
        '[orchestrator]\nsynthesis_template = "{question} only"',
        "orchestrator.synthesis_template",
        "{contributions}",
    ),
    (
        '[orchestrator]\ncontribution_template = "{text} {nope}"',
        "orchestrator.contribution_template",
        "template",
    ),
    ("[server]\nmax_wait_ms = inf", "server.max_wait_ms", "finite"),
    ("[server]\nmax_wait_ms = nan", "server.max_wait_ms", "finite"),
    ("[server]\nmax_wait_ms = -1", "server.max_wait_ms", "finite"),
    ("[server]\nport = 70000", "server.port", "TCP port"),
    ("[server]\nmax_queue = 0", "server.max_queue", ">= 1"),
    ("[router]\nk = 0", "router.k", ">= 1"),
    ("[router]\nmin_weight = 1.0", "router.min_weight", "[0, 1)"),
    ("[router]\nmin_weight = nan", "router.min_weight", "finite"),
    ("[router]\nmin_weight = -0.1", "router.min_weight", "[0, 1)"),
    ('[router]\npath = "no/such/router"', "router.path", "does not exist"),
    ('[base]\ndtype = "int3"', "base.dtype", "unknown dtype"),
    ('[base]\nlean_decode = "yes"', "base.lean_decode", "true or false"),
    ('experts = "finance"', "experts", "array of tables"),
]


@pytest.mark.parametrize(("text", "key", "match"), BAD, ids=[b[1] or "toml" for b in BAD])
def test_bad_config_names_file_key_and_fix(tmp_path: Path, text: str, key: str | None, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(str(p)), msg
    assert match in msg, msg
    if key is not None:
        assert info.value.key == key and f"[{key}]" in msg, msg


def test_every_strategy_in_the_registry_is_accepted(tmp_path: Path) -> None:
    from orchestrator.config import known_strategies

    names = known_strategies()
    assert {"synthesis", "mixture", "adapter_merge", "top1"} <= set(names)
    for name in names:
        assert (
            load_config(_write(tmp_path, f'[orchestrator]\nstrategy = "{name}"\n')).orchestrator.strategy
            == name
        )


def test_dataclasses_validate_themselves_without_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        OrchestratorSettings(temperature=float("nan"))
    with pytest.raises(ConfigError, match="max_wait_ms"):
        ServerSettings(max_wait_ms=float("inf"))
    with pytest.raises(ConfigError, match="lowercase"):
        ExpertSpec(name="Legal", adapter=Path("x"))
    assert OrchestratorSettings(expert_timeout_s=3).expert_timeout_s == 3.0  # ints widen to float
    specs = tuple(ExpertSpec(name=n, adapter=tmp_path / _adapter(tmp_path, n)) for n in ("finance", "legal"))
    with pytest.raises(ConfigError, match="duplicate"):
        ExpertmixConfig(path=None, experts=specs + specs[:1])


def test_one_name_rule() -> None:
    assert name_problem("finance") is None
    assert name_problem("ml-ops_2") is None
    for bad in ("Finance", "2fa", "", "a" * 65, "__base__", "fin.ance", 3):
        assert name_problem(bad), bad
    assert "'my-legal'" in (name_problem("My Legal") or "")


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


def test_effective_config_has_every_default_and_hides_keys(tmp_path: Path) -> None:
    p = _write(tmp_path, '[server]\napi_key = "sekrit"\n[router]\nk = 3\n')
    d = load_config(p).to_dict()
    assert d["router"]["k"] == 3 and d["router"]["min_weight"] == 0.0
    assert d["orchestrator"]["strategy"] == OrchestratorSettings.strategy and d["server"]["port"] == 8000
    assert d["server"]["api_key"] == "***" and "sekrit" not in json.dumps(d)


def test_schema_in_docs_matches_the_dataclasses() -> None:
    schema = config_schema()
    assert schema["properties"]["orchestrator"]["properties"]["temperature"]["default"] == 0.0
    assert DOCS_SCHEMA.is_file(), "run: expertmix config schema > docs/config.schema.json"
    assert json.loads(DOCS_SCHEMA.read_text("utf-8")) == schema, (
        "docs/config.schema.json is stale; regenerate: expertmix config schema > docs/config.schema.json"
    )
