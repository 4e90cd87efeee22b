"""`--help` of every command and sub-command, compared with the committed snapshots in tests/data/cli_help/.

The options users type (names, defaults, help text) must not change by accident: the CLI is generated
from the stage configs, and this is what shows a refactor kept it the same. After a deliberate change,
regenerate the snapshots and commit them with the change:
    UPDATE_CLI_HELP=1 python -m pytest -q tests/cli/test_cli_help.py"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import DATA

SNAPSHOTS = DATA / "cli_help"

# Rendered in a subprocess so the width and colour settings hold from the moment typer and rich import.
_RENDER = r"""
import json, typer.main
from typer.testing import CliRunner
from diffmix_ray.cli import app

def walk(cmd, path):
    yield path
    for name in sorted(getattr(cmd, "commands", {}) or {}):
        yield from walk(cmd.commands[name], path + [name])

runner = CliRunner()
helps = {}
for path in walk(typer.main.get_command(app), []):
    result = runner.invoke(app, path + ["--help"], prog_name="diffmix-ray")
    helps[" ".join(path) or "diffmix-ray"] = (result.exit_code, result.output)
print(json.dumps(helps))
"""


def _render() -> dict[str, tuple[int, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS")}
    env.update(COLUMNS="200", TERMINAL_WIDTH="200", NO_COLOR="1", TERM="dumb", LINES="50")
    out = subprocess.run([sys.executable, "-c", _RENDER], env=env, capture_output=True, text=True, check=True)
    return {name: tuple(v) for name, v in json.loads(out.stdout).items()}


def _file(name: str) -> Path:
    return SNAPSHOTS / (name.replace(" ", "__") + ".txt")


@pytest.fixture(scope="module")
def helps():
    return _render()


def test_every_command_has_a_snapshot(helps):
    if os.environ.get("UPDATE_CLI_HELP"):
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SNAPSHOTS.glob("*.txt"):
            old.unlink()
        for name, (_, text) in helps.items():
            _file(name).write_text(text)
    assert sorted(p.stem for p in SNAPSHOTS.glob("*.txt")) == sorted(_file(n).stem for n in helps), (
        "commands were added or removed: regenerate with UPDATE_CLI_HELP=1 and review the diff")


def test_help_matches_snapshot(helps):
    changed = []
    for name, (code, text) in helps.items():
        assert code == 0, f"`diffmix-ray {name} --help` exited {code}:\n{text}"
        path = _file(name)
        if path.exists() and path.read_text() != text:
            changed.append(name)
    assert not changed, (f"--help changed for {changed}; compare with tests/data/cli_help/ (regenerate with "
                         "UPDATE_CLI_HELP=1 only for a deliberate change)")
