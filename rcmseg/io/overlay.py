"""Overlay pictures: a mosaic blended with its class colours, with a legend of colour swatches.

One renderer for ``rcmseg batch --overlay`` (``<name>.overlay.png``) and the evaluation report's
mosaic / ground truth / prediction panels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcmseg.classes import (
    CLASS_COLOURS,
    CLASS_NAMES,
    NON_LESION_CLASSES,
    UNLABELLED_COLOUR,
    colour_lut,
)
from rcmseg.io.atomic import atomic_path

Colour = tuple[int, int, int]
FONT_PX = 14


def blend(
    grey: np.ndarray, labels: np.ndarray, alpha: float, class_colours: Sequence[Colour]
) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey blended with class colours; other label values stay grey."""
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(class_colours)] = class_colours
    weight = np.where(labels < len(class_colours), alpha, 0.0)[..., None]
    rgb = grey.astype(np.float32)[..., None] * (1 - weight) + lut[labels] * weight
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_PX)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def with_legend(
    picture: Image.Image, entries: Sequence[str], colours: Sequence[Colour], note: str = ""
) -> Image.Image:
    """``picture`` with rows of colour swatches and texts added below it, then ``note``."""
    font = _font()
    measure = ImageDraw.Draw(picture)
    pad, swatch, row_h = 6, FONT_PX, FONT_PX + 8
    widths = [
        swatch + 4 + math.ceil(measure.textlength(text, font=font)) + 2 * pad for text in entries
    ]
    width = max(picture.width, max(widths) + pad)
    positions, x, y = [], pad, pad
    for entry_width in widths:
        if x > pad and x + entry_width > width:
            x, y = pad, y + row_h
        positions.append((x, y))
        x += entry_width
    legend_h = y + row_h + pad + (row_h if note else 0)
    canvas = Image.new("RGB", (width, picture.height + legend_h), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (x, y), text, colour in zip(positions, entries, colours, strict=True):
        top = picture.height + y
        draw.rectangle(
            (x, top + 2, x + swatch, top + 2 + swatch), fill=tuple(colour), outline=(0, 0, 0)
        )
        draw.text((x + swatch + 4, top), text, fill=(0, 0, 0), font=font)
    if note:
        draw.text((pad, picture.height + y + row_h), note, fill=(0, 0, 0), font=font)
    return canvas


def area_legend(labels: np.ndarray, class_names: Sequence[str]) -> tuple[list[str], str]:
    """Legend texts with the shares the reports use: lesion patterns as % of the lesion area
    (``patterns.csv``), background and artifact as % of the analysed area."""
    counts = np.bincount(labels[labels < len(class_names)].ravel(), minlength=len(class_names))
    lesion = [i for i in range(len(class_names)) if i not in NON_LESION_CLASSES]
    lesion_total, total = max(1, counts[lesion].sum()), max(1, counts.sum())
    entries = [
        f"{name} {100 * counts[i] / (total if i in NON_LESION_CLASSES else lesion_total):.0f}%"
        for i, name in enumerate(class_names)
    ]
    names = ", ".join(class_names[i] for i in NON_LESION_CLASSES)
    return entries, f"patterns: % of lesion area; {names}: % of analysed area"


def write_overlay_png(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    max_side: int = 2048,
    *,
    alpha: float = 0.4,
    class_names: Sequence[str] = CLASS_NAMES,
    class_colours: Sequence[Colour] = CLASS_COLOURS,
) -> Path:
    """Write the mosaic blended with label colours, downsized to ``max_side`` px, with a legend.

    Args:
        image: float (H, W) on the 0-255 scale; labels: uint8 (H, W), same shape. UNLABELLED
            pixels are left uncoloured. The legend gives each class's colour, name and share
            (:func:`area_legend`).
        alpha: weight of the label colour in the blend.
    """
    if np.shape(image) != np.shape(labels):
        raise ValueError(f"image {np.shape(image)} and labels {np.shape(labels)} differ in shape")
    height, width = labels.shape
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey_u8 = np.rint(np.clip(np.asarray(image, dtype=np.float32), 0, 255)).astype(np.uint8)
    grey = Image.fromarray(grey_u8).resize(size, Image.Resampling.BOX)
    small = Image.fromarray(np.asarray(labels, np.uint8)).resize(size, Image.Resampling.NEAREST)
    picture = Image.fromarray(blend(np.asarray(grey), np.asarray(small), alpha, class_colours))
    entries, note = area_legend(labels, class_names)
    result = with_legend(picture, entries, class_colours, note)
    with atomic_path(path) as partial:
        result.save(partial, format="PNG")
    return Path(path)


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
    gap, title_px = 8, 18
    sheet = Image.new("RGB", (3 * size[0] + 2 * gap, title_px + size[1]), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (panel, title) in enumerate(
        zip(panels, ("mosaic", "ground truth", "prediction"), strict=True)
    ):
        sheet.paste(panel, (index * (size[0] + gap), title_px))
        draw.text((index * (size[0] + gap) + 2, 3), title, font=_font(), fill="black")
    colours = [*CLASS_COLOURS, UNLABELLED_COLOUR]
    return with_legend(sheet, [*CLASS_NAMES, "unlabelled"], colours)


def save_png(image: Image.Image, path: Path) -> None:
    """Write a picture atomically."""
    with atomic_path(path) as partial:
        image.save(partial, format="PNG")
