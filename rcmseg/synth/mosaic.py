"""Compose a synthetic RCM mosaic and its partial label map, strip by strip.

Rendering happens on a 1 µm/px grid (RCM's lateral optical resolution is about 1 µm), which is
bilinearly upsampled to the mosaic's 0.5 µm/px, where pixel-level speckle is added. Strips of
``STRIP_ROWS`` render rows keep temporary memory bounded: a 12000² mosaic needs its two uint8
outputs (288 MB) plus a few hundred MB of working arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rcmseg.classes import MOSAIC_MPP, UNLABELLED
from rcmseg.synth.layout import TILE_PX, RegionPlan, plan_regions
from rcmseg.synth.noise import Fractal, sample_lattice
from rcmseg.synth.patterns import MARGIN_PX, PATTERNS, Canvas, Style, Window

ARTIFACT = 1  # class index whose texture is already in intensity units
STRIP_ROWS = 512  # render rows per strip
RENDER_FACTOR = 2  # mosaic px per render px (0.5 µm/px mosaic, 1 µm/px render grid)


@dataclass(frozen=True)
class Lighting:
    """Brightness and contrast that vary over the mosaic independently of the pattern, tile
    vignetting of the VivaScope fields of view, and speckle strength."""

    mean: np.ndarray  # coarse lattice of region mean intensity (0-255)
    contrast: np.ndarray  # coarse lattice of region std (0-255 units)
    vignetting: float  # relative darkening at a field-of-view corner
    speckle_render: float  # σ of multiplicative speckle at 1 µm/px
    speckle_mosaic: float  # σ of multiplicative speckle at 0.5 µm/px
    step: int

    @classmethod
    def create(cls, rng: np.random.Generator, height: int, width: int, step: int) -> Lighting:
        grid = (height // step + 2, width // step + 2)  # coarse nodes, as the region plan
        mean = Fractal.create(rng, *grid, 600.0 / step, 2)(0, grid)
        contrast = Fractal.create(rng, *grid, 600.0 / step, 2)(0, grid)
        return cls(
            mean=115.0 + 18.0 * np.clip(mean / (mean.std() + 1e-6), -2.0, 2.0),
            contrast=34.0 + 6.0 * np.clip(contrast / (contrast.std() + 1e-6), -2.0, 2.0),
            vignetting=float(rng.uniform(0.05, 0.25)),
            speckle_render=float(rng.uniform(0.10, 0.20)),
            speckle_mosaic=float(rng.uniform(0.15, 0.30)),
            step=step,
        )


def _vignette(window: Window, strength: float) -> np.ndarray:
    """Multiplicative darkening towards the corners of each 0.5 mm field of view."""
    u = (window.rows % TILE_PX) / TILE_PX * 2.0 - 1.0
    v = (window.cols % TILE_PX) / TILE_PX * 2.0 - 1.0
    return (1.0 - strength * (u[:, None] ** 2 + v[None, :] ** 2) / 2.0).astype(np.float32)


def _render_rows(
    plan: RegionPlan,
    style: Style,
    lighting: Lighting,
    window: Window,
    extended: Window,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, 0-255) and labels (uint8) of the render rows of ``window``; textures are
    computed over ``extended`` (the window plus context rows) so strips join without seams."""
    top, shape = window.top, window.shape
    scores = torch.from_numpy(sample_lattice(plan.scores, top, shape, plan.step))
    share = torch.softmax(scores / plan.temperature, dim=0).numpy()
    best_two = torch.topk(scores, 2, dim=0)
    labels = best_two.indices[0].to(torch.uint8).numpy()
    border = (best_two.values[0] - best_two.values[1] < plan.border_margin).numpy()
    mean = sample_lattice(lighting.mean, top, shape, lighting.step)
    contrast = sample_lattice(lighting.contrast, top, shape, lighting.step)
    core = slice(window.top - extended.top, window.top - extended.top + window.shape[0])
    image = np.zeros(window.shape, dtype=np.float32)
    canvas = Canvas(style, extended)
    for index, pattern in enumerate(PATTERNS):
        if share[index].max() < 1e-3:
            continue
        texture = pattern(canvas)[core]
        intensity = texture if index == ARTIFACT else mean + contrast * texture
        image += share[index] * intensity
    image *= _vignette(window, lighting.vignetting)
    image *= 1.0 + lighting.speckle_render * rng.standard_normal(window.shape, dtype=np.float32)

    dropped = sample_lattice(plan.dropped, top, shape, plan.step) > 0.5
    labels[border | dropped] = UNLABELLED
    tiles = plan.missing_tiles
    missing = tiles[
        np.minimum(window.rows // TILE_PX, tiles.shape[0] - 1)[:, None],
        np.minimum(window.cols // TILE_PX, tiles.shape[1] - 1)[None, :],
    ]
    image[missing] = 0.0
    labels[missing] = 0  # black outside the acquired mosaic is labelled background
    return image, labels


def _to_mosaic_rows(
    image: np.ndarray,
    labels: np.ndarray,
    first_render_row: int,
    mosaic_rows: slice,
    width: int,
    speckle: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Upsample render rows (the first is ``first_render_row``) to the mosaic rows
    ``mosaic_rows``: bilinear image (pixel-centre aligned) plus speckle, nearest labels."""
    fine = F.interpolate(
        torch.from_numpy(image)[None, None],
        scale_factor=RENDER_FACTOR,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    offset = first_render_row * RENDER_FACTOR
    fine = fine[mosaic_rows.start - offset : mosaic_rows.stop - offset, :width]
    fine *= 1.0 + speckle * rng.standard_normal(fine.shape, dtype=np.float32)
    fine_labels = np.repeat(np.repeat(labels, RENDER_FACTOR, axis=0), RENDER_FACTOR, axis=1)
    fine_labels = fine_labels[mosaic_rows.start - offset : mosaic_rows.stop - offset, :width]
    return np.clip(fine + 0.5, 0.0, 255.0).astype(np.uint8), fine_labels


def default_region_px(height: int, width: int) -> float:
    """Largest pattern regions: a third of the shorter side, 150 µm to 1.2 mm (render px)."""
    return float(np.clip(min(height, width) / 3.0, 150.0, 1200.0))


def make_mosaic(
    size: int | tuple[int, int],
    seed: int = 0,
    labelled_fraction: float = 0.57,
    region_um: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic RCM mosaic at 0.5 µm/px and its partial expert label map.

    Deterministic for a given (size, seed). The six patterns (see :mod:`rcmseg.synth.patterns`)
    occupy multiscale regions with gradual transitions; about ``labelled_fraction`` of the pixels
    are labelled, the rest (pattern boundaries and some whole regions) is UNLABELLED.

    Args:
        size: side in px (square), or (height, width), at 0.5 µm/px.
        seed: random seed.
        labelled_fraction: share of labelled pixels (0.57 as in the paper's data).
        region_um: feature size of the largest pattern regions in µm (default: a third of the
            shorter side, 150 µm to 1.2 mm).

    Returns:
        image uint8 (H, W) and labels uint8 (H, W) with values 0..5 or 255.
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 16 or width < 16:
        raise ValueError(f"mosaic size must be at least 16 px, got {height}x{width}")
    render_h, render_w = -(-height // RENDER_FACTOR), -(-width // RENDER_FACTOR)
    rng = np.random.default_rng(seed)
    region_px = region_um / (MOSAIC_MPP * RENDER_FACTOR) if region_um else None
    plan = plan_regions(
        rng,
        render_h,
        render_w,
        region_px or default_region_px(render_h, render_w),
        labelled_fraction=labelled_fraction,
    )
    style = Style.create(rng, render_h, render_w)
    lighting = Lighting.create(rng, render_h, render_w, plan.step)
    image = np.empty((height, width), dtype=np.uint8)
    labels = np.empty((height, width), dtype=np.uint8)
    for index, top in enumerate(range(0, render_h, STRIP_ROWS)):
        strip_rng = np.random.default_rng([seed, index])
        # One render row of context on each side for the bilinear upsampling.
        first = max(0, top - 1)
        last = min(render_h, top + STRIP_ROWS + 1)
        window = Window(first, (last - first, render_w))
        context_top = max(0, first - MARGIN_PX)
        extended = Window(context_top, (min(render_h, last + MARGIN_PX) - context_top, render_w))
        strip_image, strip_labels = _render_rows(plan, style, lighting, window, extended, strip_rng)
        y0, y1 = top * RENDER_FACTOR, min((top + STRIP_ROWS) * RENDER_FACTOR, height)
        image[y0:y1], labels[y0:y1] = _to_mosaic_rows(
            strip_image,
            strip_labels,
            first,
            slice(y0, y1),
            width,
            lighting.speckle_mosaic,
            strip_rng,
        )
    return image, labels
