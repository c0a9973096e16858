"""Options: one declaration per setting, from which the CLI, config files and ``--set`` are derived.

Every stage reads a frozen dataclass. A field is declared once with ``option(default, help=...)``; the
CLI (``cli.py``) turns each field into ``--field-name`` with that help and default, a JSON config file
may set any field, and ``--set field=value`` (or ``--set section.field=value`` for nested dataclasses)
overrides it. Values are checked against the field's type here, so ``--set steps=ten`` is a one-line
error instead of a traceback; ranges are checked by each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from alpamayo_cache.errors import UserError


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    flag: str | None = None,
    positional: bool = False,
    cli: bool = True,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its help text. ``flag`` renames the CLI option (``--train`` for ``scope``);
    ``positional`` makes it an argument; ``cli=False`` keeps it to config files and ``--set``."""
    meta = {"help": help, "flag": flag, "positional": positional, "cli": cli}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _union(value: Any, tp: Any, where: str) -> Any:
    options = typing.get_args(tp)
    if value is None and type(None) in options:
        return None
    errors = []
    for option_type in options:
        if option_type is type(None):
            continue
        try:
            return coerce(value, option_type, where)
        except UserError as exc:
            errors.append(str(exc))
    raise UserError(errors[0] if errors else f"{where}: unsupported value {value!r}")


def _tuple(value: Any, tp: Any, where: str) -> tuple:
    args = typing.get_args(tp)
    if isinstance(value, str):  # a CLI string "a,b"
        value = [v for v in value.split(",") if v] if value else []
    if not isinstance(value, list | tuple):
        raise UserError(f"{where} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], where) for v in value)
    if len(value) != len(args):
        raise UserError(f"{where} must have {len(args)} values, got {len(value)}")
    return tuple(coerce(v, a, where) for v, a in zip(value, args, strict=True))


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value) if isinstance(value, int | float | str) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # "--set name=7" parses as JSON 7
    return None


def _path(value: Any) -> Path | None:
    return Path(value) if isinstance(value, str | Path) and str(value) else None


# Scalar types: (parser returning None when the value does not fit, what the error says it must be).
_SCALARS: dict[Any, tuple[Any, str]] = {
    bool: (_bool, "true or false"),
    int: (_int, "an integer"),
    float: (_float, "a finite number"),
    str: (_str, "text"),
    Path: (_path, "a path"),
}


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from JSON, a CLI string, or Python) as type ``tp``, or a UserError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(value, tp, where)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise UserError(f"{where} must be one of {list(typing.get_args(tp))}, got {value!r}")
    if origin is tuple:
        return _tuple(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where} must be an object, got {value!r}")
        return from_dict(tp, value, where)
    if tp in _SCALARS:
        parse, kind = _SCALARS[tp]
        parsed = parse(value)
        if parsed is None:
            raise UserError(f"{where} must be {kind}, got {value!r}")
        return parsed
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise UserError(f"{where} must be an object, got {value!r}")
    if tp is Any:
        return value
    raise UserError(f"{where}: unsupported type {_describe(tp)}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a JSON-like dict, checking names and types."""
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(
            f"{where or cls.__name__}: unknown field {unknown[0]!r}; known fields: {', '.join(names)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid JSON ({exc}): fix it or drop --config") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object of field: value")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as JSON when it parses, else the text)."""
    if "=" not in item:
        raise UserError(f"--set {item!r} must look like field=value (or section.field=value)")
    dotted, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return dotted.split("."), value


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Apply ``--set`` overrides to a frozen dataclass (nested fields by dotted path)."""
    for item in overrides:
        parts, value = parse_set(item)
        obj = _replace_path(obj, parts, value, ".".join(parts))
    return obj


def _replace_path(obj: Any, parts: list[str], value: Any, dotted: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    if parts[0] not in names:
        raise UserError(
            f"--set {dotted}: {type(obj).__name__} has no field {parts[0]!r} (fields: {', '.join(names)})"
        )
    hints = field_types(type(obj))
    if len(parts) == 1:
        new = coerce(value, hints[parts[0]], dotted)
    else:
        child = getattr(obj, parts[0])
        if not dataclasses.is_dataclass(child):
            raise UserError(f"--set {dotted}: {parts[0]} has no sub-fields")
        new = _replace_path(child, parts[1:], value, dotted)
    return dataclasses.replace(obj, **{parts[0]: new})


def build(cls: type, config_file: Path | None, given: dict[str, Any], sets: list[str]) -> Any:
    """defaults -> config file -> options given on the command line -> ``--set`` overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in given.items() if v is not None})
    cfg = from_dict(cls, values)
    return apply_overrides(cfg, sets)


def to_jsonable(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON (paths as text, tuples as lists), e.g. for a run's config.json."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
