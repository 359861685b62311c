"""Segmentation maps as TIFFs: label, probability and uncertainty TIFFs.

Every writer goes through :func:`rcmseg.io.atomic.atomic_path`, so an interrupted run never
leaves a file that looks finished. The overlay PNG is :mod:`rcmseg.io.overlay`'s, QuPath GeoJSON
:mod:`rcmseg.io.geojson`'s.

Layouts chosen so that tifffile, tiffslide, OpenSlide and QuPath all read the label map:

- Label TIFF: uint8 class indices, palette photometric with the class colours, 512 px tiles,
  Deflate (zlib), resolution tags in px/cm (``1e4 / mpp``). The pyramid is written as
  reduced-resolution pages (NewSubfileType 1) in the main IFD chain, which OpenSlide needs and
  tifffile/tiffslide read as ``series[0].levels``. Each level halves the previous one by the
  label vote of :func:`rcmseg.io.labels.downsample_labels` (a class label, never an average).
  Class names and colours are also stored as JSON in ImageDescription (see
  :func:`label_tiff_description`).
- Probability TIFF: OME-TIFF, (K, H, W) uint8 with ``value = round(255 · p)`` (one channel per
  class, named after it), tiled, Deflate with horizontal predictor.
- Uncertainty TIFF: float32 (H, W) as given (batch writes the entropy of the class probabilities
  in nats, 0 to ln K), tiled, Deflate with floating-point predictor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED, WORKING_MPP
from rcmseg.io.atomic import atomic_path
from rcmseg.io.labels import downsample_labels

LABEL_TILE_PX = 512  # as QuPath's own label export
MAP_TILE_PX = 256
LABEL_TIFF_KIND = "rcmseg label map"

Colour = tuple[int, int, int]


def label_tiff_description(
    mpp: float,
    class_names: Sequence[str] = CLASS_NAMES,
    class_colours: Sequence[Colour] = CLASS_COLOURS,
    extra: Mapping[str, object] | None = None,
) -> str:
    """ImageDescription JSON of a label TIFF: kind, pixel size, class names and colours."""
    from rcmseg import __version__

    record = {
        "kind": LABEL_TIFF_KIND,
        "software": f"rcmseg {__version__}",
        "mpp_um": mpp,
        "classes": [
            {"index": index, "name": name, "color": list(colour)}
            for index, (name, colour) in enumerate(zip(class_names, class_colours, strict=True))
        ],
        "unlabelled": UNLABELLED,
    }
    record.update(extra or {})
    # TIFF ASCII tags must be 7-bit: JSON escapes the rest (a mosaic called "Müller.tif")
    return json.dumps(record)


def palette_colormap(
    class_colours: Sequence[Colour] = CLASS_COLOURS, unlabelled_colour: Colour = (128, 128, 128)
) -> np.ndarray:
    """TIFF palette, (3, 256) uint16: class colours, grey for UNLABELLED, black elsewhere."""
    colormap = np.zeros((3, 256), dtype=np.uint16)
    for index, colour in enumerate(class_colours):
        colormap[:, index] = np.asarray(colour, dtype=np.uint16) * 257
    colormap[:, UNLABELLED] = np.asarray(unlabelled_colour, dtype=np.uint16) * 257
    return colormap


def label_pyramid(labels: np.ndarray, tile_px: int = LABEL_TILE_PX) -> list[np.ndarray]:
    """Level 0 and 2×-mode-downsampled levels until the largest side fits in one tile."""
    levels = [labels]
    while max(levels[-1].shape) > tile_px:
        levels.append(downsample_labels(levels[-1], 2))
    return levels


def write_label_tiff(
    path: str | Path,
    labels: np.ndarray,
    mpp: float = WORKING_MPP,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    class_colours: Sequence[Colour] = CLASS_COLOURS,
    tile_px: int = LABEL_TILE_PX,
    extra_metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write a pyramidal palette TIFF of class indices (module docstring has the layout).

    Args:
        labels: uint8 (H, W) class indices (0..K-1, or UNLABELLED) at ``mpp`` µm/px.
        mpp: pixel size of ``labels`` in µm; level n is stored at ``mpp · 2**n``.
        extra_metadata: more keys for the ImageDescription JSON (e.g. source mosaic, model).
    """
    import tifffile

    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be uint8 (H, W), got {labels.dtype} {labels.shape}")
    description = label_tiff_description(mpp, class_names, class_colours, extra_metadata)
    colormap = palette_colormap(class_colours)
    levels = label_pyramid(labels, tile_px)
    with (
        atomic_path(path) as partial,
        tifffile.TiffWriter(partial, bigtiff=_needs_bigtiff(labels)) as tiff,
    ):
        for level, array in enumerate(levels):
            level_mpp = mpp * labels.shape[1] / array.shape[1]
            tiff.write(
                array,
                photometric="palette",
                colormap=colormap,
                tile=(tile_px, tile_px),
                compression="zlib",
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=description if level == 0 else None,
                software="rcmseg",
                metadata=None,
            )
    return Path(path)


