"""Evaluation outputs: metric tables (CSV, Markdown laid out like the paper's Tables 2-3),
confusion-matrix heatmap and example overlays (PNG through PIL).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcmseg.classes import CLASS_NAMES
from rcmseg.io.atomic import write_csv_atomic

METRICS = ("sensitivity", "specificity", "dice")
ROWS = (*CLASS_NAMES, "mean")  # table rows: one per class, then the mean over classes


def format_value(mean: float, std: float | None = None) -> str:
    """``0.71`` or ``0.71 ± 0.09``; ``n/a`` for NaN (a class absent from the labelled pixels)."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if std is None or not np.isfinite(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the others right-aligned)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metric_rows(
    values: Mapping[str, np.ndarray], stds: Mapping[str, np.ndarray] | None = None
) -> list[list[str]]:
    """Rows of the paper's table: class, sensitivity, specificity, Dice; ``values[m]`` (K+1,)."""
    return [
        [name]
        + [
            format_value(float(values[m][i]), None if stds is None else float(stds[m][i]))
            for m in METRICS
        ]
        for i, name in enumerate(ROWS)
    ]


def csv_number(value: float) -> str:
    """A metric for CSV: 4 decimals, empty for NaN (spreadsheets read that as missing)."""
    return "" if not np.isfinite(value) else f"{value:.4f}"


def write_metric_csv(
    path: Path, values: Mapping[str, np.ndarray], stds: Mapping[str, np.ndarray] | None = None
) -> None:
    """One row per class and the mean: ``class,sensitivity,specificity,dice`` (+ ``_std``)."""
    header = ["class", *METRICS] + ([f"{m}_std" for m in METRICS] if stds is not None else [])
    rows = []
    for i, name in enumerate(ROWS):
        row = [name] + [csv_number(float(values[m][i])) for m in METRICS]
        if stds is not None:
            row += [csv_number(float(stds[m][i])) for m in METRICS]
        rows.append(row)
    write_csv_atomic(path, header, rows)


def write_confusion_csv(path: Path, confusion: np.ndarray) -> None:
    """Rows are the true class, columns the predicted class; counts of labelled pixels."""
    write_csv_atomic(
        path,
        ["truth \\ prediction", *CLASS_NAMES],
        [[name, *map(int, confusion[i])] for i, name in enumerate(CLASS_NAMES)],
    )


def confusion_heatmap(confusion: np.ndarray, cell: int = 72) -> Image.Image:
    """Row-normalised confusion matrix as a heatmap with the share (%) in each cell.

    Each row (true class) sums to 100 % of that class's labelled pixels, so the diagonal reads as
    sensitivity. White = 0 %, dark blue = 100 %.
    """
    k = confusion.shape[0]
    row_sums = confusion.sum(axis=1, keepdims=True).astype(np.float64)
    share = np.divide(confusion, row_sums, out=np.zeros(confusion.shape), where=row_sums > 0)
    font = ImageFont.load_default()
    margin = 90
    image = Image.new("RGB", (margin + k * cell, margin + k * cell + 20), "white")
    draw = ImageDraw.Draw(image)
    for i in range(k):
        for j in range(k):
            level = share[i, j]
            colour = tuple(int(255 - level * (255 - c)) for c in (8, 48, 107))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline="grey")
            text = f"{100 * level:.1f}%"
            draw.text(
                (x + 8, y + cell // 2 - 6),
                text,
                font=font,
                fill="white" if level > 0.5 else "black",
            )
    for i, name in enumerate(CLASS_NAMES[:k]):
        draw.text((4, margin + i * cell + cell // 2 - 6), name, font=font, fill="black")
        draw.text((margin + i * cell + 4, margin - 16), name[:11], font=font, fill="black")
    draw.text((margin, 4), "rows: truth, columns: prediction", font=font, fill="black")
    draw.text(
        (margin, margin + k * cell + 4),
        "share of each true class's labelled pixels",
        font=font,
        fill="black",
    )
    return image
