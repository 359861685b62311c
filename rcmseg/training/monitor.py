"""What a run shows and records: the rich progress bar and the CSV/JSON training log."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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
        disable=not enabled,
    )


def status_line(loss: float, tv_dice_ratio: float, val_dice: float) -> str:
    parts = [f"loss {loss:.4f}"]
    if not math.isnan(tv_dice_ratio):
        parts.append(f"TV/Dice {tv_dice_ratio:.3f}")
    if not math.isnan(val_dice):
        parts.append(f"val Dice {val_dice:.3f}")
    return "  ".join(parts)


def write_log(history: Sequence[dict[str, Any]], csv_path: Path) -> None:
    """Write the whole history as ``train_log.csv`` and ``train_log.json`` (rewritten each epoch,
    so a resumed run's log matches its checkpoint)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    rows = [{key: _json_value(value) for key, value in row.items()} for row in history]
    csv_path.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


def _json_value(value: Any) -> Any:
    """NaN (no validation that epoch) becomes null: JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value
