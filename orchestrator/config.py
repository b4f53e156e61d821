"""``expertmix.toml`` → typed config: base, experts, router, orchestration defaults, server.

Every default lives here, once, with its help text (``field(metadata={"help": ...})``). Each
dataclass validates itself in ``__post_init__`` (types, finite numbers, ranges, known names), and
:class:`ExpertmixConfig` checks what spans sections (aggregator, adapter and router paths).
Unknown keys warn (a newer config still loads); invalid values raise :class:`ConfigError`
naming the file, the key and the fix.
"""

from __future__ import annotations

import math
import tomllib
import warnings
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from expertmix.errors import ConfigError
from experts.registry import BASE_EXPERT, BaseSpec, ExpertRegistry, ExpertSpec, parse_base, parse_experts

__all__ = [
    "COMPOSERS",
    "DEFAULT_SYNTHESIS_TEMPLATE",
    "ExpertmixConfig",
    "OrchestratorSettings",
    "RouterSettings",
    "ServerSettings",
    "default_config_path",
    "known_planners",
    "known_strategies",
    "load_config",
]

DEFAULT_SYNTHESIS_TEMPLATE = """You are combining answers from domain experts into one answer.
Question: {question}

{contributions}

Write one clear, complete answer to the question. Give more weight to experts with a higher weight, keep what is correct and useful from each, and do not mention the experts."""

DEFAULT_CONTRIBUTION_TEMPLATE = "Answer from the {expert} expert (weight {weight_pct}):\n{text}"

#: how ``decompose`` joins the parts' answers
COMPOSERS = ("sections", "synthesis")
_FALLBACK_PLANNERS = ("segment", "llm", "none")


