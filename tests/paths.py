"""Where things are, for tests in any folder under tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffmix_ray"
DATA = REPO / "tests" / "data"  # committed fixtures: --help snapshots, an old-format checkpoint
