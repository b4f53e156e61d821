"""The expertmix error tree. Every error we raise derives from :class:`ExpertmixError`.

    ExpertmixError
    ├── ConfigError                 bad or missing expertmix.toml, unknown keys are warnings
    ├── DataError                   bad training / routing data (carries path and line)
    ├── InputError                  bad query: empty, not UTF-8, longer than the context
    ├── ModelError                  base model cannot be found, converted or loaded
    ├── ExpertError                 (carries .expert)
    │   ├── UnknownExpert           name not configured
    │   ├── AdapterError            adapter directory missing, malformed, or for another base
    │   ├── ExpertTimeout           expert did not answer in time
    │   ├── RequestCancelled        the caller cancelled the work (client went away, shutdown)
    │   └── ExpertUnavailable       expert failed / remote server refused or errored
    ├── RouterError
    │   ├── RouterNotFitted         router used before fit()
    │   ├── RouterArtifactError     artifact missing, corrupted, tampered or incompatible
    │   └── RouterMismatch          router labels do not match the configured experts
    ├── StrategyError               unknown merge strategy, or not supported by a backend
    └── AllExpertsFailed            every expert and the base fallback failed

Errors carry context as attributes (``path``, ``line``, ``field``, ``expert``) and a
message that says what was wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path


class ExpertmixError(Exception):
    """Root of every error raised by expertmix."""


class ConfigError(ExpertmixError):
    """The configuration file is missing, malformed or has an invalid value."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None) -> None:
        prefix = ""
        if path is not None:
            prefix = f"{path}"
            if key:
                prefix += f" [{key}]"
            prefix += ": "
        super().__init__(prefix + message)
        self.path = str(path) if path is not None else None
        self.key = key


class DataError(ExpertmixError):
    """Labeled data (routing or expert training) is malformed."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f" line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field


class InputError(ExpertmixError, ValueError):
    """A query cannot be answered as given (empty, not UTF-8, too long)."""


class ModelError(ExpertmixError):
    """The base model cannot be located, converted or loaded."""


class ExpertError(ExpertmixError):
    """An expert could not produce an answer."""

    def __init__(self, message: str, *, expert: str | None = None) -> None:
        super().__init__(message)
        self.expert = expert


class UnknownExpert(ExpertError, KeyError):
    """The named expert is not configured."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class AdapterError(ExpertError):
    """An adapter directory is missing, malformed or was trained for another base."""


class ExpertTimeout(ExpertError, TimeoutError):
    """An expert did not answer within its timeout."""


class RequestCancelled(ExpertError):
    """The work was cancelled by its caller (a dropped client, a shutdown) before it finished."""


class ExpertUnavailable(ExpertError):
    """An expert failed, or its remote server refused or errored."""

    def __init__(self, message: str, *, expert: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message, expert=expert)
        self.status_code = status_code


class RouterError(ExpertmixError):
    """Base class for router problems."""


class RouterNotFitted(RouterError):
    """The router was used before it was fitted or loaded."""


class RouterArtifactError(RouterError):
    """A saved router is missing, corrupted, tampered with or incompatible."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = str(path) if path is not None else None


class RouterMismatch(RouterError):
    """The router's labels do not match the configured experts."""


class StrategyError(ExpertmixError, ValueError):
    """Unknown merge strategy, or a strategy the backend cannot run."""


class AllExpertsFailed(ExpertmixError):
    """Every selected expert failed and so did the base-model fallback."""

    def __init__(self, message: str, *, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})


__all__ = [
    "AdapterError",
    "AllExpertsFailed",
    "ConfigError",
    "DataError",
    "ExpertError",
    "ExpertTimeout",
    "ExpertUnavailable",
    "ExpertmixError",
    "InputError",
    "ModelError",
    "RequestCancelled",
    "RouterArtifactError",
    "RouterError",
    "RouterMismatch",
    "RouterNotFitted",
    "StrategyError",
    "UnknownExpert",
]
