"""The ``alpamayo-cache`` command line, generated from the stage config dataclasses.

Each command is one config class plus the stage function that takes it. Every field declared with
``options.option`` becomes ``--field-name`` (help and default from the declaration); every command also
takes ``--config FILE`` (JSON), ``--set field=value`` and ``--debug``. Precedence: defaults, then the
config file, then options given, then ``--set``. Heavy libraries are imported inside the stage
functions, so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from alpamayo_cache.errors import UserError
from alpamayo_cache.stages import COMMANDS, Command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune Alpamayo-R1's action expert from a cached, frozen-VLM feature store.",
)


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(type typer should parse, repeatable?) for a field type; None when the CLI cannot express it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else (str, False)
    if origin is typing.Literal:
        return str, False
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float, Path):
            return list[args[0]], True  # repeatable option
        return None, False
    if tp in (str, int, float, bool, Path):
        return tp, False
    return None, False


def _metavar(cli_type: Any) -> str:
    inner = typing.get_args(cli_type)[0] if typing.get_origin(cli_type) is list else cli_type
    return {str: "TEXT", int: "INT", float: "NUMBER", Path: "PATH"}[inner]


def _show_default(value: Any) -> str | bool:
    if value is None or value == ():
        return "none"  # unset: the option's help says what that means
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """typer parameters for every CLI field of ``cls``; returns (parameters, python name -> field)."""
    hints = typing.get_type_hints(cls)
    params: list[inspect.Parameter] = []
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        cli_type, _ = _cli_type(hints[f.name])
        if cli_type is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = meta.get("help", "")
        typ = typing.get_origin(hints[f.name])
        if typ is typing.Literal:
            help_text += f" One of: {', '.join(map(str, typing.get_args(hints[f.name])))}."
        if meta.get("positional"):
            info = typer.Argument(help=help_text, show_default=_show_default(default), metavar=f.name.upper())
            annotation = Annotated[cli_type | None, info]  # type: ignore[valid-type]
        else:
            flag = meta.get("flag") or "--" + f.name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if cli_type is bool else [flag]
            metavar = None if cli_type is bool else _metavar(cli_type)
            info = typer.Option(*decls, help=help_text, show_default=_show_default(default), metavar=metavar)
            annotation = Annotated[cli_type | None, info]  # type: ignore[valid-type]
        python_name = f"opt_{f.name}"
        names[python_name] = f.name
        params.append(
            inspect.Parameter(
                python_name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )
    params.sort(key=lambda p: not _is_argument(p))  # arguments first, as click expects
    return params, names


def _is_argument(p: inspect.Parameter) -> bool:
    return any(isinstance(m, typer.models.ArgumentInfo) for m in typing.get_args(p.annotation)[1:])


_COMMON_PARAMS = [
    inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None, typer.Option("--config", help="JSON file of fields (applied before options).")
        ],
    ),
    inspect.Parameter(
        "set_",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            list[str] | None,
            typer.Option("--set", help="Override any field, e.g. --set lr=3e-4 (JSON values; repeatable)."),
        ],
    ),
    inspect.Parameter(
        "debug",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")],
    ),
]


def run_guarded(action: Callable[[], Any], debug: bool) -> Any:
    """One line ``error: ...`` and exit status 2 for anything a user can cause; 130 on Ctrl-C."""
    from alpamayo_cache.runtime import init_logging

    init_logging()
    try:
        return action()
    except UserError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        typer.secho("interrupted", err=True, fg="yellow")
        raise typer.Exit(130) from None


def _make_command(command: Command) -> Callable[..., None]:
    params, names = _parameters(command.config)

    def handler(**kwargs: Any) -> None:
        from alpamayo_cache import options

        def go() -> Any:
            given = {names[k]: v for k, v in kwargs.items() if k in names and v is not None}
            given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()}
            cfg = options.build(command.config, kwargs.get("config"), given, list(kwargs.get("set_") or ()))
            return command.run(cfg)

        run_guarded(go, bool(kwargs.get("debug")))

    signature = inspect.Signature([*params, *_COMMON_PARAMS])
    handler.__signature__ = signature  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    handler.__doc__ = command.help
    return handler


for _command in COMMANDS:
    app.command(_command.name, help=_command.help)(_make_command(_command))


def main() -> None:  # pragma: no cover - console entry for `python -m alpamayo_cache`
    app(sys.argv[1:])
