"""Expert specs from the ``[base]`` and ``[[experts]]`` tables of ``expertmix.toml``, validated.

The registry only describes experts; backends load them. ``__base__`` is the sentinel
for "the base model with no adapter" and is always available.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmix.errors import ConfigError, UnknownExpert
from expertmix.names import BASE_EXPERT, NAME_PATTERN, name_problem

__all__ = [
    "BASE_EXPERT",
    "NAME_PATTERN",
    "BaseSpec",
    "ExpertRegistry",
    "ExpertSpec",
    "name_problem",
    "parse_base",
    "parse_experts",
]

#: The one name rule for expert names and router labels lives in ``expertmix.names``.
_NAME_RE = re.compile(NAME_PATTERN)
BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class BaseSpec:
    """``[base]``: the shared base model every local expert's adapter sits on."""

    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: str = "auto"
    # speed (experts/models.py FastOptions, docs/performance.md)
    quantize: str = "none"
    gemm: str = "auto"
    fast_lora: bool = True
    merged_experts: int = 2
    lean_decode: bool = True
    prefix_cache_mb: int = 128


@dataclass(frozen=True)
class ExpertSpec:
    """One ``[[experts]]`` entry."""

    name: str
    description: str = ""
    adapter: Path | None = None
    backend: str = "local"
    base_url: str | None = None
    api_key: str | None = None
    remote_name: str | None = None  # model name on the remote server; defaults to ``name``
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        # Checks that need no file system: the name rule, the backend, numbers. Whether the adapter
        # exists is checked when a config is loaded (ExpertmixConfig), not here: a backend may be
        # handed a spec whose adapter it must reject with AdapterError.
        problem = name_problem(self.name)
        if problem:
            raise ConfigError(problem, key="experts.name")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}", key="experts.backend"
            )
        if self.adapter is not None and not isinstance(self.adapter, Path):
            object.__setattr__(self, "adapter", Path(self.adapter))
        if self.backend == "local" and self.adapter is None:
            raise ConfigError(
                f"local expert {self.name!r} needs 'adapter' (a PEFT adapter directory)", key="experts.adapter"
            )
        if self.backend == "openai" and not self.base_url:
            raise ConfigError(
                f"openai expert {self.name!r} needs 'base_url', e.g. http://127.0.0.1:8001/v1", key="experts.base_url"
            )
        t = self.timeout_s
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0
        ):
            raise ConfigError(f"must be a positive, finite number of seconds, got {t!r}", key="experts.timeout_s")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "adapter": str(self.adapter) if self.adapter else None,
            "backend": self.backend,
        }


def _warn_unknown(table: Mapping[str, Any], known: Iterable[str], *, path: str, where: str) -> None:
    extra = sorted(set(table) - set(known))
    if extra:
        warnings.warn(f"{path} [{where}]: unknown key(s) {', '.join(extra)} ignored", UserWarning, stacklevel=3)


def _str(table: Mapping[str, Any], key: str, default: str | None, *, path: str, where: str) -> str | None:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"must be a string, got {type(value).__name__}", path=path, key=f"{where}.{key}")
    return value


def parse_base(table: Mapping[str, Any] | None, *, path: str) -> BaseSpec:
    table = dict(table or {})
    _warn_unknown(table, ("model", "device", "dtype", *_FAST_KEYS), path=path, where="base")
    model = _str(table, "model", BaseSpec.model, path=path, where="base") or BaseSpec.model
    device = _str(table, "device", "auto", path=path, where="base") or "auto"
    dtype = _str(table, "dtype", "auto", path=path, where="base") or "auto"
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16", path=path, key="base.dtype")
    if not (device in ("auto", "cpu") or device.startswith(("cuda", "mps"))):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda[:N]", path=path, key="base.device")
    base_dir = Path(path).parent
    if model.startswith((".", "~")):
        model = str((base_dir / model).expanduser().resolve()) if model.startswith(".") else str(Path(model).expanduser())
    return BaseSpec(model=model, device=device, dtype=dtype, **_parse_fast(table, path=path))


_FAST_KEYS = ("quantize", "gemm", "fast_lora", "merged_experts", "lean_decode", "prefix_cache_mb")


