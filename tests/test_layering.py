"""Dependencies run one way: orchestration (demo, report, recipes, run) -> stages -> runtime and the
shared modules. Read from the source (every import statement, top-level or inside a function), so
a lazy import cannot slip an arrow the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffmix_ray"
STAGES = ("data", "finetune", "generate", "score", "classify")  # score: where that stage exists
ORCHESTRATION = "orchestrate"
RUNTIME = "runtime"
SHARED = ("models",)  # packages every stage may use: contracts, storage, ... are single modules


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every diffmix_ray module `path` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)  # `from .. import storage`
    return {n for n in found if n == "diffmix_ray" or n.startswith("diffmix_ray.")}


def _top(name: str) -> str | None:
    """The first-level part of diffmix_ray a module name belongs to (package or module)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules_of(part: str) -> list[Path]:
    folder = PACKAGE / part
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


@pytest.mark.parametrize("stage", [s for s in STAGES if (PACKAGE / s).is_dir()])
def test_a_stage_imports_neither_orchestration_nor_another_stage(stage):
    for path in _modules_of(stage):
        for name in _imports(path):
            top = _top(name)
            assert top not in (ORCHESTRATION, "cli"), f"{path.relative_to(PACKAGE)} imports {name}"
            assert top == stage or top not in STAGES, \
                f"{path.relative_to(PACKAGE)} imports {name}: a stage never imports another stage's internals"


@pytest.mark.parametrize("part", [RUNTIME, *SHARED])
def test_runtime_and_shared_packages_import_no_stage(part):
    for path in _modules_of(part):
        for name in _imports(path):
            assert _top(name) not in (*STAGES, ORCHESTRATION, "cli"), f"{path.relative_to(PACKAGE)} imports {name}"


def test_shared_modules_import_no_stage_runtime_or_orchestration():
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue  # the command line wires everything together
        for name in _imports(path):
            assert _top(name) not in (*STAGES, RUNTIME, ORCHESTRATION, "cli"), f"{path.name} imports {name}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The scan resolves `from ..x import y` inside functions, so the rules above have teeth."""
    fake = PACKAGE / "runtime" / "pool_stage.py"
    names = _imports(fake)
    assert "diffmix_ray.runtime.local_ray" in names and "diffmix_ray.runtime.metrics" in names  # a lazy import
    assert _imports(PACKAGE / "orchestrate" / "demo.py") >= {"diffmix_ray.orchestrate.recipes", "diffmix_ray.orchestrate.run"}
