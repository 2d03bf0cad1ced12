"""Command-line options built from ``TrainConfig``'s fields, so no command spells a training option twice.

Every generated option is Optional with default None, meaning "not given": ``resolve_config`` then applies
defaults < preset < config file < command line. The help text comes from each field's ``metadata["help"]``
and the default shown from the field itself; a field's ``metadata["bounds"]`` becomes the option's range
check, so the command line refuses what ``TrainConfig.validate`` would (before any work, exit 2).
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any, Callable, Iterable, Optional, TypeVar

import typer

from cxrnn.cli.common import in_range
from cxrnn.training.config import TrainConfig

Command = TypeVar("Command", bound=Callable[..., Any])
SCALARS = (str, int, float, bool)


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(hint: Any) -> type | None:
    """``int`` for ``int`` or ``int | None``; None for anything a single option cannot hold (dicts)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in SCALARS else None


def _field_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _declaration(f: Field, kind: type) -> str:
    if kind is not bool:
        return option_name(f.name)
    if "flag" in f.metadata:
        return f.metadata["flag"]
    # A switch that defaults to on needs its "off" spelling; one that defaults to off only needs "on".
    return f"{option_name(f.name)}/--no-{f.name.replace('_', '-')}" if _field_default(f) else option_name(f.name)


def _shown_default(f: Field, kind: type, declaration: str) -> str | bool:
    default = _field_default(f)
    if kind is bool:
        on, _, off = declaration.partition("/")
        return (on if default else off) or False
    return False if default in (None, "") else str(default)


def cli_fields() -> list[Field]:
    """TrainConfig's fields that have a command-line option (all but those marked ``cli=False``)."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli", True)]


def config_parameters(names: Iterable[str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer option per TrainConfig field (all by default, else ``names`` in field order)."""
    hints = typing.get_type_hints(TrainConfig)
    wanted = None if names is None else set(names)
    available = {f.name for f in cli_fields()}
    if wanted is not None and wanted - available:
        raise ValueError(f"no command-line option for TrainConfig field(s): {', '.join(sorted(wanted - available))}")
    params = []
    for f in cli_fields():
        if wanted is not None and f.name not in wanted:
            continue
        kind = _scalar_type(hints[f.name])
        if kind is None:
            raise TypeError(f"TrainConfig.{f.name} ({hints[f.name]}) has no command-line form: mark it cli=False")
        declaration = _declaration(f, kind)
        bounds = f.metadata.get("bounds")
        info = typer.Option(None, declaration, help=f.metadata.get("help", ""),
                            show_default=_shown_default(f, kind, declaration),
                            callback=in_range(bounds) if bounds is not None else None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=Optional[kind]))
    return params


def with_config_options(names: Iterable[str] | None = None) -> Callable[[Command], Command]:
    """Decorator: the command also takes TrainConfig's options; their values arrive in its ``**kwargs``.

    The command's own parameters come first and win over a field of the same name.
    """

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if len(own) == len(signature.parameters):
            raise TypeError(f"{command.__name__} needs a **kwargs parameter to receive the config options")
        taken = {p.name for p in own}
        extra = [p for p in config_parameters(names) if p.name not in taken]
        command.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return command

    return decorate


def config_default(name: str) -> Any:
    """TrainConfig's default for ``name``: for commands whose options mean the same as a training option."""
    return _field_default(next(f for f in fields(TrainConfig) if f.name == name))


def config_range(name: str) -> Callable[[Any], Any]:
    """The range check of TrainConfig field ``name``, as a typer callback for a command's own option."""
    from cxrnn.training.config import field_bounds

    bounds = field_bounds(name)
    if bounds is None:
        raise ValueError(f"TrainConfig.{name} has no bounds")
    return in_range(bounds)


def config_help(name: str) -> str:
    return next(f for f in fields(TrainConfig) if f.name == name).metadata.get("help", "")
