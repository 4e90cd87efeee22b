"""Config precedence shared by every command: dataclass defaults < YAML file < command-line flags."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import yaml

from .errors import DiffmixError

T = TypeVar("T")


def load_yaml(uri: str | None) -> dict[str, Any]:
    if not uri:
        return {}
    from . import storage  # pyarrow and fsspec: only when a file is read, not for --help

    try:
        data = yaml.safe_load(storage.read_text(uri)) or {}
    except yaml.YAMLError as e:
        raise DiffmixError(f"--config {uri} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DiffmixError(f"--config {uri} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], config_file: str | None, flags: dict[str, Any]) -> T:
    """Build `cls` from a YAML file and the flags the user actually gave (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged = load_yaml(config_file)
    unknown = sorted(set(merged) - names)
    if unknown:
        raise DiffmixError(f"--config {config_file}: unknown option(s) {unknown}; valid: {sorted(names)}")
    merged.update({k: v for k, v in flags.items() if v is not None and k in names})
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in merged
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DiffmixError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    check_finite({k: v for k, v in merged.items() if k in names})
    return cls(**{k: v for k, v in merged.items() if k in names})


def _numbers(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def check_finite(options: dict[str, Any]) -> None:
    """The one numeric check every command's options pass (flags and YAML alike): NaN and infinity
    are never valid. Python compares NaN false with everything, so range checks let it through, and
    a NaN would travel into plans, weights and JSON as if it were a number."""
    for name, value in options.items():
        if not all(math.isfinite(x) for x in _numbers(value)):
            shown = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            flag = name if name.startswith("-") else "--" + name.replace("_", "-")
            raise DiffmixError(f"{flag} {shown} is not a finite number; give a finite value (nan and inf are "
                               "never valid options)")


# ---------------------------------------------------------------------------------------------
# Options: a config field that carries its flag, help and place in the run's identity
# ---------------------------------------------------------------------------------------------
# How a field enters the identity of the output it helps write (what a rerun must match to resume):
IDENTITY = "identity"  # always: it decides what is written
EXECUTION = "execution"  # never: how the work runs (workers, batch size...); a resume may change it
INPUT = "input"  # never as written: it names an input, whose fingerprint the stage adds to the identity
# Added after outputs were written: in the identity only when not at its default, so those outputs
# (written without it, i.e. at its default) keep their identity and resume.
UNLESS_DEFAULT = "unless-default"


@dataclasses.dataclass(frozen=True)
class Option:
    """What the command line and the identity need to know about one config field."""

    help: str
    identity: str = IDENTITY  # IDENTITY | EXECUTION | INPUT | UNLESS_DEFAULT
    flags: tuple[str, ...] = ()  # typer's spelling when not --field-name: ("--compile/--no-compile",), ("-f",)
    cli_type: Any = None  # the type typer parses when it is not the field's (e.g. str for "0.3,0.5")
    parse: Any = None  # command-line value -> field value (comma lists, files of names)
    after: str | None = None  # in --help, right after this option (fields a base class declares)
    cli: bool = True  # False: YAML and Python only


def option(default: Any = dataclasses.MISSING, *, help: str, identity: str = IDENTITY, flags: tuple[str, ...] = (),
           cli_type: Any = None, parse: Any = None, after: str | None = None, cli: bool = True,
           default_factory: Any = dataclasses.MISSING, kw_only: Any = dataclasses.MISSING):
    """A dataclass field that is also a command-line option: written once, here."""
    if identity not in (IDENTITY, EXECUTION, INPUT, UNLESS_DEFAULT):
        raise ValueError(f"identity={identity!r}: choose IDENTITY, EXECUTION, INPUT or UNLESS_DEFAULT")
    meta = Option(help, identity, tuple(flags), cli_type, parse, after, cli)
    return dataclasses.field(default=default, default_factory=default_factory, kw_only=kw_only,
                             metadata={"option": meta})


def option_of(f: dataclasses.Field) -> Option | None:
    return f.metadata.get("option")


def flag(f: dataclasses.Field) -> str:
    """The flag users type for a field: --field-name, or its Option's own spelling (--from, --compile)."""
    spelled = [d.split("/")[0] for d in (option_of(f).flags if option_of(f) else ()) if d.startswith("--")]
    return spelled[0] if spelled else "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def identity(cfg: Any) -> dict[str, Any]:
    """The options that decide what `cfg`'s run writes, read from the fields' metadata: a rerun with
    the same identity resumes; a different one is refused unless --overwrite. Fields without an
    Option (test hooks) never enter it. A stage adds what its inputs hold (fingerprints)."""
    out = {}
    for f in dataclasses.fields(cfg):
        meta = option_of(f)
        if meta is None or meta.identity in (EXECUTION, INPUT):
            continue
        value = getattr(cfg, f.name)
        if meta.identity == UNLESS_DEFAULT and value == _default(f):
            continue
        out[f.name] = value
    return out


def cli_fields(*classes: type) -> list[dataclasses.Field]:
    """The command-line options of one config class (or the union of several, the first's field winning
    a shared name) in --help order: each class's own declaration order (a field a base class declares and
    the class redeclares sits where the class puts it), then its bases'; a field with `after=` moves right
    behind the option it names, when there is one (several behind one keep their order)."""
    names: list[str] = []
    by_name: dict[str, dataclasses.Field] = {}
    for cls in classes:
        fields = {f.name: f for f in dataclasses.fields(cls) if option_of(f) is not None and option_of(f).cli}
        for klass in cls.__mro__:
            for name in getattr(klass, "__annotations__", {}):
                if name in fields and name not in by_name:
                    names.append(name)
                    by_name[name] = fields[name]
    last_behind: dict[str, str] = {}
    for name in [n for n in names if option_of(by_name[n]).after in by_name]:
        target = option_of(by_name[name]).after
        names.remove(name)
        names.insert(names.index(last_behind.get(target, target)) + 1, name)
        last_behind[target] = name
    return [by_name[n] for n in names]