def _needs_bigtiff(array: np.ndarray) -> bool:
    return array.nbytes * 4 // 3 > 2**31  # pyramid included, with room for the IFDs


def is_complete_label_tiff(path: str | Path, expected_shape: tuple[int, int]) -> bool:
    """True if ``path`` is a whole, readable rcmseg label TIFF of (H, W) ``expected_shape``.

    Checks the kind recorded in ImageDescription, the size and type of level 0, that every tile
    of every level lies inside the file, and that the smallest level decodes. Never raises.
    """
    import tifffile

    path = Path(path)
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tiff:
            first = tiff.pages[0]
            if json.loads(first.description).get("kind") != LABEL_TIFF_KIND:
                return False
            if first.shape[:2] != tuple(expected_shape) or first.dtype != np.uint8:
                return False
            for page in tiff.pages:
                counts = page.databytecounts
                ends = [o + n for o, n in zip(page.dataoffsets, counts, strict=True)]
                if min(counts) == 0 or max(ends) > size:
                    return False
            tiff.pages[-1].asarray()
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not complete"
        return False


# ---------------------------------------------------------------------------------------------
# Probability and uncertainty TIFFs


def write_probability_tiff(
    path: str | Path,
    probabilities: np.ndarray,
    mpp: float = WORKING_MPP,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    tile_px: int = MAP_TILE_PX,
) -> Path:
    """Write class probabilities (K, H, W) in [0, 1] as an OME-TIFF of uint8 ``round(255 · p)``.

    One channel per class, named after it; pixel size ``mpp`` µm in the OME metadata and the
    resolution tags. Read back with ``tifffile.imread(path) / 255``.
    """
    import tifffile

    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 3 or probabilities.shape[0] != len(class_names):
        raise ValueError(
            f"probabilities must be ({len(class_names)}, H, W), got {probabilities.shape}"
        )
    quantised = np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    metadata = {
        "axes": "CYX",
        "Channel": {"Name": list(class_names)},
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
        "Description": "class probabilities, value = round(255 * p)",
    }
    with atomic_path(path) as partial:
        tifffile.imwrite(
            partial,
            quantised,
            ome=True,
            photometric="minisblack",
            tile=(tile_px, tile_px),
            compression="zlib",
            predictor=True,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            metadata=metadata,
            software="rcmseg",
        )
    return Path(path)


def write_uncertainty_tiff(
    path: str | Path,
    entropy: np.ndarray,
    mpp: float = WORKING_MPP,
    *,
    unit: str = "nats",
    tile_px: int = MAP_TILE_PX,
) -> Path:
    """Write a per-pixel uncertainty map, float32 (H, W), e.g. entropy in ``unit`` (nats)."""
    import tifffile

    entropy = np.asarray(entropy, dtype=np.float32)
    if entropy.ndim != 2:
        raise ValueError(f"entropy must be (H, W), got {entropy.shape}")
    description = json.dumps(
        {"kind": "rcmseg uncertainty", "quantity": "entropy", "unit": unit, "mpp_um": mpp}
    )
    with atomic_path(path) as partial:
        tifffile.imwrite(
            partial,
            entropy,
            photometric="minisblack",
            tile=(tile_px, tile_px),
            compression="zlib",
            predictor=True,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            description=description,
            software="rcmseg",
            metadata=None,
        )
    return Path(path)
