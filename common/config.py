"""Job configuration: one frozen dataclass per job, validated once, loadable from YAML + overrides.

Every job config subclasses :class:`JobConfig` (which holds the lake root) and implements
``validate()`` raising :class:`ConfigError` whose message says how to fix the value. Configs are built
with :func:`build_config` from (in increasing priority) dataclass defaults, an optional YAML file, and
``key=value`` overrides (dotted CLI flags like ``--set cooccur.top_k=50`` reduce to ``top_k=50``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="JobConfig")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which one and how to fix it."""


class InputError(ValueError):
    """Bad user input (missing file, unknown column, ...); the message names it and the fix."""


@dataclass(frozen=True)
class JobConfig:
    """Fields shared by every job: the lake root (local path or object-store URI)."""

    lake: str = "./lake"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value. Subclasses call ``super().validate()``."""
        if not self.lake:
            raise ConfigError("lake is empty: pass --lake DIR (a local path or s3://, gs://, az:// URI)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view, recorded in the output tables' commit metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a string (from YAML/CLI) to the annotated field type."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Path": Path})  # annotations are strings under `from __future__`
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], name)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, name) for v in items if v != "")
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p]
            bad = [p for p in pairs if "=" not in p]
            if bad:
                raise ConfigError(f"{name}: expected key=value pairs separated by commas, got {bad[0]!r}")
            return dict(p.split("=", 1) for p in pairs)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (use true/false)")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a valid {tp.__name__}") from None
    return value


def build_config(cls: type[T], yaml_file: str | os.PathLike | None = None, **overrides: Any) -> T:
    """Build and validate a job config from defaults, an optional YAML file and overrides.

    ``None`` overrides are ignored so argparse defaults of ``None`` mean "not given".
    Unknown keys raise :class:`ConfigError` listing the valid ones.
    """
    values: dict[str, Any] = {}
    if yaml_file:
        import yaml

        path = Path(yaml_file)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of key: value")
        values.update(loaded)
    values.update({k.split(".")[-1]: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(known)}")
    kwargs = {k: _coerce(v, known[k].type, k) for k, v in values.items()}
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """Parse repeated ``--set key=value`` flags."""
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out
