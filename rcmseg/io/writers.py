"""Segmentation outputs: label, probability and uncertainty TIFFs, overlay PNG, QuPath GeoJSON.

Every writer goes through :func:`atomic_path`: the file is written under a temporary sibling name
(``<name>.partial-<pid>``) and renamed into place only once complete, so an interrupted run never
leaves a file that looks finished.

Layouts chosen so that tifffile, tiffslide, OpenSlide and QuPath all read the label map:

- Label TIFF: uint8 class indices, palette photometric with the class colours, 512 px tiles,
  Deflate (zlib), resolution tags in px/cm (``1e4 / mpp``). The pyramid is written as
  reduced-resolution pages (NewSubfileType 1) in the main IFD chain, which OpenSlide needs and
  tifffile/tiffslide read as ``series[0].levels``. Each level halves the previous one by the mode
  of 2×2 blocks (a class label, never an average). Class names and colours are also stored as
  JSON in ImageDescription (see :func:`label_tiff_description`).
- Probability TIFF: OME-TIFF, (K, H, W) uint8 with ``value = round(255 · p)`` (one channel per
  class, named after it), tiled, Deflate with horizontal predictor.
- Uncertainty TIFF: float32 (H, W) as given (batch writes the entropy of the class probabilities
  in nats, 0 to ln K), tiled, Deflate with floating-point predictor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED, WORKING_MPP
from rcmseg.io.atomic import atomic_path

LABEL_TILE_PX = 512  # as QuPath's own label export
MAP_TILE_PX = 256
LABEL_TIFF_KIND = "rcmseg label map"
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)

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
    return json.dumps(record, ensure_ascii=False)


def palette_colormap(
    class_colours: Sequence[Colour] = CLASS_COLOURS, unlabelled_colour: Colour = (128, 128, 128)
) -> np.ndarray:
    """TIFF palette, (3, 256) uint16: class colours, grey for UNLABELLED, black elsewhere."""
    colormap = np.zeros((3, 256), dtype=np.uint16)
    for index, colour in enumerate(class_colours):
        colormap[:, index] = np.asarray(colour, dtype=np.uint16) * 257
    colormap[:, UNLABELLED] = np.asarray(unlabelled_colour, dtype=np.uint16) * 257
    return colormap


def mode_downsample_2x(labels: np.ndarray) -> np.ndarray:
    """Halve a label map: each output pixel is the most frequent value of its 2×2 block.

    Ties go to the earliest of (top-left, top-right, bottom-left, bottom-right). Odd sizes are
    padded by repeating the last row/column, so the output is ``ceil(H/2) × ceil(W/2)``.
    """
    padded = np.pad(labels, ((0, labels.shape[0] % 2), (0, labels.shape[1] % 2)), mode="edge")
    corners = [padded[0::2, 0::2], padded[0::2, 1::2], padded[1::2, 0::2], padded[1::2, 1::2]]
    votes = [sum((corner == other).astype(np.uint8) for other in corners) for corner in corners]
    best, best_votes = corners[0].copy(), votes[0]
    for corner, vote in zip(corners[1:], votes[1:], strict=True):
        better = vote > best_votes
        best[better], best_votes = corner[better], np.maximum(best_votes, vote)
    return best


def label_pyramid(labels: np.ndarray, tile_px: int = LABEL_TILE_PX) -> list[np.ndarray]:
    """Level 0 and 2×-mode-downsampled levels until the largest side fits in one tile."""
    levels = [labels]
    while max(levels[-1].shape) > tile_px:
        levels.append(mode_downsample_2x(levels[-1]))
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


# ---------------------------------------------------------------------------------------------
# Overlay PNG


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
            pixels are left uncoloured. The legend under the picture gives each class's colour,
            name and share of the labelled pixels.
        alpha: weight of the label colour in the blend.
    """
    from PIL import Image

    if np.shape(image) != np.shape(labels):
        raise ValueError(f"image {np.shape(image)} and labels {np.shape(labels)} differ in shape")
    height, width = labels.shape
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey_u8 = np.rint(np.clip(np.asarray(image, dtype=np.float32), 0, 255)).astype(np.uint8)
    grey = Image.fromarray(grey_u8).resize(size, Image.Resampling.BOX)
    small = Image.fromarray(np.asarray(labels, np.uint8)).resize(size, Image.Resampling.NEAREST)
    picture = Image.fromarray(_blend(np.asarray(grey), np.asarray(small), alpha, class_colours))
    counts = np.bincount(labels[labels < len(class_names)].ravel(), minlength=len(class_names))
    shares = counts / max(1, counts.sum())
    entries = [
        f"{name} {100 * share:.0f}%" for name, share in zip(class_names, shares, strict=True)
    ]
    result = _with_legend(picture, entries, class_colours)
    with atomic_path(path) as partial:
        result.save(partial, format="PNG")
    return Path(path)


