"""Service configuration: frozen dataclasses read once, at start, from ``MEGASTACK_<SVC>_*`` variables.

Every field is a setting; its environment name is the prefix plus the field name in upper case
(``MEGASTACK_TEXTGEN_MAX_BATCH_SIZE`` for ``max_batch_size``). An unknown variable under the prefix, a
value that does not parse, or a failed cross-field check stops start-up with one clear line
(:class:`ConfigError`). This module is the only place that reads the process environment for service
settings, so a service's behaviour is fully described by its config object.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid. The message names the variable."""


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a config field with its documentation (shown in READMEs and ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def env_name(prefix: str, field_name: str) -> str:
    """The environment variable of a setting: ``{prefix}{FIELD}``."""
    return f"{prefix}{field_name.upper()}"


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(raw: str, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "" and type(None) in args:
            return None
        return _parse(raw, inner[0], name)
    if origin is tuple:
        item = args[0] if args else str
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(_parse(p, item, name) for p in parts)
    try:
        if typ is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(raw.strip())
        if typ is float:
            return float(raw.strip())
        if typ is Path:
            return Path(raw).expanduser()
        if typ is str:
            return raw
    except ValueError:
        kind = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}.get(typ, str(typ))
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    raise TypeError(f"unsupported config type {typ!r} for {name}")


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from the environment variables under ``prefix``; raise ConfigError on bad input."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    known = {env_name(prefix, f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in env if k.startswith(prefix) and k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown setting {unknown[0]}{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in env:
            value = _parse(env[name], hints[f.name], name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
            kwargs[f.name] = value
        elif _is_required(f):
            raise ConfigError(f"{name} is required: {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"invalid {prefix}* settings: {e}") from None


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting of ``cls``: the README tables are made from this."""
    rows = []
    for f in dataclasses.fields(cls):
        if _is_required(f):
            default = "(required)"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            d = f.default
            if isinstance(d, Path) and d.is_absolute():
                from shared.paths import REPO_ROOT

                d = d.relative_to(REPO_ROOT) if d.is_relative_to(REPO_ROOT) else d
            default = ",".join(map(str, d)) if isinstance(d, tuple) else ("" if d is None else str(d))
        rows.append((env_name(prefix, f.name), default, f.metadata.get("help", "")))
    return rows


def markdown_table(cls: type, prefix: str) -> str:
    """The settings of a config class as a Markdown table (variable, default, meaning)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for var, default, help_ in describe(cls, prefix):
        lines.append(f"| `{var}` | `{default}` | {help_} |")
    return "\n".join(lines)


def watch_limit(max_watchers: int, threads: int, threads_name: str) -> int:
    """The bound on long-lived watch streams a server holds: ``max_watchers``, or half of its ``threads``
    when 0; below ``threads`` so that other requests always find one. ValueError otherwise."""
    if max_watchers < 0 or (max_watchers and max_watchers >= threads):
        raise ValueError(
            f"max_watchers must be 0 (half of {threads_name}) or below {threads_name} ({threads}), got "
            f"{max_watchers}"
        )
    return max_watchers or max(1, threads // 2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    """Settings every gRPC service has. Service configs subclass this."""

    host: str = setting(
        "127.0.0.1", help="Address the gRPC server binds to (127.0.0.1 unless told otherwise)."
    )
    port: int = setting(help="gRPC port; 0 picks a free port (it is logged).")
    metrics_port: int = setting(help="Port of the Prometheus /metrics endpoint; 0 picks a free port.")
    log_level: str = setting("INFO", help="Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_json: bool = setting(False, help="Log JSON lines (for log shippers) instead of text.")
    max_workers: int = setting(64, help="gRPC handler threads (concurrent RPCs, streams included).")
    grace_s: float = setting(5.0, help="Seconds in-flight RPCs get to finish on SIGTERM.")

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {value}")
        if self.max_workers <= 0:
            raise ValueError(f"max_workers must be > 0, got {self.max_workers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobServiceConfig(ServiceConfig):
    """Settings the job services (converter, trainer, evaluator) add: their watch streams are bounded."""

    max_watchers: int = setting(
        0,
        help="Job watch and log-follow streams open at once; one more gets RESOURCE_EXHAUSTED "
        "(HTTP 429), so submissions always find a handler thread. 0 = half of max_workers; "
        "else below max_workers.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.watchers_limit  # noqa: B018 - validates

    @property
    def watchers_limit(self) -> int:
        """Concurrent watch streams: max_watchers, or half of max_workers when 0."""
        return watch_limit(self.max_watchers, self.max_workers, "max_workers")
