"""Settings as data: a dataclass filled from TOML, then environment variables, then overrides.

Shared by the agent and the hub so both behave the same: unknown keys are refused, values are
coerced to the field's type with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from modelfleet.kernel.errors import InvalidRequestError

T = TypeVar("T")


def _coerce(name: str, value: Any, kind: Any) -> Any:
    kind = getattr(kind, "__name__", kind)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "Path":
            return Path(value)
        return str(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(f"config: {name} has invalid value {value!r}") from None


def load_settings(
    cls: type[T],
    path: Path | None,
    *,
    table: str,
    env_prefix: str,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """File (``[table]`` or top level) < ``<env_prefix><KEY>`` environment < overrides."""
    cfg = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidRequestError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequestError(f"config file {path}: {exc}") from None
        section = data.get(table, data)
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise InvalidRequestError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
        values.update(section)
    env = os.environ if env is None else env
    for name in fields:
        key = env_prefix + name.upper()
        if key in env:
            values[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    for name, value in values.items():
        setattr(cfg, name, _coerce(name, value, fields[name].type))
    return cfg


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidRequestError(f"config: {what} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a config came from, so a reload (SIGHUP) reads the same sources the same way."""

    path: Path | None
    # Command-line values: they keep overriding the file after a reload, as at start.
    overrides: Mapping[str, Any]
    # None: the process environment (read again at reload; it does not change under us).
    env: Mapping[str, str] | None = None


def apply_reloadable(
    current: Any, fresh: Any, reloadable: Iterable[str]
) -> tuple[list[str], list[str]]:
    """Copy changed reloadable settings from ``fresh`` into ``current``; returns (applied,
    changed but needing a restart). In place, so every holder of the running config sees them.
    """
    applied: list[str] = []
    restart: list[str] = []
    allowed = set(reloadable)
    for f in dataclasses.fields(current):
        if f.name == "origin" or getattr(current, f.name) == getattr(fresh, f.name):
            continue
        if f.name in allowed:
            setattr(current, f.name, getattr(fresh, f.name))
            applied.append(f.name)
        else:
            restart.append(f.name)
    return applied, restart