def _blend(
    grey: np.ndarray, labels: np.ndarray, alpha: float, class_colours: Sequence[Colour]
) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey blended with class colours; other label values stay grey."""
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(class_colours)] = class_colours
    weight = np.where(labels < len(class_colours), alpha, 0.0)[..., None]
    rgb = grey.astype(np.float32)[..., None] * (1 - weight) + lut[labels] * weight
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _with_legend(picture, entries: Sequence[str], colours: Sequence[Colour]):
    """``picture`` with rows of colour swatches and texts added below it."""
    from PIL import Image, ImageDraw, ImageFont

    font_px = 14
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    pad, swatch, row_h = 6, font_px, font_px + 8
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
    legend_h = y + row_h + pad
    canvas = Image.new("RGB", (width, picture.height + legend_h), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for (x, y), text, colour in zip(positions, entries, colours, strict=True):
        top = picture.height + y
        draw.rectangle(
            (x, top + 2, x + swatch, top + 2 + swatch), fill=tuple(colour), outline=(0, 0, 0)
        )
        draw.text((x + swatch + 4, top), text, fill=(0, 0, 0), font=font)
    return canvas


# ---------------------------------------------------------------------------------------------
# QuPath GeoJSON


def write_geojson(
    path: str | Path,
    labels: np.ndarray,
    scale_to_mosaic: float,
    *,
    mpp: float = WORKING_MPP,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    class_colours: Sequence[Colour] = CLASS_COLOURS,
    min_area_px: int = 1,
    simplify_px: float = 0.0,
) -> Path:
    """Write a QuPath-importable FeatureCollection: one polygon per connected region per class.

    Regions are 4-connected; each is traced along pixel edges, so a polygon's area equals its
    pixel count exactly; enclosed holes become interior rings. Collinear vertices are dropped;
    ``simplify_px`` > 0 further applies Douglas-Peucker with that tolerance (working px; up to
    0.5 keeps rings valid in practice).

    Args:
        labels: uint8 (H, W) class indices at the working resolution (``mpp`` µm/px).
        scale_to_mosaic: mosaic pixels per working pixel (``mpp / mosaic_mpp``, e.g. 4.0), so that
            coordinates are in pixels of the mosaic's own full-resolution grid, as QuPath opens it.
        classes: class indices to export (default: all); min_area_px: skip smaller regions.
    """
    features = label_features(
        labels,
        scale_to_mosaic,
        mpp=mpp,
        classes=classes,
        class_names=class_names,
        class_colours=class_colours,
        min_area_px=min_area_px,
        simplify_px=simplify_px,
    )
    collection = {"type": "FeatureCollection", "features": features}
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(collection, ensure_ascii=False), encoding="utf-8")
    return Path(path)


def label_features(
    labels: np.ndarray,
    scale_to_mosaic: float,
    *,
    mpp: float = WORKING_MPP,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    class_colours: Sequence[Colour] = CLASS_COLOURS,
    min_area_px: int = 1,
    simplify_px: float = 0.0,
) -> list[dict]:
    """GeoJSON features (QuPath annotations) of :func:`write_geojson`, as Python objects."""
    labels = np.asarray(labels)
    features = []
    for index in range(len(class_names)) if classes is None else classes:
        classification = {"name": class_names[index], "color": list(class_colours[index])}
        for rings, area_px in region_polygons(labels == index, min_area_px, simplify_px):
            coordinates = [_scaled(ring, scale_to_mosaic) for ring in rings]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": coordinates},
                    "properties": {
                        "objectType": "annotation",
                        "classification": classification,
                        "measurements": {"Area µm^2": round(area_px * mpp * mpp, 3)},
                    },
                }
            )
    return features


def _scaled(ring: np.ndarray, scale: float) -> list[list[float]]:
    scaled = ring.astype(np.float64) * scale
    if float(scale).is_integer():
        return scaled.astype(np.int64).tolist()
    return np.round(scaled, 3).tolist()


def region_polygons(
    mask: np.ndarray, min_area_px: int = 1, simplify_px: float = 0.0
) -> Iterator[tuple[list[np.ndarray], int]]:
    """Polygons of the 4-connected regions of a boolean mask.

    Yields ``(rings, area_px)``: ``rings[0]`` the exterior and the rest the holes, each an (N, 2)
    int array of (x, y) pixel-corner coordinates, closed (first == last); exteriors
    counter-clockwise and holes clockwise in (x, y) (RFC 7946's rule, read with y pointing up).
    ``area_px`` = pixels of the region (holes excluded).
    """
    regions, _count = ndimage.label(mask, structure=_FOUR_CONNECTED)
    for number, box in enumerate(ndimage.find_objects(regions), start=1):
        if box is None:
            continue
        region = regions[box] == number
        area_px = int(region.sum())
        if area_px < min_area_px:
            continue
        # Work in the bounding box plus a one-pixel frame; (x, y) of its corner in the map:
        origin = np.array([box[1].start - 1, box[0].start - 1])
        framed = np.zeros((region.shape[0] + 2, region.shape[1] + 2), dtype=bool)
        framed[1:-1, 1:-1] = region
        # 4-connected pieces of the rest: piece 1 holds the frame (outside), the others are
        # holes. Filling with 4-connected background leaves no pinch vertex on the outline.
        rest, pieces = ndimage.label(~framed, structure=_FOUR_CONNECTED)
        rings = [_oriented(_trace_outline(rest != 1) + origin, exterior=True)]
        if pieces > 1:
            for hole, hole_box in enumerate(ndimage.find_objects(rest)[1:], start=2):
                hole_origin = origin + [hole_box[1].start, hole_box[0].start]
                outline = _trace_outline(rest[hole_box] == hole) + hole_origin
                rings.append(_oriented(outline, exterior=False))
        if simplify_px > 0:
            rings = [_simplified(ring, simplify_px) for ring in rings]
        yield rings, area_px


def _trace_outline(mask: np.ndarray) -> np.ndarray:
    """Closed outline along pixel edges of a hole-free, pinch-free region: (N, 2) (x, y) corners.

    Each boundary pixel edge becomes a directed edge going clockwise round its pixel (image view);
    at every outline vertex exactly one edge leaves, so following them walks the outline.
    """
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    inner = padded[1:-1, 1:-1]
    columns = width + 1
    # (pixels whose neighbour on that side is outside, start corner, end corner) per side
    sides = (
        (inner & ~padded[:-2, 1:-1], (0, 0), (0, 1)),  # top: left → right
        (inner & ~padded[1:-1, 2:], (0, 1), (1, 1)),  # right: top → bottom
        (inner & ~padded[2:, 1:-1], (1, 1), (1, 0)),  # bottom: right → left
        (inner & ~padded[1:-1, :-2], (1, 0), (0, 0)),  # left: bottom → top
    )
    start_ids, end_ids = [], []
    for outside, (start_dr, start_dc), (end_dr, end_dc) in sides:
        rows, cols = np.nonzero(outside)
        start_ids.append((rows + start_dr) * columns + cols + start_dc)
        end_ids.append((rows + end_dr) * columns + cols + end_dc)
    start_ids, end_ids = np.concatenate(start_ids), np.concatenate(end_ids)
    by_start = np.argsort(start_ids)
    next_edge = by_start[np.searchsorted(start_ids[by_start], end_ids)]
    ids = start_ids[_cycle_order(next_edge, first=int(np.argmin(start_ids)))]
    points = np.stack([ids % columns, ids // columns], axis=1)
    return _closed(_corners_only(points))


def _cycle_order(next_edge: np.ndarray, first: int) -> np.ndarray:
    """Edges of the single cycle ``next_edge`` in walking order from ``first``.

    List ranking by pointer doubling (log2(n) vectorised steps instead of a Python loop over
    every pixel edge): cut the cycle before ``first``, then each edge's distance to the cut
    gives its position.
    """
    count = len(next_edge)
    last = int(np.flatnonzero(next_edge == first)[0])
    pointer = next_edge.copy()
    pointer[last] = last
    distance = np.ones(count, dtype=np.int64)
    distance[last] = 0
    for _ in range(max(1, math.ceil(math.log2(count)))):
        distance += distance[pointer]
        pointer = pointer[pointer]
    return np.argsort(-distance, kind="stable")


def _corners_only(points: np.ndarray) -> np.ndarray:
    """Drop vertices where the outline goes straight on (``points`` is an open cycle)."""
    steps = np.diff(points, axis=0, prepend=points[-1:])  # steps[i] = points[i] - points[i-1]
    incoming, outgoing = steps, np.concatenate([steps[1:], steps[:1]])
    return points[np.any(incoming != outgoing, axis=1)]


def _closed(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points, points[:1]])


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring of (x, y) points; positive when counter-clockwise."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def _oriented(ring: np.ndarray, exterior: bool) -> np.ndarray:
    return ring if (signed_area(ring) > 0) == exterior else ring[::-1]


def _simplified(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring; the ring is kept as it is if too little would remain."""
    points = ring[:-1].astype(np.float64)
    if len(points) < 4:
        return ring
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    keep = np.zeros(len(points) + 1, dtype=bool)
    cycle = np.concatenate([points, points[:1]])
    for start, stop in ((0, far), (far, len(points))):
        keep |= _douglas_peucker(cycle, start, stop, tolerance)
    simplified = ring[:-1][keep[:-1]]
    if len(simplified) < 3 or signed_area(_closed(simplified)) * signed_area(ring) <= 0:
        return ring
    return _closed(simplified)


def _douglas_peucker(points: np.ndarray, start: int, stop: int, tolerance: float) -> np.ndarray:
    """Mask of ``points[start..stop]`` kept by Douglas-Peucker (both ends kept)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[start, stop]] = True
    pending = [(start, stop)]
    while pending:
        first, last = pending.pop()
        if last - first < 2:
            continue
        a, b = points[first], points[last]
        between = points[first + 1 : last]
        chord = b - a
        length = math.hypot(*chord)
        if length == 0:
            distance = np.hypot(*(between - a).T)
        else:
            distance = np.abs(chord[0] * (between[:, 1] - a[1]) - chord[1] * (between[:, 0] - a[0]))
            distance = distance / length
        farthest = int(np.argmax(distance))
        if distance[farthest] > tolerance:
            middle = first + 1 + farthest
            keep[middle] = True
            pending += [(first, middle), (middle, last)]
    return keep