def _parse_fast(table: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    """The speed knobs of ``[base]``: quantize, gemm, fast_lora, merged_experts, lean_decode, prefix_cache_mb."""
    out: dict[str, Any] = {}
    choices = {"quantize": ("none", "int8", "int4", "bf16"), "gemm": ("auto", "default", "wxt", "kernel")}
    for key, allowed in choices.items():
        value = _str(table, key, getattr(BaseSpec, key), path=path, where="base")
        if value not in allowed:
            raise ConfigError(f"unknown {key} {value!r}; use one of {', '.join(allowed)}", path=path, key=f"base.{key}")
        out[key] = value
    for key in ("fast_lora", "lean_decode"):
        flag = table.get(key, getattr(BaseSpec, key))
        if not isinstance(flag, bool):
            raise ConfigError("must be true or false", path=path, key=f"base.{key}")
        out[key] = flag
    merged = table.get("merged_experts", BaseSpec.merged_experts)
    if isinstance(merged, bool) or not isinstance(merged, int) or not 0 <= merged <= 64:
        raise ConfigError("must be an integer in [0, 64] (0 = never merge)", path=path, key="base.merged_experts")
    out["merged_experts"] = merged
    mb = table.get("prefix_cache_mb", BaseSpec.prefix_cache_mb)
    if isinstance(mb, bool) or not isinstance(mb, int) or not 0 <= mb <= 1 << 20:
        raise ConfigError("must be an integer number of MiB in [0, 1048576] (0 = no prefix cache)", path=path,
                          key="base.prefix_cache_mb")
    out["prefix_cache_mb"] = mb
    return out


_EXPERT_KEYS = ("name", "description", "adapter", "backend", "base_url", "api_key", "remote_name", "timeout_s")


def parse_experts(tables: Any, *, path: str) -> list[ExpertSpec]:
    if tables is None:
        return []
    if not isinstance(tables, list):
        raise ConfigError("must be an array of tables: write [[experts]]", path=path, key="experts")
    base_dir = Path(path).parent
    specs: list[ExpertSpec] = []
    seen: set[str] = set()
    for i, t in enumerate(tables):
        where = f"experts[{i}]"
        if not isinstance(t, dict):
            raise ConfigError("must be a table", path=path, key=where)
        _warn_unknown(t, _EXPERT_KEYS, path=path, where=where)
        name = _str(t, "name", None, path=path, where=where)
        if not name:
            raise ConfigError("missing 'name'", path=path, key=where)
        if name in seen:
            raise ConfigError(f"duplicate expert name {name!r}; each expert needs its own", path=path, key=f"{where}.name")
        seen.add(name)
        adapter_s = _str(t, "adapter", None, path=path, where=where)
        adapter = None
        if adapter_s:
            adapter = Path(adapter_s).expanduser()
            if not adapter.is_absolute():
                adapter = (base_dir / adapter).resolve()
        timeout = t.get("timeout_s")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
            raise ConfigError(f"must be a number of seconds, got {timeout!r}", path=path, key=f"{where}.timeout_s")
        try:
            spec = ExpertSpec(
                name=name,
                description=_str(t, "description", "", path=path, where=where) or "",
                adapter=adapter,
                backend=_str(t, "backend", "local", path=path, where=where) or "local",
                base_url=_str(t, "base_url", None, path=path, where=where),
                api_key=_str(t, "api_key", None, path=path, where=where),
                remote_name=_str(t, "remote_name", None, path=path, where=where),
                timeout_s=float(timeout) if timeout is not None else None,
            )
        except ConfigError as exc:
            field_ = (exc.key or "experts.name").split(".", 1)[1]
            raise ConfigError(str(exc), path=path, key=f"{where}.{field_}") from None
        specs.append(spec)
    return specs


@dataclass
class ExpertRegistry:
    """Experts by name, validated; ``__base__`` is implicit."""

    base: BaseSpec = field(default_factory=BaseSpec)
    experts: dict[str, ExpertSpec] = field(default_factory=dict)

    @classmethod
    def from_specs(cls, base: BaseSpec, specs: Iterable[ExpertSpec]) -> ExpertRegistry:
        return cls(base=base, experts={s.name: s for s in specs})

    def __iter__(self) -> Iterator[ExpertSpec]:
        return iter(self.experts.values())

    def __len__(self) -> int:
        return len(self.experts)

    def __contains__(self, name: object) -> bool:
        return name == BASE_EXPERT or name in self.experts

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def get(self, name: str) -> ExpertSpec:
        try:
            return self.experts[name]
        except KeyError:
            known = ", ".join([*self.experts, BASE_EXPERT])
            raise UnknownExpert(f"unknown expert {name!r}; configured: {known}", expert=name) from None

    def check(self, names: Iterable[str]) -> None:
        for n in names:
            if n != BASE_EXPERT:
                self.get(n)
