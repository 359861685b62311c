"""Progress of a batch run on screen: one bar over all mosaics and one for the current mosaic."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

from rcmseg.batch.jobs import MosaicJob

console = Console(stderr=True)  # progress, warnings and failures; the summary goes to stdout


class MosaicProgress:
    """Progress callbacks of a batch run; the base class shows nothing."""

    def begin(self, job: MosaicJob, steps: int) -> None:
        """A mosaic starts: ``steps`` = 1 for reading + bands to segment + 1 for writing."""

    def step(self, stage: str) -> None:
        """One step done; ``stage`` names the next one."""

    def mosaic_done(self) -> None:
        """The mosaic is finished, skipped or failed."""


class RichBatchProgress(MosaicProgress):
    """A rich progress display: one bar over all mosaics, one for the current mosaic."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.display = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.overall = self.display.add_task("mosaics", total=total)
        self.current = self.display.add_task("", total=1, visible=False)
        self.name = ""

    def begin(self, job: MosaicJob, steps: int) -> None:
        self.name = escape(job.relative)
        self.display.reset(
            self.current, total=steps, visible=True, description=f"{escape(job.relative)}: reading"
        )

    def step(self, stage: str) -> None:
        self.display.update(self.current, advance=1, description=f"{self.name}: {stage}")

    def mosaic_done(self) -> None:
        self.display.update(self.current, visible=False)
        self.display.advance(self.overall)


@contextlib.contextmanager
def batch_progress(show: bool, total: int) -> Iterator[MosaicProgress]:
    """Rich bars when ``show`` (they hide themselves on a non-terminal), else nothing."""
    if not show:
        yield MosaicProgress()
        return
    progress = RichBatchProgress(total)
    with progress.display:
        yield progress
