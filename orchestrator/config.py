"""``expertmix.toml`` → typed config: base, experts, router, orchestration defaults, server.

Unknown keys warn (a newer config still loads); invalid values raise :class:`ConfigError`
naming the file and the key.
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from experts.registry import BASE_EXPERT, BaseSpec, ExpertRegistry, ExpertSpec, parse_base, parse_experts
from expertmix.errors import ConfigError

__all__ = [
    "DEFAULT_SYNTHESIS_TEMPLATE",
    "ExpertmixConfig",
    "OrchestratorSettings",
    "RouterSettings",
    "ServerSettings",
    "default_config_path",
    "load_config",
]

DEFAULT_SYNTHESIS_TEMPLATE = """You are combining answers from domain experts into one answer.
Question: {question}

{contributions}

Write one clear, complete answer to the question. Give more weight to experts with a higher weight, keep what is correct and useful from each, and do not mention the experts."""

DEFAULT_CONTRIBUTION_TEMPLATE = "Answer from the {expert} expert (weight {weight_pct}):\n{text}"


@dataclass(frozen=True)
class RouterSettings:
    path: str | None = None  # None: the shipped default router
    k: int = 2
    min_weight: float = 0.0


@dataclass(frozen=True)
class OrchestratorSettings:
    strategy: str = "synthesis"
    max_new_tokens: int = 160
    temperature: float = 0.0
    repetition_penalty: float = 1.1
    expert_timeout_s: float = 300.0
    aggregator: str = BASE_EXPERT
    synthesis_template: str = DEFAULT_SYNTHESIS_TEMPLATE
    contribution_template: str = DEFAULT_CONTRIBUTION_TEMPLATE
    log_file: str | None = None
    log_query_text: bool = False  # False: log a SHA-256 of the query, not its text
    merge_cache_size: int = 8


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_request_bytes: int = 1_000_000
    max_tokens_limit: int = 1024


@dataclass(frozen=True)
class ExpertmixConfig:
    """The whole configuration, validated."""

    path: str | None
    base: BaseSpec = field(default_factory=BaseSpec)
    experts: tuple[ExpertSpec, ...] = ()
    router: RouterSettings = field(default_factory=RouterSettings)
    orchestrator: OrchestratorSettings = field(default_factory=OrchestratorSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    @property
    def registry(self) -> ExpertRegistry:
        return ExpertRegistry.from_specs(self.base, self.experts)


def default_config_path() -> Path:
    """The shipped ``expertmix.toml`` (three LoRA experts + the default router)."""
    import experts

    return Path(experts.__file__).resolve().parent / "default" / "expertmix.toml"


_TOP = ("base", "experts", "router", "orchestrator", "server")


def _section(cls: type, table: Any, *, path: str, name: str) -> Any:
    if table is None:
        return cls()
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table", path=path, key=name)
    known = {f.name: f for f in fields(cls)}
    extra = sorted(set(table) - set(known))
    if extra:
        warnings.warn(f"{path} [{name}]: unknown key(s) {', '.join(extra)} ignored", UserWarning, stacklevel=3)
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, value in table.items():
        if key not in known:
            continue
        want = getattr(defaults, key)
        ok = (
            isinstance(value, bool) if isinstance(want, bool)
            else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(want, float)
            else isinstance(value, int) and not isinstance(value, bool) if isinstance(want, int)
            else isinstance(value, str)
        )
        if not ok:
            tname = type(want).__name__ if want is not None else "str"
            raise ConfigError(f"must be {tname}, got {type(value).__name__} {value!r}", path=path, key=f"{name}.{key}")
        kwargs[key] = float(value) if isinstance(want, float) else value
    return cls(**kwargs)


def _check(cfg: ExpertmixConfig, path: str) -> None:
    r, o, s = cfg.router, cfg.orchestrator, cfg.server
    if r.k < 1:
        raise ConfigError("must be >= 1", path=path, key="router.k")
    if not 0 <= r.min_weight < 1:
        raise ConfigError("must be in [0, 1)", path=path, key="router.min_weight")
    if o.max_new_tokens < 1:
        raise ConfigError("must be >= 1", path=path, key="orchestrator.max_new_tokens")
    if o.repetition_penalty <= 0:
        raise ConfigError("must be > 0 (1.0 = off)", path=path, key="orchestrator.repetition_penalty")
    if o.expert_timeout_s <= 0:
        raise ConfigError("must be > 0", path=path, key="orchestrator.expert_timeout_s")
    names = {e.name for e in cfg.experts} | {BASE_EXPERT}
    if o.aggregator not in names:
        raise ConfigError(f"aggregator {o.aggregator!r} is not a configured expert or __base__", path=path, key="orchestrator.aggregator")
    for key in ("{question}", "{contributions}"):
        if key not in o.synthesis_template:
            raise ConfigError(f"synthesis_template must contain {key}", path=path, key="orchestrator.synthesis_template")
    if not 0 < s.port < 65536:
        raise ConfigError("must be a TCP port", path=path, key="server.port")


def load_config(path: str | Path | None = None) -> ExpertmixConfig:
    """Load and validate a config file; ``None`` loads the shipped defaults."""
    p = Path(path) if path is not None else default_config_path()
    if not p.is_file():
        raise ConfigError("config file not found; pass --config FILE or omit it for the shipped defaults", path=p)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte {exc.start})", path=p) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML: {exc}", path=p) from exc
    sp = str(p)
    extra = sorted(set(data) - set(_TOP))
    if extra:
        warnings.warn(f"{sp}: unknown table(s) {', '.join(extra)} ignored", UserWarning, stacklevel=2)
    router = _section(RouterSettings, data.get("router"), path=sp, name="router")
    if router.path:
        rp = Path(router.path).expanduser()
        if not rp.is_absolute():
            rp = (p.parent / rp).resolve()
        router = RouterSettings(path=str(rp), k=router.k, min_weight=router.min_weight)
    orch = _section(OrchestratorSettings, data.get("orchestrator"), path=sp, name="orchestrator")
    if orch.log_file:
        lf = Path(orch.log_file).expanduser()
        if not lf.is_absolute():
            lf = (p.parent / lf).resolve()
        orch = OrchestratorSettings(**{**orch.__dict__, "log_file": str(lf)})
    cfg = ExpertmixConfig(
        path=sp,
        base=parse_base(data.get("base"), path=sp),
        experts=tuple(parse_experts(data.get("experts"), path=sp)),
        router=router,
        orchestrator=orch,
        server=_section(ServerSettings, data.get("server"), path=sp, name="server"),
    )
    _check(cfg, sp)
    return cfg
