"""Job configuration: one frozen dataclass per job, validated once; its command-line flags are built from it.

Every job config subclasses :class:`JobConfig` (which holds the lake root) and implements
``validate()`` raising :class:`ConfigError` whose message says how to fix the value. Each field is
declared with :func:`option`, whose ``help`` documents it (the way ``HfArgumentParser`` reads
``metadata={"help": ...}``). :func:`add_config_flags` turns the class into argparse flags (one per
field, plus ``--config FILE.yaml`` and repeatable ``--set key=value``) and :func:`config_from_args`
turns the parsed flags back into the validated config; see it for the one precedence rule.
:func:`build_config` builds a config in code from (in increasing priority) defaults, an optional YAML
file and ``key=value`` overrides (dotted keys like ``cooccur.top_k=50`` reduce to ``top_k=50``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T", bound="JobConfig")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which one and how to fix it."""


class InputError(ValueError):
    """Bad user input (missing file, unknown column, ...); the message names it and the fix."""


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, aliases: Iterable[str] = (),
           group: str | None = None) -> Any:
    """A documented config field: ``help`` is its flag's help text (the default is appended to it),
    ``aliases`` are extra flag spellings beside ``--field-name`` (e.g. ``("--name",)``), and fields
    sharing a ``group`` get mutually exclusive flags. ``factory`` is a ``default_factory``."""
    metadata = {"help": help, "aliases": tuple(aliases), "group": group}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class JobConfig:
    """Fields shared by every job: the lake root (local path or object-store URI)."""

    lake: str = option("./lake", "lake root (local path or s3://, gs://, az:// URI)")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value. Subclasses call ``super().validate()``."""
        if not self.lake:
            raise ConfigError("lake is empty: pass --lake DIR (a local path or s3://, gs://, az:// URI)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view, recorded in the output tables' commit metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _resolve_type(tp: Any) -> Any:
    """The annotated type itself (annotations are strings under ``from __future__ import annotations``)."""
    return eval(tp, vars(typing) | {"Path": Path}) if isinstance(tp, str) else tp


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a string (from YAML/CLI) to the annotated field type."""
    tp = _resolve_type(tp)
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


# ----------------------------------------------------------------------------------- flags <-> config
def _flag_kwargs(f: Field, required: bool) -> dict[str, Any]:
    """argparse keywords of one field's flag. Values stay strings: :func:`build_config` converts them
    (the same path as ``--set`` and YAML), so every spelling of a value means the same thing."""
    tp = _resolve_type(f.type)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp)
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(default, tuple):
        shown = ",".join(map(str, default)) or "none"
    else:
        shown = repr(default) if isinstance(default, str) else str(default)
    text = f.metadata.get("help", "") + ("" if default is None or required else f" (default: {shown})")
    text = text.lstrip().replace("%", "%%")  # argparse formats help with %
    kw: dict[str, Any] = {"dest": f.name, "default": None, "help": text, "required": required}
    if tp is bool:
        kw.update(nargs="?", const="true", metavar="BOOL")  # `--gpu` alone means true
    elif origin is typing.Literal:
        kw["choices"] = list(typing.get_args(tp))
    elif origin in (tuple, list) or tp in (tuple, list):
        kw["metavar"] = "A,B,..."
    elif origin in (dict, Mapping) or tp is dict:
        kw["metavar"] = "K=V,..."
    return kw


def add_config_flags(parser: argparse.ArgumentParser, cls: type[JobConfig], required: Iterable[str] = ()) -> None:
    """Add one flag per field of ``cls`` (``--field-name`` and the field's aliases; help from
    :func:`option`), plus ``--config FILE.yaml`` and repeatable ``--set key=value`` for any field.
    Fields in ``required`` must be given as their flag. Read them back with :func:`config_from_args`."""
    required = set(required)
    groups: dict[str, Any] = {}
    for f in fields(cls):
        group = f.metadata.get("group")
        if group and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = groups[group] if group else parser
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        target.add_argument(*names, **_flag_kwargs(f, f.name in required))
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                        help=f"YAML file with any {cls.__name__} fields (key: value)")
    example = next((f.name for f in fields(cls) if f.name != "lake"), "lake")
    parser.add_argument("--set", dest="set", action="append", default=None, metavar="KEY=VALUE",
                        help=f"set any {cls.__name__} field by name, e.g. --set {example}=... (repeatable)")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The validated config from flags added by :func:`add_config_flags`.

    Precedence, one rule for every command: dataclass defaults < ``--config`` YAML < ``--set
    key=value`` < the field's own flag (``--lr 0.1`` beats ``--set lr=0.2``, which beats ``lr: 0.3``
    in the YAML file). A flag that is not given (``None``) sets nothing.
    """
    values = {k.split(".")[-1]: v for k, v in parse_overrides(getattr(args, "set", None)).items()}
    for f in fields(cls):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return build_config(cls, getattr(args, "config_file", None), **values)
