"""Reading recipe files: where they live, `extends` (a partial the file builds on) and `matrix`
(one file, several recipes: one per combination of its axes). What comes out is a plain mapping per
recipe; recipes.py types and validates it.

    extends: _base                # a file in the same folder (names starting "_" are partials, not recipes)
    name: "conventional-{dataset}-{backbone}"
    matrix:                       # one recipe per combination, in file order; each value's mapping is
      dataset:                    # merged over the file's own keys (axis by axis, in order)
        cub: {prepare: {format: cub}}
      backbone:
        resnet50-448: {train_cls: {arch: resnet50}}
    cells:                        # then what one combination alone sets ("value/value", axis order)
      cub/resnet50-448: {train_cls: {lr: 0.025}}

`name` and `table` may use the axes in braces ("{dataset}"). Merging is deep for mappings; a list
or a scalar replaces what was there, and null resets a stage option to its default."""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path

import yaml

from ..errors import DiffmixError

RECIPES_ENV = "DIFFMIX_RECIPES"  # a folder of recipe files, searched first
RECIPES_SUBDIR = Path("jobs") / "configs" / "paper"
FILE_KEYS = ("extends", "name", "matrix", "cells")  # consumed here, never part of a recipe


def recipe_dirs() -> list[Path]:
    """Folders searched for recipe files: $DIFFMIX_RECIPES, the source checkout this package runs
    from, and the working directory (a Ray job's working_dir is the uploaded repo)."""
    found = []
    candidates = [os.environ.get(RECIPES_ENV), Path(__file__).resolve().parents[2] / RECIPES_SUBDIR,
                  Path.cwd() / RECIPES_SUBDIR]
    for c in candidates:
        if c and Path(c).is_dir() and Path(c).resolve() not in [f.resolve() for f in found]:
            found.append(Path(c))
    return found


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DiffmixError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise DiffmixError(f"recipe file {path} must hold a mapping (recipe keys at the top level)")
    return data


def load_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A file with its `extends` chain merged in (the file's own keys win)."""
    path = path.resolve()
    if path in _seen:
        raise DiffmixError(f"recipe file {path} extends itself (via {' -> '.join(p.name for p in _seen)})")
    data = _read(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise DiffmixError(f"{path}: extends must name one file of the same folder, e.g. extends: _base")
    parent_path = path.parent / (parent if parent.endswith(".yaml") else f"{parent}.yaml")
    if not parent_path.is_file():
        raise DiffmixError(f"{path}: extends {parent!r}, but {parent_path} does not exist")
    return deep_merge(load_file(parent_path, _seen + (path,)), data)


def expand(path: Path) -> dict[str, dict]:
    """Recipe name -> its mapping, for every recipe a file defines (one, or one per matrix cell)."""
    data = load_file(path)
    matrix, cells, template = data.pop("matrix", None), data.pop("cells", None) or {}, data.pop("name", None)
    if matrix is None:
        if cells:
            raise DiffmixError(f"{path}: `cells` set values per matrix combination, but the file has no `matrix`")
        return {template or path.stem: data}
    if not isinstance(matrix, dict) or not matrix or not all(isinstance(v, dict) and v for v in matrix.values()):
        raise DiffmixError(f"{path}: `matrix` maps each axis to its values, each with a mapping of what it sets "
                           "(e.g. matrix: {shots: {1: {derive: {shots: 1}}}})")
    cells = {str(k): v for k, v in cells.items()}  # YAML reads `16:` as the integer 16
    axes = list(matrix)
    template = template or path.stem + "".join(f"-{{{a}}}" for a in axes)
    combos = list(itertools.product(*[[str(v) for v in matrix[a]] for a in axes]))
    known = {"/".join(c) for c in combos}
    if unknown := sorted(set(cells) - known):
        raise DiffmixError(f"{path}: cells {unknown} match no matrix combination; combinations are "
                           f"'{'/'.join(axes)}' values, e.g. {sorted(known)[:3]}")
    out = {}
    for combo in combos:
        recipe = data
        for axis, value in zip(axes, combo):
            recipe = deep_merge(recipe, _value(matrix[axis], value) or {})
        recipe = deep_merge(recipe, cells.get("/".join(combo)) or {})
        values = dict(zip(axes, combo))
        try:
            name = template.format(**values)
            if isinstance(recipe.get("table"), str):  # the table's title names its cell too
                recipe["table"] = recipe["table"].format(**values)
        except (KeyError, IndexError, ValueError) as e:
            raise DiffmixError(f"{path}: name/table templates may use only the matrix axes {axes} in braces "
                               f"({type(e).__name__}: {e})") from None
        out[name] = recipe
    return out


def _value(values: dict, key: str):
    """A matrix axis value by its string form (YAML reads `1:` as the integer 1)."""
    for k, v in values.items():
        if str(k) == key:
            return v
    raise KeyError(key)


def all_recipe_files() -> list[Path]:
    files: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if not path.name.startswith("_"):
                files.setdefault(path.name, path)  # the first folder searched wins
    return list(files.values())


def find(name_or_path: str) -> tuple[str, dict, Path]:
    """(name, mapping, file) of a recipe given by name, or by path to a file defining one recipe
    (or NAME@FILE for one of a matrix file's)."""
    name, _, file = name_or_path.partition("@") if "@" in name_or_path else ("", "", "")
    path = Path(file or name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        recipes = expand(path)
        if name:
            if name not in recipes:
                raise DiffmixError(f"{path} defines no recipe {name!r}; it defines {', '.join(recipes)}")
            return name, recipes[name], path
        if len(recipes) != 1:
            raise DiffmixError(f"{path} defines {len(recipes)} recipes ({', '.join(recipes)}): pick one as "
                               f"NAME@{path}")
        ((only, recipe),) = recipes.items()
        return only, recipe, path
    known: dict[str, tuple[dict, Path]] = {}
    for f in all_recipe_files():
        for n, r in expand(f).items():
            known.setdefault(n, (r, f))
    if name_or_path in known:
        recipe, f = known[name_or_path]
        return name_or_path, recipe, f
    where = ", ".join(str(d) for d in recipe_dirs()) or f"no folder found (set {RECIPES_ENV})"
    close = [n for n in known if name_or_path.lower() in n.lower()]
    raise DiffmixError(f"no recipe named {name_or_path!r} (searched {where}). "
                       + (f"Close: {', '.join(close[:8])}. " if close else "")
                       + f"Known: {', '.join(sorted(known)) or 'none'}; `diffmix-ray recipe list` describes them, "
                       "or pass the path of a recipe file")
