"""Evaluation outputs: metric tables (CSV, Markdown laid out like the paper's Tables 2-3),
confusion-matrix heatmap and example overlays (PNG through PIL).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcmseg.classes import CLASS_NAMES, colour_lut

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


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


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
    write_csv(path, header, rows)


def write_confusion_csv(path: Path, confusion: np.ndarray) -> None:
    """Rows are the true class, columns the predicted class; counts of labelled pixels."""
    write_csv(
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


def overlay_panels(
    image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, max_side: int = 512
) -> Image.Image:
    """Mosaic, ground truth (unlabelled grey) and prediction side by side, with a legend.

    ``image`` float (H, W) on the 0-255 scale; ``truth`` and ``prediction`` uint8 (H, W) class
    maps (255 = unlabelled). Each panel is scaled to ``max_side`` px on its longer side (at most
    8x up for small images), nearest neighbour for the class maps so colours stay pure.
    """
    lut = colour_lut()
    height, width = image.shape
    scale = min(8.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    mosaic = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).convert("RGB")
    panels = [
        mosaic.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST),
        Image.fromarray(lut[truth]).resize(size, Image.Resampling.NEAREST),
        Image.fromarray(lut[prediction]).resize(size, Image.Resampling.NEAREST),
    ]
    gap, title_px, line_px = 8, 18, 18
    sheet_width = max(3 * size[0] + 2 * gap, 320)
    entries = [*enumerate(CLASS_NAMES), (255, "unlabelled")]
    widths = [24 + 7 * len(name) for _, name in entries]
    legend_lines = 1 + sum(
        1
        for i in range(1, len(widths))
        if sum(widths[: i + 1]) // sheet_width > sum(widths[:i]) // sheet_width
    )
    sheet = Image.new(
        "RGB", (sheet_width, title_px + size[1] + 4 + legend_lines * line_px), "white"
    )
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (panel, title) in enumerate(
        zip(panels, ("mosaic", "ground truth", "prediction"), strict=True)
    ):
        sheet.paste(panel, (index * (size[0] + gap), title_px))
        draw.text((index * (size[0] + gap) + 2, 3), title, font=font, fill="black")
    x, y = 2, title_px + size[1] + 4
    for (value, name), entry_width in zip(entries, widths, strict=True):
        if x + entry_width > sheet_width:
            x, y = 2, y + line_px
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=tuple(int(c) for c in lut[value]))
        draw.text((x + 16, y + 2), name, font=font, fill="black")
        x += entry_width
    return sheet


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
