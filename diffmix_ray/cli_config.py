"""Commands generated from the stage configs. A config field declared with `config.option(...)`
carries its help, flag spelling and place in the run's identity; `config_command` turns every such
field into a typer option, builds the config from the YAML file and the flags given (defaults <
--config < flags) and hands it to the command, so an option is written once, beside its field."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Optional

import typer

from .config import build, cli_fields, option_of

_KW = inspect.Parameter.KEYWORD_ONLY
CONFIG_HELP = "YAML file with any of these options."


def _cli_type(cls: type, f: dataclasses.Field) -> Any:
    meta = option_of(f)
    if meta.cli_type is not None:
        return meta.cli_type
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) in (tuple, list, dict):
        raise TypeError(f"{cls.__name__}.{f.name}: give option(cli_type=..., parse=...) for a {hint} field")
    return hint


def _help(cls: type, f: dataclasses.Field) -> str:
    """The field's help, with the {words} its config class says its own way (OPTION_HELP) filled in."""
    text = option_of(f).help
    for word, value in getattr(cls, "OPTION_HELP", {}).items():
        text = text.replace("{" + word + "}", value)
    return text


def option_parameters(*classes: type) -> list[inspect.Parameter]:
    """One keyword parameter per command-line field of the classes, as typer reads them: default None
    (= not given, so the YAML file or the field's default applies)."""
    params = []
    for f in cli_fields(*classes):
        cls = next(c for c in classes if f.name in {g.name for g in dataclasses.fields(c)})
        params.append(inspect.Parameter(f.name, _KW, annotation=Optional[_cli_type(cls, f)],
                                        default=typer.Option(None, *option_of(f).flags, help=_help(cls, f))))
    return params


def config_from_flags(cls: type, config_file: Optional[str], given: dict[str, Any]) -> Any:
    """`cls` from defaults < the YAML file < the flags given (each through its Option's parse)."""
    flags = {}
    for f in cli_fields(cls):
        value, parse = given.get(f.name), option_of(f).parse
        flags[f.name] = parse(value, "--" + f.name.replace("_", "-")) if parse and value is not None else value
    return build(cls, config_file, flags)


def config_command(classes: type | tuple[type, ...], *, pick: Optional[Callable[[dict], type]] = None,
                   place: Optional[dict[str, str]] = None, config_help: str = CONFIG_HELP,
                   name: str = "cfg") -> Callable:
    """Decorate `fn(..., cfg, ...)` into a typer command whose options are the config class's option
    fields plus --config, and which calls `fn` with the built config. Several classes (one command, two
    configs): their options' union, and `pick(given flags)` says which one to build (or refuses them).
    --help order: `fn`'s own parameters before `cfg`, the config's fields, --config, then `fn`'s own
    parameters after `cfg`; `place` moves --config or one of `fn`'s parameters right behind the field it
    names ({"config": "out"})."""
    classes = classes if isinstance(classes, tuple) else (classes,)

    def decorate(fn: Callable) -> Callable:
        own = [p.replace(kind=_KW) for p in inspect.signature(fn).parameters.values()]
        split = [p.name for p in own].index(name)
        config = inspect.Parameter("config", _KW, annotation=Optional[str],
                                   default=typer.Option(None, help=config_help))
        params = own[:split] + option_parameters(*classes) + [config] + own[split + 1:]
        for moved, behind in (place or {}).items():
            param = next(p for p in params if p.name == moved)
            params.remove(param)
            params.insert([p.name for p in params].index(behind) + 1, param)
        fields = {f.name for f in cli_fields(*classes)}

        def command(**kwargs):
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
            cls = pick(given) if pick else classes[0]
            return fn(**{name: config_from_flags(cls, kwargs.pop("config"), given)}, **kwargs)

        hints = typing.get_type_hints(fn)
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in params}
        command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        command.__module__ = fn.__module__
        return command

    return decorate
