"""Where each pattern lies in a synthetic mosaic, and which parts the "expert" labelled.

Planned on a coarse grid (one node every ``COARSE_STEP`` render px) that the renderer
interpolates: one multiscale noise score per class (plus a per-class bias fitted so the areas
match target fractions), the class is the highest score, and the gap between the best two scores
(the *margin*) measures how close a pixel is to a pattern boundary. Blending textures by a
softmax of the scores gives gradual transitions; the "expert" leaves boundaries (margin below a
threshold), whole regions (connected components), and nothing else unlabelled, with the threshold
chosen so that about ``labelled_fraction`` of the mosaic is labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rcmseg.classes import NUM_CLASSES
from rcmseg.synth.noise import Fractal

COARSE_STEP = 8  # render px (µm) between coarse nodes
TILE_PX = 500  # render px per VivaScope field of view (0.5 mm): vignetting and missing tiles
# Label distribution over the paper's data set (labelled pixels), CLASS_NAMES order.
PAPER_CLASS_FRACTIONS: tuple[float, ...] = (0.17, 0.19, 0.20, 0.05, 0.28, 0.10)
MIN_CLASS_FRACTION = 0.04  # every class gets at least this share of the mosaic


@dataclass(frozen=True)
class RegionPlan:
    """The coarse plan of one mosaic (grids indexed by coarse node, node j at render px j·step).

    Attributes:
        scores: float32 (K, gh, gw) class scores, bias included; the class is their argmax.
        dropped: float32 (gh, gw), 1 where a whole region is left unlabelled.
        border_margin: pixels whose best-minus-second score is below this are unlabelled.
        temperature: softmax temperature for blending textures (larger = wider transitions).
        missing_tiles: bool (th, tw), fields of view never acquired (black, background).
    """

    scores: np.ndarray
    dropped: np.ndarray
    border_margin: float
    temperature: float
    missing_tiles: np.ndarray
    step: int = COARSE_STEP


def class_targets(rng: np.random.Generator, concentration: float = 40.0) -> np.ndarray:
    """Per-mosaic area fractions, drawn around the paper's distribution, none below the minimum."""
    fractions = rng.dirichlet(np.asarray(PAPER_CLASS_FRACTIONS) * concentration)
    fractions = np.maximum(fractions, MIN_CLASS_FRACTION)
    return fractions / fractions.sum()


def _fit_biases(scores: np.ndarray, inside: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class offsets so that argmax areas (inside the mosaic) approach ``targets``."""
    bias = np.zeros(len(targets), dtype=np.float32)
    for _ in range(60):
        winner = np.argmax(scores + bias[:, None, None], axis=0)[inside]
        area = np.bincount(winner, minlength=len(targets)) / max(winner.size, 1)
        bias += 0.6 * (np.log(targets) - np.log(np.maximum(area, 1e-4))).astype(np.float32)
    return bias


def _missing_tiles(rng: np.random.Generator, tiles_h: int, tiles_w: int) -> np.ndarray:
    """Fields of view missing at the mosaic's edge (an irregular acquisition): a few tiles of one
    edge row or column, in about half of the mosaics that span at least 3x3 fields."""
    missing = np.zeros((tiles_h, tiles_w), dtype=bool)
    if tiles_h < 3 or tiles_w < 3 or rng.random() < 0.5:
        return missing
    edge = rng.integers(4)
    length = tiles_w if edge < 2 else tiles_h
    count = int(rng.integers(1, max(2, length // 2) + 1))
    start = 0 if rng.random() < 0.5 else length - count
    cells = slice(start, start + count)
    if edge == 0:
        missing[0, cells] = True
    elif edge == 1:
        missing[-1, cells] = True
    elif edge == 2:
        missing[cells, 0] = True
    else:
        missing[cells, -1] = True
    return missing


def _drop_regions(
    rng: np.random.Generator, classes: np.ndarray, inside: np.ndarray, target: float
) -> np.ndarray:
    """Whole connected regions left unlabelled, about ``target`` of the area; each class keeps
    its largest region labelled."""
    dropped = np.zeros(classes.shape, dtype=bool)
    candidates: list[np.ndarray] = []
    for k in range(NUM_CLASSES):
        components, count = ndimage.label((classes == k) & inside)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        candidates.extend(components == c for c in range(1, count + 1) if c != largest)
    budget = target * inside.sum()
    for index in rng.permutation(len(candidates)):
        region = candidates[index]
        size = region.sum()
        if dropped.sum() + size <= 1.25 * budget:
            dropped |= region
        if dropped.sum() >= budget:
            break
    return dropped


def margin_of(scores: np.ndarray) -> np.ndarray:
    """Best minus second-best score along axis 0."""
    two_best = np.partition(scores, NUM_CLASSES - 2, axis=0)[NUM_CLASSES - 2 :]
    return two_best[1] - two_best[0]


def plan_regions(
    rng: np.random.Generator,
    height: int,
    width: int,
    region_px: float,
    labelled_fraction: float = 0.57,
    dropped_fraction: float = 0.15,
    temperature: float = 0.12,
) -> RegionPlan:
    """Plan a mosaic of ``height`` x ``width`` render px (1 µm/px).

    Args:
        region_px: feature size of the largest pattern regions (render px); two finer octaves
            add smaller regions and ragged outlines.
        labelled_fraction: share of all pixels the expert labels (the paper's data: ~0.57).
        dropped_fraction: share left unlabelled as whole regions; the rest of the unlabelled
            share comes from bands along pattern boundaries.
    """
    grid_h, grid_w = height // COARSE_STEP + 2, width // COARSE_STEP + 2
    rows = np.arange(grid_h) * COARSE_STEP
    cols = np.arange(grid_w) * COARSE_STEP
    period = region_px / COARSE_STEP  # in coarse nodes
    scores = np.stack(
        [
            Fractal.create(rng, grid_h, grid_w, period, 3, 0.55)(0, (grid_h, grid_w))
            for _ in range(NUM_CLASSES)
        ]
    )
    scores /= scores.std(axis=(1, 2), keepdims=True) + 1e-6
    tiles = _missing_tiles(rng, -(-height // TILE_PX), -(-width // TILE_PX))
    inside = ~tiles[
        np.minimum(rows // TILE_PX, tiles.shape[0] - 1)[:, None],
        np.minimum(cols // TILE_PX, tiles.shape[1] - 1)[None, :],
    ]
    scores += _fit_biases(scores, inside, class_targets(rng))[:, None, None]
    classes = np.argmax(scores, axis=0)
    dropped = _drop_regions(rng, classes, inside, dropped_fraction)
    margin = margin_of(scores)
    candidates = margin[inside & ~dropped]
    still_unlabelled = (1.0 - labelled_fraction) * classes.size - dropped.sum()
    quantile = np.clip(still_unlabelled / max(candidates.size, 1), 0.0, 0.95)
    border = float(np.quantile(candidates, quantile)) if quantile > 0 else 0.0
    return RegionPlan(
        scores=scores.astype(np.float32),
        dropped=dropped.astype(np.float32),
        border_margin=border,
        temperature=temperature,
        missing_tiles=tiles,
    )
