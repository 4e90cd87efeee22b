"""Human-facing output: one rich console on stderr (stdout stays clean for machine-readable
summaries), progress bars that degrade to a final line when not attached to a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# markup=False: paths, class names and error messages hold user text, and rich would read "[red]" or
# "[/2024]" in them as markup (dropping it, or raising MarkupError and losing the real message). A call
# that wants colour passes style=, or markup=True around text escaped with rich.markup.escape.
console = Console(stderr=True, highlight=False, markup=False)
logger = logging.getLogger("diffmix_ray")


def setup_logging(verbose: bool = False) -> None:
    if logger.handlers:
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose or os.environ.get("DIFFMIX_DEBUG") else logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator["callable"]:
    """Yields advance(n=1). A bar on a terminal; in job logs (no TTY) rich prints the final state."""
    if not enabled:
        yield lambda n=1: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
