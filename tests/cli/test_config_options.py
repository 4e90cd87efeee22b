"""Config fields as the one source of options: a field's metadata (config.option) gives its flag, help and
place in the run's identity; the command line is generated from it (cli_config) and the identity derived
from it (config.identity). No Ray: milliseconds."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from diffmix_ray import config, storage
from diffmix_ray.cli_config import config_command
from diffmix_ray.config import EXECUTION, INPUT, UNLESS_DEFAULT, option
from diffmix_ray.errors import DiffmixError
from tests.paths import PACKAGE


def _numbers(text: str, flag: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Base:
    batch_size: int
    workers: int = option(1, identity=EXECUTION, after="batch_size", help="Workers.")
    cpus: float = option(1.0, identity=EXECUTION, after="batch_size", help="CPUs.")


@dataclasses.dataclass(frozen=True)
class Example(Base):
    source: str = option(identity=INPUT, help="Input URI.")
    seed: int = option(0, help="Seed.")
    batch_size: int = option(8, identity=EXECUTION, kw_only=True, help="Batch.")
    steps: tuple[int, ...] = option((), cli_type=str, parse=_numbers, help="Steps, comma-separated.")
    fast: bool = option(False, flags=("--fast/--no-fast",), help="Go fast.")
    later: str = option("old", identity=UNLESS_DEFAULT, help="Added later.")
    hidden: int = option(3, cli=False, help="YAML only.")
    _hook: int = 0  # no Option: never on the command line, never in the identity


def test_identity_is_read_from_the_metadata():
    cfg = Example(source="s3://b/x", seed=3, workers=9, batch_size=2, _hook=5)
    assert config.identity(cfg) == {"seed": 3, "steps": (), "fast": False, "hidden": 3}
    assert config.identity(dataclasses.replace(cfg, later="new"))["later"] == "new"  # off its default: counted
    # execution options and the hook may change between a run and its resume; inputs enter as fingerprints
    assert config.identity(dataclasses.replace(cfg, workers=1, cpus=4.0, batch_size=64, _hook=0, source="other")) \
        == config.identity(cfg)


def test_help_order_is_the_declaration_order_with_base_fields_moved_behind_their_anchor():
    names = [f.name for f in config.cli_fields(Example)]
    assert names == ["source", "seed", "batch_size", "workers", "cpus", "steps", "fast", "later"]


def _app(seen: list) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @config_command(Example, place={"config": "source", "dry": "seed"})
    def run(cfg: Example, dry: Optional[bool] = typer.Option(None, "--dry"),
            overwrite: bool = typer.Option(False, help="Replace.")):
        seen.append((cfg, dry, overwrite))

    return app


def test_generated_command_parses_flags_over_yaml_over_defaults(tmp_path):
    seen: list = []
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("seed: 7\nbatch-size: 4\nhidden: 5\n")
    res = CliRunner().invoke(_app(seen), ["--source", "x", "--config", str(yaml_file), "--batch-size", "16",
                                          "--steps", "1,2", "--fast", "--overwrite"])
    assert res.exit_code == 0, res.output
    cfg, dry, overwrite = seen[0]
    assert cfg == Example(source="x", seed=7, batch_size=16, steps=(1, 2), fast=True, hidden=5)
    assert dry is None and overwrite is True


def test_generated_help_carries_each_fields_help_in_order():
    res = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    flags = [w for w in res.output.split() if w.startswith("--") and w != "--help"]
    assert flags[:7] == ["--source", "--config", "--seed", "--dry", "--batch-size", "--workers", "--cpus"]
    assert "--hidden" not in flags and "--hook" not in flags and "--no-fast" in flags
    assert "Steps, comma-separated." in res.output


def test_a_missing_required_option_names_its_flag():
    with pytest.raises(DiffmixError, match="--source"):
        config.build(Example, None, {})


def test_option_refuses_an_unknown_identity_kind():
    with pytest.raises(ValueError, match="identity="):
        option(1, identity="sometimes", help="x")


# Hashes of the identities the code before config.option wrote (computed on main before this change): runs
# written then must keep resuming, so the derived identity must hash the same.
def test_identities_hash_as_before():
    from diffmix_ray.classify import run as crun
    from diffmix_ray.classify.config import ClassifyConfig
    from diffmix_ray.finetune.config import FinetuneConfig
    from diffmix_ray.generate.config import GenerateConfig
    from diffmix_ray.generate.run import _normalized

    cases = {
        "56bdbfcb4884c61f": FinetuneConfig(dataset="d", out="o").identity(),
        "880a0896542d3165": FinetuneConfig(dataset="d", out="o", mode="ti", token_schedule="per-class", workers=2,
                                           compile=True).identity(),
        "327607a9ce2aabfa": _normalized(config.identity(GenerateConfig(dataset="d", out="o"))),
        "36524ea60ada9f18": _normalized(config.identity(GenerateConfig(dataset="d", out="o", strength_set=(0.3, 0.5),
                                                                       max_actors=4, batch_size=2, limit=7))),
        "7575e6696dc94c07": crun._identity(ClassifyConfig(dataset="d", arch="a", out="o"), "fp", ["s"], None),
        "d03fd0809fea5392": crun._identity(ClassifyConfig(dataset="d", arch="a", out="o", synthetic=("s",),
                                                          synthetic_filter="clip_target_prob>=0.2", soft_scaler=0.9,
                                                          workers=4, gpu_decode=True), "fp", ["s"], None),
    }
    assert {h: storage.config_hash(ident) for h, ident in cases.items()} == {h: h for h in cases}


def test_prepare_identity_is_the_whole_config():
    from diffmix_ray.data.prepare import DeriveConfig, PrepareConfig

    for cfg in (PrepareConfig("imagefolder", "src", class_names=("a", "b")), DeriveConfig(parent="p", shots=2)):
        assert config.identity(cfg) == dataclasses.asdict(cfg)


def test_only_the_command_line_modules_import_typer():
    """Commands live in cli.py (generated through cli_config.py): the stages and runtime parse nothing."""
    import ast

    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "typer" or n.startswith("typer.") for n in names):
                importers.add(str(path.relative_to(PACKAGE)))
    assert importers == {"cli.py", "cli_config.py"}
