"""The six RCM patterns as textures on the render grid (1 µm/px, i.e. 2 px of the 0.5 µm mosaic).

Sizes follow the anatomy at the dermal-epidermal junction: cells about 10 µm, dermal papillae
40-70 µm across, meshwork holes 45-70 µm apart, nests 25-50 µm. Each lesion/background texture
is returned normalised to mean 0 and std 1 over the window, so region brightness and contrast
(set by the mosaic, not the class) cannot tell the classes apart: only texture can. Artifacts are
returned in intensity units (0-255), since being too bright or too dark is what they are.

Lesion patterns are labelled by region, as experts label them, and a region is not one texture
throughout: it is a patchwork of foci 60-90 µm across (about one papilla), each drawn with one of
four base textures (meshwork lines, nest cells, papilla rings, disorder) by :data:`FOCUS_TEXTURES`.
A meshwork, nested or ring region is 60 % its own texture, 10 % each of the other two organised
textures and 20 % disorder; an aspecific region is a disarranged mix (20 % each organised
texture, 40 % disorder).
One focus therefore does not name its region's pattern: the proportions over several foci
(150-300 µm) do, which is the context a multiscale network is meant to use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from rcmseg.classes import CLASS_NAMES
from rcmseg.synth.noise import Fractal, Points, ValueNoise

MARGIN_PX = 96  # render px computed beyond a strip so nearest-point patterns have no seams


@dataclass(frozen=True)
class Window:
    """A block of render rows: ``top`` is its first global row, ``shape`` (rows, cols)."""

    top: int
    shape: tuple[int, int]

    @property
    def rows(self) -> np.ndarray:
        """Global grid row of each window row."""
        return np.arange(self.top, self.top + self.shape[0])

    @property
    def cols(self) -> np.ndarray:
        """Grid column of each window column."""
        return np.arange(self.shape[1])


@dataclass(frozen=True)
class Style:
    """Per-mosaic random layouts and parameters of every pattern (drawn once, used per strip)."""

    foci: Points  # value = U(0, 1) draw choosing each focus' base texture
    papillae: Points  # value = papilla radius (px)
    rim_width: float
    mesh_seeds: Points
    mesh_line_sigma: float
    nest_cells: Points  # value = cell brightness
    cell_sigma: float
    scattered_cells: Points
    honeycomb_period: float
    honeycomb_angle: float
    bubbles: Points  # value = bubble radius (px)
    beads: ValueNoise
    fine: Fractal
    dermis: ValueNoise
    warp_y: ValueNoise
    warp_x: ValueNoise
    background_kind: ValueNoise
    artifact_kind: tuple[ValueNoise, ValueNoise, ValueNoise]

    @classmethod
    def create(cls, rng: np.random.Generator, height: int, width: int) -> Style:
        ring_spacing = rng.uniform(62.0, 85.0)
        radius = (0.27 * ring_spacing, 0.36 * ring_spacing)
        nest_spacing = rng.uniform(70.0, 100.0)
        nest_cells = _cells_in_nests(
            rng, height, width, nest_spacing, nest_radius=(12.0, 24.0), cell_spacing=8.5
        )
        return cls(
            foci=Points.jittered(rng, height, width, rng.uniform(60.0, 90.0), 0.45, (0.0, 1.0)),
            papillae=Points.jittered(rng, height, width, ring_spacing, 0.18, radius),
            rim_width=rng.uniform(8.0, 11.0),
            mesh_seeds=Points.jittered(rng, height, width, rng.uniform(45.0, 70.0), 0.45),
            mesh_line_sigma=rng.uniform(2.5, 3.5),
            nest_cells=nest_cells,
            cell_sigma=rng.uniform(2.4, 3.0),
            scattered_cells=Points.jittered(rng, height, width, 9.0, 0.5, (0.3, 1.0), keep=0.12),
            honeycomb_period=rng.uniform(9.0, 12.0),
            honeycomb_angle=rng.uniform(0.0, np.pi / 3.0),
            bubbles=Points.jittered(rng, height, width, 150.0, 0.35, (25.0, 60.0), keep=0.6),
            beads=ValueNoise.create(rng, height, width, 6.0),
            fine=Fractal.create(rng, height, width, 24.0, 3, gain=0.8),
            dermis=ValueNoise.create(rng, height, width, 14.0),
            warp_y=ValueNoise.create(rng, height, width, 45.0, smooth=False),
            warp_x=ValueNoise.create(rng, height, width, 45.0, smooth=False),
            background_kind=ValueNoise.create(rng, height, width, 400.0, smooth=False),
            artifact_kind=tuple(
                ValueNoise.create(rng, height, width, 250.0, smooth=False) for _ in range(3)
            ),
        )


def _cells_in_nests(
    rng: np.random.Generator,
    height: int,
    width: int,
    spacing: float,
    nest_radius: tuple[float, float],
    cell_spacing: float,
) -> Points:
    """Cells of a dense jittered lattice that fall inside round nests (value = brightness)."""
    from scipy.spatial import cKDTree

    nests = Points.jittered(rng, height, width, spacing, 0.35, nest_radius, keep=0.85)
    cells = Points.jittered(rng, height, width, cell_spacing, 0.3, (0.6, 1.0))
    distance, nearest = cKDTree(np.column_stack([nests.y, nests.x])).query(
        np.column_stack([cells.y, cells.x])
    )
    inside = distance < nests.value[nearest]
    return Points(cells.y[inside], cells.x[inside], cells.value[inside])


def normalised(pattern: np.ndarray) -> np.ndarray:
    """Mean 0, std 1 over the window (statistics from every 4th pixel per axis: they are stable
    over a strip and this keeps them cheap)."""
    sample = pattern[::4, ::4]
    mean, std = sample.mean(dtype=np.float64), sample.std(dtype=np.float64)
    return ((pattern - np.float32(mean)) * np.float32(1.0 / (std + 1e-6))).astype(np.float32)


def _step_down(x: np.ndarray) -> np.ndarray:
    """Logistic 1 / (1 + exp(x)), safe for large x: 1 well below 0, 0 well above."""
    return 1.0 / (1.0 + np.exp(np.clip(x, -50.0, 50.0)))


def _nearest_point(points: Points, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: distance (px) to the nearest point, its value, and its index (a Voronoi map)."""
    rows, cols, inside = points.pixels(window.top, window.shape)
    empty = np.ones(window.shape, dtype=bool)
    empty[rows, cols] = False
    if inside.y.size == 0:
        far = np.full(window.shape, 1e6, np.float32)
        return far, np.zeros(window.shape, np.float32), np.zeros(window.shape, np.int32)
    distance, (near_rows, near_cols) = ndimage.distance_transform_edt(empty, return_indices=True)
    index = np.full(window.shape, -1, dtype=np.int32)
    index[rows, cols] = np.arange(inside.y.size, dtype=np.int32)
    nearest = index[near_rows, near_cols]
    return distance.astype(np.float32), inside.value[nearest].astype(np.float32), nearest


