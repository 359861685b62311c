"""Noise and point-layout primitives for synthetic mosaics, evaluated on any window of a grid.

Everything is a function of global grid coordinates, so a mosaic rendered strip by strip has no
seams: a lattice (or point set) is drawn once per mosaic and sampled where each strip needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def sample_lattice(
    lattice: np.ndarray, top: int, shape: tuple[int, int], step: int, smooth: bool = False
) -> np.ndarray:
    """Interpolate a coarse lattice (node j at grid px j·step) over a window of the grid.

    Args:
        lattice: (gh, gw) or (C, gh, gw) node values; it must reach past the window.
        top: first grid row of the window; the window starts at grid column 0.
        shape: (rows, cols) of the window.
        smooth: bicubic (smooth value noise) instead of bilinear.

    Returns:
        float32 (rows, cols) or (C, rows, cols).
    """
    import torch
    import torch.nn.functional as F

    first = top // step
    last = min(lattice.shape[-2], (top + shape[0] - 1) // step + 2)
    cols = min(lattice.shape[-1], (shape[1] - 1) // step + 2)
    block = np.ascontiguousarray(lattice[..., first:last, :cols], dtype=np.float32)
    tensor = torch.from_numpy(block).reshape(1, -1, last - first, cols)
    size = ((last - first - 1) * step + 1, (cols - 1) * step + 1)
    dense = F.interpolate(
        tensor, size=size, mode="bicubic" if smooth else "bilinear", align_corners=True
    )
    offset = top - first * step
    window = dense[0, :, offset : offset + shape[0], : shape[1]].numpy()
    return window.reshape(*lattice.shape[:-2], *shape)


@dataclass(frozen=True)
class ValueNoise:
    """Band-limited noise with one feature size: a random lattice every ``period`` px.

    Mean ≈ 0; nodes are N(0, 1), so values have a std somewhat below 1.
    """

    lattice: np.ndarray
    period: int
    smooth: bool = True  # bicubic; bilinear (cheaper, creased) is enough for masks and warps

    @classmethod
    def create(
        cls, rng: np.random.Generator, height: int, width: int, period: float, smooth: bool = True
    ) -> ValueNoise:
        step = max(2, round(period))
        shape = (height // step + 3, width // step + 3)
        return cls(rng.standard_normal(shape, dtype=np.float32), step, smooth)

    def __call__(self, top: int, shape: tuple[int, int]) -> np.ndarray:
        """Values over ``shape`` grid px starting at grid row ``top`` (and column 0)."""
        return sample_lattice(self.lattice, top, shape, self.period, smooth=self.smooth)


@dataclass(frozen=True)
class Fractal:
    """A sum of :class:`ValueNoise` octaves (periods halve, amplitudes scale by ``gain``)."""

    octaves: tuple[ValueNoise, ...]
    gain: float

    @classmethod
    def create(
        cls,
        rng: np.random.Generator,
        height: int,
        width: int,
        period: float,
        octaves: int,
        gain: float = 0.5,
    ) -> Fractal:
        layers = tuple(ValueNoise.create(rng, height, width, period / 2**i) for i in range(octaves))
        return cls(layers, gain)

    def __call__(self, top: int, shape: tuple[int, int]) -> np.ndarray:
        total = np.zeros(shape, dtype=np.float32)
        amplitude = 1.0
        for layer in self.octaves:
            total += np.float32(amplitude) * layer(top, shape)
            amplitude *= self.gain
        return total


@dataclass(frozen=True)
class Points:
    """A jittered lattice of points with one attribute each (a radius, an amplitude).

    ``y``/``x`` in grid px, sorted by ``y`` so a strip's points are one slice.
    """

    y: np.ndarray
    x: np.ndarray
    value: np.ndarray

    @classmethod
    def jittered(
        cls,
        rng: np.random.Generator,
        height: int,
        width: int,
        spacing: float,
        jitter: float,
        values: tuple[float, float] = (1.0, 1.0),
        keep: float = 1.0,
    ) -> Points:
        """Rows of points ``spacing`` apart, odd rows offset by half (a hexagonal packing), each
        moved by up to ``jitter``·spacing, kept with probability ``keep``; values ~ U(values)."""
        row_step = spacing * np.sqrt(3.0) / 2.0
        n_rows = int(height / row_step) + 3
        n_cols = int(width / spacing) + 3
        grid_y, grid_x = np.mgrid[-1 : n_rows - 1, -1 : n_cols - 1].astype(np.float64)
        grid_x = grid_x * spacing + (grid_y % 2) * spacing / 2.0
        grid_y = grid_y * row_step
        offsets = rng.uniform(-jitter, jitter, size=(2, *grid_y.shape)) * spacing
        value = rng.uniform(*values, size=grid_y.shape)
        kept = rng.random(grid_y.shape) < keep
        return cls.from_arrays(
            (grid_y + offsets[0])[kept], (grid_x + offsets[1])[kept], value[kept]
        )

    @classmethod
    def from_arrays(cls, y: np.ndarray, x: np.ndarray, value: np.ndarray) -> Points:
        order = np.argsort(y, kind="stable")
        return cls(y[order], x[order], value[order])

    def between(self, top: float, bottom: float) -> Points:
        """Points with top <= y < bottom."""
        lo, hi = np.searchsorted(self.y, [top, bottom])
        return Points(self.y[lo:hi], self.x[lo:hi], self.value[lo:hi])

    def pixels(self, top: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, Points]:
        """Pixel (rows, cols) of the points inside a window of ``shape`` starting at grid row
        ``top``, and those points."""
        inside = self.between(top - 0.5, top + shape[0] - 0.5)
        rows = np.clip(np.round(inside.y - top).astype(np.intp), 0, shape[0] - 1)
        cols = np.round(inside.x).astype(np.intp)
        ok = (cols >= 0) & (cols < shape[1])
        kept = Points(inside.y[ok], inside.x[ok], inside.value[ok])
        return rows[ok], cols[ok], kept

    def rasterise(self, top: int, shape: tuple[int, int]) -> np.ndarray:
        """The points' values summed into a float32 image of ``shape`` whose first row is grid
        row ``top``; points outside are dropped."""
        rows, cols, inside = self.pixels(top, shape)
        image = np.zeros(shape, dtype=np.float32)
        np.add.at(image, (rows, cols), inside.value.astype(np.float32))
        return image
