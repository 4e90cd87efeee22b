"""Config precedence shared by every command: dataclass defaults < YAML file < command-line flags."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import yaml

from . import storage
from .errors import DiffmixError

T = TypeVar("T")


def load_yaml(uri: str | None) -> dict[str, Any]:
    if not uri:
        return {}
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