class Canvas:
    """A window of the render grid for one mosaic, with the noise fields that several patterns
    share computed at most once."""

    def __init__(self, style: Style, window: Window) -> None:
        self.style = style
        self.window = window
        self._textures: dict[Callable[[Canvas], np.ndarray], np.ndarray] = {}

    @cached_property
    def beads(self) -> np.ndarray:
        """Cell-scale granularity in [0, 1]: rims and lines are made of cells, not smooth."""
        return np.clip(0.5 + 0.8 * self.style.beads(self.window.top, self.window.shape), 0.0, 1.0)

    @cached_property
    def focus_deciles(self) -> np.ndarray:
        """(10, H, W) float32: how much each pixel belongs to foci whose draw falls in each tenth
        of [0, 1), with soft edges; sums to 1 per pixel."""
        _, draw, _ = _nearest_point(self.style.foci, self.window)
        decile = np.minimum((draw * 10.0).astype(np.int64), 9)
        return np.stack(
            [
                ndimage.gaussian_filter((decile == d).astype(np.float32), FOCUS_EDGE_PX)
                for d in range(10)
            ]
        )

    def texture(self, base: Callable[[Canvas], np.ndarray]) -> np.ndarray:
        """A base texture over the window, computed once per canvas."""
        if base not in self._textures:
            self._textures[base] = base(self)
        return self._textures[base]

    @cached_property
    def dermis(self) -> np.ndarray:
        """Smooth low-contrast texture (14 µm), mean 0, std 1."""
        return normalised(self.style.dermis(self.window.top, self.window.shape))


