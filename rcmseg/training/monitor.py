"""What a run shows and records: the rich progress bar and the CSV/JSON training log."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rcmseg.io.atomic import write_csv_atomic, write_text_atomic

# the bar and the run's log lines; stdout keeps only the command's result
console = Console(stderr=True)

LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "loss",
    "dice_term",
    "tv_term",
    "tv_dice_ratio",
    "val_dice",
    "learning_rate",
    "patches",
    "seconds",
    "samples_per_s",
)


def make_progress(enabled: bool) -> Progress:
    """One bar per epoch with the running loss, TV/Dice ratio and the last validation Dice."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class _ConsoleHandler(logging.Handler):
    """Log records printed through the bar's console, one plain line each."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(self.format(record), highlight=False, markup=False, soft_wrap=True)


def show_log_above_the_bar() -> None:
    """Show rcmseg's INFO log (what is trained on what, one line per epoch) on stderr above the
    progress bar, through the bar's console so that the two do not garble each other."""
    rcmseg_log = logging.getLogger("rcmseg")
    if not any(isinstance(handler, _ConsoleHandler) for handler in rcmseg_log.handlers):
        rcmseg_log.addHandler(_ConsoleHandler())
    rcmseg_log.setLevel(logging.INFO)


def status_line(loss: float, tv_dice_ratio: float, val_dice: float) -> str:
    parts = [f"loss {loss:.4f}"]
    if not math.isnan(tv_dice_ratio):
        parts.append(f"TV/Dice {tv_dice_ratio:.3f}")
    if not math.isnan(val_dice):
        parts.append(f"val Dice {val_dice:.3f}")
    return "  ".join(parts)


def write_log(history: Sequence[dict[str, Any]], csv_path: Path) -> None:
    """Write the whole history as ``train_log.csv`` and ``train_log.json`` (rewritten each epoch,
    atomically, so a resumed or interrupted run's log matches its checkpoint)."""
    rows_out = ([row.get(column, "") for column in LOG_COLUMNS] for row in history)
    write_csv_atomic(csv_path, LOG_COLUMNS, rows_out)
    rows = [{key: _json_value(value) for key, value in row.items()} for row in history]
    write_text_atomic(csv_path.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")


def _json_value(value: Any) -> Any:
    """NaN (no validation that epoch) becomes null: JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value
