"""The six RCM cellular patterns: index, name, colour, and label remapping.

Canonical order follows Kose et al. 2021 (MED-Net). ``UNLABELLED`` marks pixels the expert did
not label; they are ignored by losses and metrics but still predicted.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "artifact",
    "meshwork",
    "nested",
    "ring",
    "aspecific",
)
NUM_CLASSES: int = len(CLASS_NAMES)
# RGB 0-255, as in the paper's figures; aspecific is not given there, magenta is our choice.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (255, 255, 0),
    (0, 200, 0),
    (0, 255, 255),
    (0, 0, 255),
    (255, 0, 255),
)
UNLABELLED: int = 255
UNLABELLED_COLOUR: tuple[int, int, int] = (128, 128, 128)
# Classes that are not part of the lesion: excluded from lesion-area percentages.
NON_LESION_CLASSES: tuple[int, ...] = (0, 1)

MOSAIC_MPP: float = 0.5  # µm/px of a VivaScope 1500 mosaic, used when a file carries none
WORKING_MPP: float = 2.0  # µm/px at which MED-Net sees mosaics (4x downsampled)


def remap_labels(labels: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Map label values through ``table`` (source value -> canonical index or UNLABELLED).

    Values absent from the table are kept as they are; validate afterwards with
    :func:`invalid_label_values`.
    """
    lut = np.arange(256, dtype=np.uint8)
    for src, dst in table.items():
        lut[int(src)] = int(dst)
    return lut[labels.astype(np.uint8, copy=False)]


def invalid_label_values(labels: np.ndarray) -> list[int]:
    """Values in ``labels`` that are neither a class index nor UNLABELLED."""
    values = np.unique(labels)
    return [int(v) for v in values if not (0 <= v < NUM_CLASSES or v == UNLABELLED)]


def colour_lut(unlabelled_colour: tuple[int, int, int] = UNLABELLED_COLOUR) -> np.ndarray:
    """A (256, 3) uint8 lookup table from label value to RGB colour."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    for index, colour in enumerate(CLASS_COLOURS):
        lut[index] = colour
    lut[UNLABELLED] = unlabelled_colour
    return lut


INTENSITY_MAX: float = 255.0  # network input = mosaic intensity (0-255 scale) / INTENSITY_MAX