def _blobs(points: Points, window: Window, sigma: float) -> np.ndarray:
    """Points drawn as Gaussian blobs of ``sigma`` px, peak brightness about 1."""
    image = points.rasterise(window.top, window.shape)
    blobs = ndimage.gaussian_filter(image, sigma, truncate=3.0)
    return blobs * np.float32(2.0 * np.pi * sigma**2)


def rings(canvas: Canvas) -> np.ndarray:
    """Dark round papillae, each rimmed by a bright ring of basal cells, packed side by side."""
    style = canvas.style
    distance, radius, _ = _nearest_point(style.papillae, canvas.window)
    half = style.rim_width / 2.0
    rim = np.exp(-(((distance - radius - half) / half) ** 2))
    papilla = _step_down((distance - radius + 2.0) / 2.0)
    pattern = rim * (0.45 + 0.55 * canvas.beads) - 0.55 * papilla
    return normalised(pattern)


def meshwork_lines(canvas: Canvas) -> np.ndarray:
    """A net of thick bright interpapillary lines (Voronoi edges) around dark polygonal holes."""
    _, _, cell = _nearest_point(canvas.style.mesh_seeds, canvas.window)
    edges = np.zeros(canvas.window.shape, dtype=np.float32)
    edges[:, 1:] += cell[:, 1:] != cell[:, :-1]
    edges[1:, :] += cell[1:, :] != cell[:-1, :]
    lines = ndimage.gaussian_filter(
        np.minimum(edges, 1.0), canvas.style.mesh_line_sigma, truncate=3.0
    )
    pattern = lines * (0.5 + 0.5 * canvas.beads)
    return normalised(pattern)


def nest_cells(canvas: Canvas) -> np.ndarray:
    """Compact clusters of bright round cells in a dim, faintly textured dermis."""
    cells = _blobs(canvas.style.nest_cells, canvas.window, canvas.style.cell_sigma)
    return normalised(cells + 0.05 * canvas.dermis)


def disorder(canvas: Canvas) -> np.ndarray:
    """Disordered bright and dark texture at several scales, with scattered bright cells."""
    style, window = canvas.style, canvas.window
    texture = normalised(style.fine(window.top, window.shape))
    return normalised(texture + 1.5 * _blobs(style.scattered_cells, window, 2.5))


# Base textures of lesion foci, and which one each tenth of the focus draw U(0, 1) gets in a
# region of each lesion class (class index -> 10 base-texture indices).
BASE_TEXTURES = (meshwork_lines, nest_cells, rings, disorder)
MESHWORK, NESTED, RING, ASPECIFIC = (
    CLASS_NAMES.index(name) for name in ("meshwork", "nested", "ring", "aspecific")
)
FOCUS_TEXTURES: dict[int, tuple[int, ...]] = {
    MESHWORK: (0, 0, 0, 0, 0, 0, 1, 2, 3, 3),
    NESTED: (1, 1, 1, 1, 1, 1, 0, 2, 3, 3),
    RING: (2, 2, 2, 2, 2, 2, 0, 1, 3, 3),
    ASPECIFIC: (0, 0, 1, 1, 2, 2, 3, 3, 3, 3),
}
FOCUS_EDGE_PX = 3.0  # σ of the soft edge between foci (render px = µm)