class _Invalid(ConfigError):
    """A bad value found inside a dataclass, before the file is known; ``load_config`` adds the file."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}", key=key)
        self.detail = detail


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def known_strategies() -> list[str]:
    """Registered merge strategies (imported lazily: the registry loads its built-ins on demand)."""
    from orchestrator.merge import STRATEGIES, _load_builtins

    _load_builtins()
    return sorted(STRATEGIES)


def known_planners() -> list[str]:
    """Registered planners; the built-in names when the planning package is not there."""
    try:
        from orchestrator import planning
    except ModuleNotFoundError as exc:
        if exc.name not in ("orchestrator.planning",):
            raise
        return list(_FALLBACK_PLANNERS)
    load = getattr(planning, "_load_builtins", None)
    if callable(load):
        load()
    reg = getattr(planning, "PLANNERS", None)
    if isinstance(reg, dict) and reg:
        return sorted(reg)
    return list(_FALLBACK_PLANNERS)


def _type_ok(value: Any, tname: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    base = tname.replace(" | None", "")
    if value is None:
        return tname.endswith("| None")
    return {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number,
        "str": isinstance(value, str),
    }.get(base, True)


def _check_types(obj: Any, section: str) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        tname = str(f.type)
        if not _type_ok(value, tname):
            raise _Invalid(
                f"{section}.{f.name}",
                f"must be {tname.replace(' | None', '')}, got {type(value).__name__} {value!r}",
            )
        if tname.startswith("float") and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))


def _finite(
    obj: Any,
    section: str,
    name: str,
    *,
    lo: float,
    lo_open: bool = False,
    hi: float | None = None,
    hi_open: bool = False,
    hint: str = "",
) -> None:
    v = getattr(obj, name)
    if v is None:
        return
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = (
            f"{'>' if lo_open else '>='} {lo:g}"
            if hi is None
            else (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        )
        raise _Invalid(f"{section}.{name}", f"must be a finite number {rng}{hint}, got {v!r}")


@dataclass(frozen=True)
class RouterSettings:
    """``[router]``: which router, how many experts per question."""

    path: str | None = _opt(None, "Router artifact directory or store; unset = the shipped default router.")
    k: int = _opt(2, "Experts combined per question (top-k).")
    min_weight: float = _opt(0.0, "Drop experts whose routed weight is below this (each costs a generation).")

    def __post_init__(self) -> None:
        _check_types(self, "router")
        if self.k < 1:
            raise _Invalid("router.k", f"must be >= 1, got {self.k}")
        _finite(self, "router", "min_weight", lo=0, hi=1, hi_open=True, hint=" (0 keeps every top-k expert)")


@dataclass(frozen=True)
class OrchestratorSettings:
    """``[orchestrator]``: how a question is answered."""

    strategy: str = _opt("auto", "Merge strategy: a name registered in orchestrator.merge.")
    planner: str = _opt(
        "segment", "How a request is split into parts before the experts run (segment, llm, none)."
    )
    compose: str = _opt(
        "sections", "How `decompose` joins the parts' answers: sections (no LLM pass) or synthesis."
    )
    max_parts: int = _opt(4, "At most this many parts per request (the rest is merged into the last part).")
    max_new_tokens: int = _opt(160, "Tokens generated at most per expert answer.")
    temperature: float = _opt(0.0, "Sampling temperature; 0 = greedy.")
    repetition_penalty: float = _opt(
        1.1, "Penalty on repeated tokens (small models loop under greedy); 1.0 = off."
    )
    expert_timeout_s: float = _opt(300.0, "Seconds an expert may take before it is dropped from the answer.")
    aggregator: str = _opt(BASE_EXPERT, "Expert that writes the synthesis (a configured expert or __base__).")
    synthesis_template: str = _opt(
        DEFAULT_SYNTHESIS_TEMPLATE, "Aggregator prompt; needs {question} and {contributions}."
    )
    contribution_template: str = _opt(
        DEFAULT_CONTRIBUTION_TEMPLATE,
        "One expert's part of the synthesis prompt; fields {expert} {weight} {weight_pct} {text}.",
    )
    log_file: str | None = _opt(None, "Append one JSON line per answer here (relative to the config file).")
    log_query_text: bool = _opt(False, "Log the query text; false logs a SHA-256 of it instead.")
    merge_cache_size: int = _opt(8, "Merged adapters (adapter_merge) kept in memory.")

    def __post_init__(self) -> None:
        sec = "orchestrator"
        _check_types(self, sec)
        for name, lo in (("max_parts", 1), ("max_new_tokens", 1), ("merge_cache_size", 1)):
            if getattr(self, name) < lo:
                raise _Invalid(f"{sec}.{name}", f"must be >= {lo}, got {getattr(self, name)}")
        _finite(self, sec, "temperature", lo=0, hint=" (0 = greedy)")
        _finite(self, sec, "repetition_penalty", lo=0, lo_open=True, hint=" (1.0 = off)")
        _finite(self, sec, "expert_timeout_s", lo=0, lo_open=True, hint=" seconds")
        strategies = known_strategies()
        if self.strategy not in strategies:
            raise _Invalid(
                f"{sec}.strategy",
                f"unknown merge strategy {self.strategy!r}; use one of {', '.join(strategies)}",
            )
        planners = known_planners()
        if self.planner not in planners:
            raise _Invalid(
                f"{sec}.planner", f"unknown planner {self.planner!r}; use one of {', '.join(planners)}"
            )
        if self.compose not in COMPOSERS:
            raise _Invalid(
                f"{sec}.compose", f"unknown compose {self.compose!r}; use one of {', '.join(COMPOSERS)}"
            )
        _check_template(
            f"{sec}.synthesis_template",
            self.synthesis_template,
            required=("question", "contributions"),
            sample={"question": "q", "contributions": "c"},
        )
        _check_template(
            f"{sec}.contribution_template",
            self.contribution_template,
            required=("text",),
            sample={"expert": "e", "weight": "0.50", "weight_pct": "50%", "text": "t"},
        )


def _check_template(key: str, template: str, *, required: tuple[str, ...], sample: dict[str, str]) -> None:
    for name in required:
        if "{" + name + "}" not in template:
            raise _Invalid(key, f"must contain {{{name}}}")
    try:
        template.format(**sample)
    except (KeyError, IndexError, ValueError) as exc:
        raise _Invalid(
            key, f"is not a valid template ({exc!r}); fields: {', '.join(sample)}; write {{{{ }}}} for braces"
        )


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: ``expertmix serve``."""

    host: str = _opt("127.0.0.1", "Interface to bind; anything but loopback needs api_key.")
    port: int = _opt(8000, "TCP port.")
    api_key: str | None = _opt(
        None, "Require 'Authorization: Bearer KEY' (also EXPERTMIX_API_KEY / --api-key)."
    )
    max_batch_size: int = _opt(16, "Rows per decoded batch at most.")
    max_wait_ms: float = _opt(10.0, "How long a batch waits for more requests (milliseconds).")
    max_queue: int = _opt(256, "Requests waiting at most; more get 429.")
    max_request_bytes: int = _opt(1_000_000, "Largest request body accepted.")
    max_tokens_limit: int = _opt(1024, "Largest max_tokens a client may ask for.")
    batching: bool = _opt(True, "Decode concurrent requests together in shared mixed-adapter batches.")
    drop_params: bool = _opt(
        False, "Drop unknown request fields instead of answering 400 (LiteLLM's drop_params)."
    )
    router_watch_s: float = _opt(
        2.0, "Check the router store's CURRENT this often (seconds) and follow `router promote`; 0 = off."
    )

    def __post_init__(self) -> None:
        sec = "server"
        _check_types(self, sec)
        if not self.host.strip():
            raise _Invalid(f"{sec}.host", "must not be empty; use 127.0.0.1 for this machine only")
        if not 0 < self.port < 65536:
            raise _Invalid(f"{sec}.port", f"must be a TCP port (1-65535), got {self.port}")
        for name in ("max_batch_size", "max_queue", "max_request_bytes", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise _Invalid(f"{sec}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _finite(self, sec, "max_wait_ms", lo=0, hi=60_000, hint=" milliseconds")
        _finite(self, sec, "router_watch_s", lo=0, hi=3600, hint=" seconds (0 = off)")


@dataclass(frozen=True)
class ExpertmixConfig:
    """The whole configuration, validated when built."""

    path: str | None
    base: BaseSpec = field(default_factory=BaseSpec)
    experts: tuple[ExpertSpec, ...] = ()
    router: RouterSettings = field(default_factory=RouterSettings)
    orchestrator: OrchestratorSettings = field(default_factory=OrchestratorSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        p = self.path
        names: set[str] = set()
        for i, e in enumerate(self.experts):
            if e.name in names:
                raise ConfigError(
                    f"duplicate expert name {e.name!r}; each expert needs its own",
                    path=p,
                    key=f"experts[{i}].name",
                )
            names.add(e.name)
            if e.backend == "local" and e.adapter is not None and not Path(e.adapter).is_dir():
                raise ConfigError(
                    f"adapter directory {e.adapter} does not exist; fix the path (relative paths are relative "
                    f"to the config file) or train it: expertmix experts train --name {e.name} --data FILE "
                    f"--out {e.adapter}",
                    path=p,
                    key=f"experts[{i}].adapter",
                )
        agg = self.orchestrator.aggregator
        if agg not in names | {BASE_EXPERT}:
            raise ConfigError(
                f"aggregator {agg!r} is not a configured expert; use {BASE_EXPERT} or one of "
                f"{', '.join(sorted(names)) or '(none)'}",
                path=p,
                key="orchestrator.aggregator",
            )
        rp = self.router.path
        if rp is not None and not Path(rp).exists():
            raise ConfigError(
                f"router {rp} does not exist; fix the path, or remove it for the shipped router",
                path=p,
                key="router.path",
            )

    @property
    def registry(self) -> ExpertRegistry:
        return ExpertRegistry.from_specs(self.base, self.experts)

    def to_dict(self) -> dict[str, Any]:
        """The effective config as TOML-shaped tables (every default filled in; unset values left out)."""

        def table(obj: Any) -> dict[str, Any]:
            out = {
                f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if getattr(obj, f.name) is not None
            }
            if "api_key" in out:
                out["api_key"] = "***"  # never print a secret
            return out

        return {
            "base": table(self.base),
            "router": table(self.router),
            "orchestrator": table(self.orchestrator),
            "server": table(self.server),
            "experts": [table(e) for e in self.experts],
        }


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


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
    known = {f.name for f in fields(cls)}
    extra = sorted(set(table) - known)
    if extra:
        warnings.warn(
            f"{path} [{name}]: unknown key(s) {', '.join(extra)} ignored", UserWarning, stacklevel=3
        )
    return cls(**{k: v for k, v in table.items() if k in known})


def _relative_to(cfg_path: Path, value: str | None) -> str | None:
    if not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (cfg_path.parent / p).resolve())


def load_config(path: str | Path | None = None) -> ExpertmixConfig:
    """Load and validate a config file; ``None`` loads the shipped defaults."""
    p = Path(path) if path is not None else default_config_path()
    if not p.is_file():
        raise ConfigError(
            "config file not found; pass --config FILE or omit it for the shipped defaults", path=p
        )
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
    try:
        router = _section(RouterSettings, data.get("router"), path=sp, name="router")
        router = replace(router, path=_relative_to(p, router.path))
        orch = _section(OrchestratorSettings, data.get("orchestrator"), path=sp, name="orchestrator")
        orch = replace(orch, log_file=_relative_to(p, orch.log_file))
        return ExpertmixConfig(
            path=sp,
            base=parse_base(data.get("base"), path=sp),
            experts=tuple(parse_experts(data.get("experts"), path=sp)),
            router=router,
            orchestrator=orch,
            server=_section(ServerSettings, data.get("server"), path=sp, name="server"),
        )
    except _Invalid as exc:
        raise ConfigError(exc.detail, path=sp, key=exc.key) from None
    except (
        TypeError
    ) as exc:  # a dataclass refused its arguments: report it as a config error, not a traceback
        raise ConfigError(str(exc), path=sp) from None


def config_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of ``expertmix.toml``, built from the dataclasses above."""

    def props(cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "path" and cls is ExpertmixConfig:
                continue
            tname = str(f.type)
            base = tname.replace(" | None", "")
            js = {
                "int": "integer",
                "float": "number",
                "bool": "boolean",
                "str": "string",
                "Path": "string",
            }.get(base, "string")
            entry: dict[str, Any] = {"type": [js, "null"] if tname.endswith("| None") else js}
            default = f.default if f.default is not MISSING else None
            if default is not None:
                entry["default"] = _plain(default)
            if f.metadata.get("help"):
                entry["description"] = f.metadata["help"]
            out[f.name] = entry
        return out

    def table(cls: type, doc: str) -> dict[str, Any]:
        return {"type": "object", "description": doc, "properties": props(cls)}

    from experts.registry import NAME_PATTERN

    expert = table(ExpertSpec, "One [[experts]] entry.")
    expert["properties"]["name"]["pattern"] = NAME_PATTERN
    expert["properties"]["backend"]["enum"] = ["local", "openai"]
    expert["required"] = ["name"]
    orch = table(OrchestratorSettings, "[orchestrator]")
    orch["properties"]["strategy"]["enum"] = known_strategies()
    orch["properties"]["compose"]["enum"] = list(COMPOSERS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "expertmix.toml",
        "type": "object",
        "properties": {
            "base": table(BaseSpec, "[base]: the shared base model."),
            "router": table(RouterSettings, "[router]"),
            "orchestrator": orch,
            "server": table(ServerSettings, "[server]"),
            "experts": {"type": "array", "items": expert},
        },
    }
