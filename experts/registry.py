"""Expert specs from the ``[base]`` and ``[[experts]]`` tables of ``expertmix.toml``, validated.

The registry only describes experts; backends load them. ``__base__`` is the sentinel
for "the base model with no adapter" and is always available.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmix.errors import ConfigError, UnknownExpert

__all__ = ["BASE_EXPERT", "BaseSpec", "ExpertRegistry", "ExpertSpec", "parse_base", "parse_experts"]

BASE_EXPERT = "__base__"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class BaseSpec:
    """``[base]``: the shared base model every local expert's adapter sits on."""

    model: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: str = "auto"


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
    _warn_unknown(table, ("model", "device", "dtype"), path=path, where="base")
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
    return BaseSpec(model=model, device=device, dtype=dtype)


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
        if name == BASE_EXPERT:
            raise ConfigError(f"'{BASE_EXPERT}' is reserved for the base model", path=path, key=f"{where}.name")
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"invalid expert name {name!r}: use lowercase letters, digits, '-' or '_' (start with a letter)",
                path=path,
                key=f"{where}.name",
            )
        if name in seen:
            raise ConfigError(f"duplicate expert name {name!r}", path=path, key=f"{where}.name")
        seen.add(name)
        backend = _str(t, "backend", "local", path=path, where=where) or "local"
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}", path=path, key=f"{where}.backend")
        adapter_s = _str(t, "adapter", None, path=path, where=where)
        adapter = None
        if adapter_s:
            adapter = Path(adapter_s).expanduser()
            if not adapter.is_absolute():
                adapter = (base_dir / adapter).resolve()
        if backend == "local" and adapter is None:
            raise ConfigError(f"local expert {name!r} needs 'adapter' (a PEFT adapter directory)", path=path, key=f"{where}.adapter")
        base_url = _str(t, "base_url", None, path=path, where=where)
        if backend == "openai" and not base_url:
            raise ConfigError(f"openai expert {name!r} needs 'base_url', e.g. http://127.0.0.1:8001/v1", path=path, key=f"{where}.base_url")
        timeout = t.get("timeout_s")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConfigError("must be a positive number of seconds", path=path, key=f"{where}.timeout_s")
        specs.append(
            ExpertSpec(
                name=name,
                description=_str(t, "description", "", path=path, where=where) or "",
                adapter=adapter,
                backend=backend,
                base_url=base_url,
                api_key=_str(t, "api_key", None, path=path, where=where),
                remote_name=_str(t, "remote_name", None, path=path, where=where),
                timeout_s=float(timeout) if timeout is not None else None,
            )
        )
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