def lesion(canvas: Canvas, class_index: int) -> np.ndarray:
    """The texture of a lesion region of ``class_index``: its foci's base textures, blended
    over soft focus edges (mean 0, std 1)."""
    deciles = canvas.focus_deciles
    pattern = np.zeros(canvas.window.shape, dtype=np.float32)
    for base_index, base in enumerate(BASE_TEXTURES):
        chosen = [d for d, b in enumerate(FOCUS_TEXTURES[class_index]) if b == base_index]
        if chosen:
            pattern += deciles[chosen].sum(axis=0) * canvas.texture(base)
    return normalised(pattern)


def meshwork(canvas: Canvas) -> np.ndarray:
    """Meshwork region: mostly bright interpapillary lines."""
    return lesion(canvas, MESHWORK)


def nested(canvas: Canvas) -> np.ndarray:
    """Nested region: mostly clusters of bright cells."""
    return lesion(canvas, NESTED)


def ring(canvas: Canvas) -> np.ndarray:
    """Ring region: mostly papillae rimmed by bright cells."""
    return lesion(canvas, RING)


def aspecific(canvas: Canvas) -> np.ndarray:
    """Aspecific region: fragments of every lesion texture and disorder, none dominant."""
    return lesion(canvas, ASPECIFIC)


def background(canvas: Canvas) -> np.ndarray:
    """Non-lesion skin: a regular honeycomb of keratinocytes (bright borders, dark cells),
    blending into homogeneous low-contrast texture elsewhere."""
    style, window = canvas.style, canvas.window
    # Slightly warped coordinates: a regular but not crystal-perfect honeycomb.
    rows = window.rows.astype(np.float32)[:, None] + 3.0 * style.warp_y(window.top, window.shape)
    cols = window.cols.astype(np.float32)[None, :] + 3.0 * style.warp_x(window.top, window.shape)
    wave = np.float32(4.0 * np.pi / (np.sqrt(3.0) * style.honeycomb_period))
    peaks = np.zeros(window.shape, dtype=np.float32)
    for turn in range(3):
        angle = style.honeycomb_angle + turn * 2.0 * np.pi / 3.0
        peaks += np.cos(
            wave * (np.float32(np.cos(angle)) * cols + np.float32(np.sin(angle)) * rows)
        )
    honeycomb = normalised(-peaks)
    homogeneous = 0.35 * canvas.dermis
    share = _step_down(-6.0 * style.background_kind(window.top, window.shape))
    return share * honeycomb + (1.0 - share) * homogeneous


def artifact(canvas: Canvas) -> np.ndarray:
    """Acquisition artifacts in intensity units: saturation (~240), under-illumination (~12), and
    air bubbles (dark round areas with a bright rim on grey)."""
    style, window = canvas.style, canvas.window
    kinds = np.stack([noise(window.top, window.shape) for noise in style.artifact_kind])
    share = np.exp(5.0 * (kinds - kinds.max(axis=0, keepdims=True)))
    share /= share.sum(axis=0, keepdims=True)
    texture = canvas.dermis
    saturated = 238.0 + 10.0 * texture
    dark = 12.0 + 6.0 * texture
    distance, radius, _ = _nearest_point(style.bubbles, window)
    inside = _step_down((distance - radius) / 1.5)
    rim = np.exp(-(((distance - radius) / 3.0) ** 2))
    bubble = 105.0 + 15.0 * texture - 80.0 * inside + 120.0 * rim
    return share[0] * saturated + share[1] * dark + share[2] * bubble


# Texture per class index, CLASS_NAMES order.
PATTERNS = (background, artifact, meshwork, nested, ring, aspecific)
