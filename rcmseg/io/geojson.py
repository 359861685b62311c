"""QuPath GeoJSON: writing label maps as annotations, and reading annotations back as label maps.

Writing (``rcmseg batch --geojson``): one Polygon Feature per 4-connected region per class, traced
along pixel edges at the working resolution and scaled to the mosaic's full-resolution pixels
(the grid QuPath opens), holes as interior rings, ``objectType`` "annotation", ``classification``
``{name, color}``, ``measurements`` an object. Rings never touch themselves (valid simple
polygons; a region's exterior is traced around the region with its holes filled, each hole as
its own ring), so shapely/JTS and QuPath accept them. The collection carries the foreign
member ``"rcmseg"`` (RFC 7946 §6.1; QuPath reads only ``features``) right after ``type``, so
that a batch knows its own files from an annotation saved under the same name
(:func:`is_rcmseg_geojson`).

Reading (``rcmseg labels``), as QuPath 0.4-0.7 export annotations (File > Export objects as
GeoJSON, or ``exportObjectsToGeoJson``); the rules:

- Input: a FeatureCollection, a bare list of Features, one Feature, or a bare geometry; UTF-8
  JSON, optionally gzipped.
- Objects: ``properties.objectType`` (or the older ``object_type``/``type``, or a v0.2 type in
  ``id``) "annotation", absent or unknown is an annotation (QuPath's own rule); detections,
  cells, tiles, TMA cores and root objects are ignored and counted.
- Geometry: Polygon and MultiPolygon with holes (interior rings); a GeometryCollection's polygons;
  ellipses, rectangles and brush strokes arrive as polygons. LineString and Point geometries
  (and empty ones) are ignored and counted. Coordinates are full-resolution mosaic pixels with
  the origin at the top-left corner of the top-left pixel.
- Classes: ``classification`` as a string, ``{name, color}`` or ``{names: [...], color}`` (a
  derived class, matched as QuPath writes it: ``"a: b"``). Names match rcmseg's six classes
  case-insensitively, or a ``--remap`` table's names; QuPath's built-in ``Ignore*`` class means
  unlabelled. Unclassified annotations are skipped (unlabelled) and counted; an unknown name is an
  error naming it and the known names. ``measurements`` (object or list) are not read.
- Pixel rule: a pixel is inside a polygon when its centre ``(col + 0.5, row + 0.5)`` is inside by
  the even-odd rule over the polygon's rings (a centre exactly on a vertical edge belongs to the
  pixel on the edge's right). Holes therefore stay unlabelled unless another annotation covers
  them. A polygon whose vertices lie on pixel corners (what ``rcmseg batch`` writes) covers
  exactly the pixels it outlines.
- Overlaps: the smaller annotation (by polygon area) wins, as a corrected detail sits inside a
  coarse region; equal areas: the later one in the file wins. Pixels of a larger annotation that
  a smaller one covers are counted (``overlap_px``).
- Coordinates past the mosaic are clipped; annotations reaching past it are counted.
"""

from __future__ import annotations

import gc
import gzip
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED, WORKING_MPP
from rcmseg.errors import InputError, os_reason
from rcmseg.io.atomic import write_text_atomic

__all__ = [
    "Annotation",
    "AnnotationSet",
    "RasterCounts",
    "class_table",
    "is_rcmseg_geojson",
    "label_features",
    "label_polygons",
    "parse_annotations",
    "rasterise",
    "read_annotations",
    "region_polygons",
    "signed_area",
    "write_geojson",
]

Colour = tuple[int, int, int]
GEOJSON_MARK = "rcmseg"
# How every file write_geojson writes begins (json.dumps keeps the key order).
_MARKED_START = f'{{"type": "FeatureCollection", "{GEOJSON_MARK}": '
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)

# ---------------------------------------------------------------------------------------------
# Writing


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
    from rcmseg import __version__

    collection = {
        "type": "FeatureCollection",
        GEOJSON_MARK: {"kind": "label outlines", "version": __version__},
        "features": features,
    }
    return write_text_atomic(path, json.dumps(collection, ensure_ascii=False))


def is_rcmseg_geojson(path: str | Path) -> bool:
    """Whether ``path`` is a GeoJSON file :func:`write_geojson` wrote (read from its start only),
    and not, say, a QuPath export saved under the same name."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(len(_MARKED_START)) == _MARKED_START
    except OSError:
        return False


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
    classes = range(len(class_names)) if classes is None else classes
    classifications = {
        index: {"name": class_names[index], "color": list(class_colours[index])}
        for index in classes
    }
    with collector_paused():
        return [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_scaled(ring, scale_to_mosaic) for ring in rings],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": classifications[index],
                    "measurements": {"Area µm^2": round(area_px * mpp * mpp, 3)},
                },
            }
            for index, rings, area_px in label_polygons(labels, classes, min_area_px, simplify_px)
        ]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a block builds many small containers that
    hold no cycles (a map's outlines: one list per vertex, millions on a fragmented map). Every
    700 new containers start a collection that walks the young ones, and the older generations
    are walked again and again as they grow: on a 3000² map with 23000 regions that took about
    nine tenths of the time spent turning the rings into lists. Such lists are freed by
    reference counting alone, so nothing is lost by not collecting; the collector runs again
    (if it was on) when the block ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _scaled(ring: np.ndarray, scale: float) -> list[list[float]]:
    if float(scale).is_integer():
        return (ring * int(scale)).tolist()
    return np.round(ring * scale, 3).tolist()


def region_polygons(
    mask: np.ndarray, min_area_px: int = 1, simplify_px: float = 0.0, holes: bool = True
) -> Iterator[tuple[list[np.ndarray], int]]:
    """:func:`label_polygons` of a boolean mask: ``(rings, area_px)`` per region."""
    for _index, rings, area_px in label_polygons(
        np.asarray(mask, dtype=bool).view(np.uint8), [1], min_area_px, simplify_px, holes
    ):
        yield rings, area_px


def label_polygons(
    labels: np.ndarray,
    classes: Sequence[int],
    min_area_px: int = 1,
    simplify_px: float = 0.0,
    holes: bool = True,
) -> Iterator[tuple[int, list[np.ndarray], int]]:
    """Polygons of the 4-connected regions of each class of a label map, class by class in the
    order of ``classes``, and each class's regions in raster order.

    Yields ``(class_index, rings, area_px)``: ``rings[0]`` the exterior and the rest the holes
    (left out when ``holes`` is false, for formats without them), each an (N, 2) int array of
    (x, y) pixel-corner coordinates, closed (first == last), starting at its top-left vertex;
    exteriors counter-clockwise and holes clockwise in (x, y) (RFC 7946's rule, read with y
    pointing up). A hole is a 4-connected piece of the rest that the region encloses, so no ring
    touches itself. ``area_px`` = pixels of the region (holes excluded); smaller than
    ``min_area_px`` is skipped; ``simplify_px`` > 0 applies Douglas-Peucker to each ring.
    """
    labels = np.asarray(labels)
    regions = np.zeros(labels.shape, np.int32)
    region_class = [0]
    for index in classes:
        found, count = ndimage.label(labels == index, structure=_FOUR_CONNECTED)
        np.add(found, len(region_class) - 1, out=regions, where=found > 0)
        region_class += [index] * count
    areas = np.bincount(regions.ravel(), minlength=len(region_class)).tolist()
    for points, ring_region, ring_starts in _region_rings(regions):
        bounds = np.append(ring_starts, len(points)).tolist()  # ring k: bounds[k]:bounds[k + 1]
        # Region first + j's rings are first_ring[j] .. first_ring[j + 1] - 1, exterior first.
        first = int(ring_region[0])
        first_ring = np.searchsorted(ring_region, np.arange(first, ring_region[-1] + 2)).tolist()
        for j, region in enumerate(range(first, int(ring_region[-1]) + 1)):
            if areas[region] < min_area_px:
                continue
            last_ring = first_ring[j + 1] if holes else first_ring[j] + 1
            rings = [points[bounds[k] : bounds[k + 1]] for k in range(first_ring[j], last_ring)]
            if simplify_px > 0:
                rings = [_simplified(ring, simplify_px) for ring in rings]
            yield region_class[region], rings, areas[region]


def _region_rings(
    regions: np.ndarray, edges_per_part: int = 1 << 19
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every ring of every region of a region map (0: none), traced along pixel edges.

    Each pixel edge between a region and anything else becomes a directed edge going clockwise
    round its pixel (image view); a ring is a cycle of one region's edges. At a vertex where
    two pixels of one region touch only diagonally, two of its edges leave; the walk switches
    to the other pixel, which keeps the pixels they enclose out of the region's exterior (a hole
    of their own) and no ring touches itself. Cycles are found and put in order with array
    operations rather than a loop per region (a fragmented 3000² map has 10⁵ regions), in parts
    of about ``edges_per_part`` edges (whole regions) to bound the memory.

    Yields, part by part in region order, ``(points, ring_region, ring_starts)``: ``points``
    (P, 2) int64 (x, y) of closed rings one after another, by region number, each region's
    exterior first and then its holes by their top-left vertex; ``ring_region`` (R,) the region
    of each ring; ``ring_starts`` (R,) where each ring begins in ``points``.
    """
    height, width = regions.shape
    columns, corners = width + 1, (height + 1) * (width + 1)
    padded = np.pad(regions, 1)
    centre = padded[1:-1, 1:-1]
    # (neighbour on that side, start corner) of each pixel edge, by side; the sides are numbered
    # by the direction the edge goes, so a ring turns where the side changes.
    sides = (
        (padded[:-2, 1:-1], 0),  # top: left → right
        (padded[1:-1, 2:], 1),  # right: top → bottom
        (padded[2:, 1:-1], columns + 1),  # bottom: right → left
        (padded[1:-1, :-2], columns),  # left: bottom → top
    )
    keys = []
    for side, (neighbour, start_offset) in enumerate(sides):
        rows, cols = np.nonzero((centre > 0) & (neighbour != centre))
        region = centre[rows, cols].astype(np.int64)
        # Unique per edge; sorts the edges by region, then start vertex.
        keys.append((region * corners + rows * columns + cols + start_offset) * 4 + side)
    key = np.concatenate(keys)
    del keys
    key.sort()
    low = 0
    while low < len(key):
        high = min(low + edges_per_part, len(key))
        if high < len(key):  # end the part with a whole region
            high = int(np.searchsorted(key, (key[high - 1] // (4 * corners) + 1) * 4 * corners))
        yield _part_rings(key[low:high], corners, columns)
        low = high


def _part_rings(
    key: np.ndarray, corners: int, columns: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rings of the edges of whole regions (sorted ``key``); see :func:`_region_rings`."""
    origin, side = np.divmod(key, 4)  # origin: region * corners + start vertex
    step = np.array([1, columns, -1, -columns])[side]  # to the end vertex
    to_pixel = np.array([0, 1, columns + 1, columns])[side]  # to the pixel's top-left corner
    next_edge = _next_edges(origin, origin + step, origin - to_pixel)
    del step, to_pixel
    count = len(key)
    _cycles, cycle = connected_components(
        coo_matrix((np.ones(count, np.int8), (np.arange(count), next_edge)), shape=(count, count)),
        directed=True,
        connection="weak",
    )
    # In key order a cycle's first edge leaves its top-left vertex, and a region's first cycle
    # is its exterior (its top-left pixel's top edge faces the outside).
    _labels, first_of_cycle = np.unique(cycle, return_index=True)
    cycle_first = first_of_cycle[cycle]
    walk = np.lexsort((-_steps_to_cycle_end(next_edge, first_of_cycle), cycle_first))
    starts = np.flatnonzero(np.diff(cycle_first[walk], prepend=-1))
    region, vertex = np.divmod(origin[walk], corners)
    side = side[walk]
    turns = side != np.roll(side, 1)
    turns[starts] = side[starts] != side[np.append(starts[1:], count) - 1]  # wrap in each ring
    ring, _position, _length = _ring_layout(starts, count)
    kept = np.bincount(ring[turns], minlength=len(starts))
    starts_kept = np.concatenate([[0], np.cumsum(kept)[:-1]])
    vertex = vertex[turns]
    xy = np.stack([vertex % columns, vertex // columns], axis=1)
    ring_region = region[starts]
    exterior = np.diff(ring_region, prepend=0) != 0
    points, ring_starts = _closed_rings(_reoriented(xy, starts_kept, exterior), starts_kept)
    return points, ring_region, ring_starts


def _next_edges(origin: np.ndarray, target: np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """The edge that follows each edge: the one of its region leaving its end vertex, or of two
    such (diagonal pixels), the other pixel's. ``origin``/``target``: region * corners + start
    / end vertex, edges sorted by ``origin``; ``pixel``: any number unique to the edge's pixel."""
    following = np.searchsorted(origin, target)
    second = np.minimum(following + 1, len(origin) - 1)
    switch = (origin[second] == target) & (pixel[following] == pixel)
    return np.where(switch, second, following)


def _steps_to_cycle_end(next_edge: np.ndarray, first_of_cycle: np.ndarray) -> np.ndarray:
    """Steps from each edge to its cycle's last edge (the one before ``first_of_cycle``).

    List ranking by pointer jumping: log2(longest cycle) vectorised rounds, each over the edges
    not yet done, instead of a Python loop over every pixel edge.
    """
    previous = np.empty_like(next_edge)
    previous[next_edge] = np.arange(len(next_edge))
    last = previous[first_of_cycle]
    pointer = next_edge.copy()
    pointer[last] = last
    steps = np.ones(len(next_edge), np.int64)
    steps[last] = 0
    active = np.flatnonzero(pointer[pointer] != pointer)
    while len(active):
        target = pointer[active]
        steps[active] += steps[target]
        pointer[active] = pointer[target]
        active = active[pointer[pointer[active]] != pointer[active]]
    return steps


def _ring_layout(starts: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ring of each point, its position in the ring, its ring's length) for rings packed
    one after another from ``starts`` in ``count`` points."""
    lengths = np.diff(starts, append=count)
    ring = np.repeat(np.arange(len(starts)), lengths)
    return ring, np.arange(count) - starts[ring], lengths[ring]


def _reoriented(xy: np.ndarray, starts: np.ndarray, exterior: np.ndarray) -> np.ndarray:
    """Rings turned where needed so exteriors have positive and holes negative signed area;
    each keeps its first vertex."""
    ring, position, length = _ring_layout(starts, len(xy))
    index = np.arange(len(xy))
    after = np.where(position == length - 1, index - position, index + 1)
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    twice_area = np.add.reduceat(x * y[after] - x[after] * y, starts)
    flip = (twice_area > 0) != exterior
    source = np.where(flip[ring] & (position > 0), index - position + length - position, index)
    return xy[source]


def _closed_rings(xy: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each open ring packed from ``starts`` closed by repeating its first vertex at its end."""
    stops = np.append(starts[1:], len(xy))
    gather = np.insert(np.arange(len(xy)), stops, starts)
    return xy[gather], starts + np.arange(len(starts))


def _closed(points: np.ndarray) -> np.ndarray:
    return np.concatenate([points, points[:1]])


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring of (x, y) points; positive when counter-clockwise."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


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


# ---------------------------------------------------------------------------------------------
# Reading

# objectType values (and QuPath 0.2's class names) of objects that are not annotations.
_NON_ANNOTATION_TYPES = frozenset(
    {
        "detection",
        "cell",
        "tile",
        "tmacore",
        "tma_core",
        "root",
        "pathdetectionobject",
        "pathcellobject",
        "pathtileobject",
        "tmacoreobject",
        "pathrootobject",
    }
)
_LEGACY_TYPE_IDS = frozenset(
    {"PathAnnotationObject", "PathDetectionObject", "PathCellObject", "PathTileObject"}
    | {"TMACoreObject", "PathRootObject"}
)
# QuPath's built-in class for "leave this out of training".
IGNORE_CLASS = "ignore*"


@dataclass(frozen=True)
class Annotation:
    """One classified annotation: its polygons in mosaic pixels and the label it paints.

    ``polygons``: each a list of rings, ``rings[0]`` the exterior and the rest holes, each an
    (N, 2) float64 array of (x, y) full-resolution pixel coordinates. ``label``: class index or
    UNLABELLED. ``area_px``: polygon area in px² (holes excluded), which orders overlaps.
    """

    label: int
    polygons: list[list[np.ndarray]]
    area_px: float


@dataclass
class AnnotationSet:
    """What a GeoJSON file holds: the annotations to paint and counts of what was left out."""

    annotations: list[Annotation] = field(default_factory=list)
    ignored_objects: int = 0  # detections, cells, tiles, TMA cores
    ignored_geometries: int = 0  # annotations that are lines, points or empty
    unclassified: int = 0  # annotations without a class


def class_table(remap_names: Mapping[str, int] | None = None) -> dict[str, int]:
    """Lower-case class name -> label: rcmseg's classes, ``Ignore*``, then the remap table's."""
    table = {name.lower(): index for index, name in enumerate(CLASS_NAMES)}
    table[IGNORE_CLASS] = UNLABELLED
    table.update({" ".join(k.split()).lower(): v for k, v in (remap_names or {}).items()})
    return table


def _load_json(path: Path) -> object:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(path, f"cannot read GeoJSON ({os_reason(error)})") from None
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with collector_paused():
            return json.loads(data.decode("utf-8-sig"))
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot decode GeoJSON ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(
            path, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None


def _features(document: object, path: Path) -> list[dict]:
    """The Features of a FeatureCollection, a list, a Feature or a bare geometry."""
    if isinstance(document, list):
        items = document
    elif isinstance(document, dict) and (
        document.get("type") == "FeatureCollection" or "features" in document
    ):
        items = document.get("features")
        if not isinstance(items, list):
            raise InputError(path, "FeatureCollection has no 'features' list")
    elif isinstance(document, dict):
        items = [document]
    else:
        raise InputError(path, "expected a GeoJSON FeatureCollection, Feature or list of Features")
    features = []
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(path, f"feature {number} is not a JSON object")
        is_feature = item.get("type") == "Feature" or "geometry" in item
        features.append(item if is_feature else {"type": "Feature", "geometry": item})
    return features


def _object_type(feature: dict) -> str:
    properties = feature.get("properties") or {}
    for key in ("objectType", "object_type", "type"):
        if isinstance(properties.get(key), str):
            return properties[key]
    if feature.get("id") in _LEGACY_TYPE_IDS:
        return str(feature["id"])
    return "annotation"


def _class_name(classification: object) -> str | None:
    """QuPath's class name of a ``classification`` value (None: unclassified)."""
    if isinstance(classification, str):
        return classification
    if isinstance(classification, dict):
        names = classification.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(name) for name in names)
        if isinstance(classification.get("name"), str):
            return classification["name"]
    return None


def _class_label(name: str, table: Mapping[str, int], path: Path) -> int:
    key = " ".join(name.split()).lower()
    if key not in table:
        known = ", ".join(dict.fromkeys([*CLASS_NAMES, *table]))
        raise InputError(
            path,
            f"annotation class {name!r} is not a known class; known (any case): {known}; "
            "map other names with --remap",
        )
    return table[key]


def _ring(coordinates: object) -> np.ndarray:
    ring = np.asarray(coordinates, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2 or not np.isfinite(ring[:, :2]).all():
        raise ValueError("a ring is not a list of [x, y] numbers")
    ring = ring[:, :2]
    if len(ring) and (ring[0] != ring[-1]).any():
        ring = np.concatenate([ring, ring[:1]])
    return ring


def _polygons(geometry: object) -> list[list[np.ndarray]]:
    """Polygons (lists of rings) of a geometry; lines and points give none."""
    if not isinstance(geometry, dict):
        return []
    kind, coordinates = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        parts = [coordinates]
    elif kind == "MultiPolygon":
        parts = coordinates
    elif kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _polygons(g)]
    else:
        return []
    if not isinstance(parts, list):
        raise ValueError(f"{kind} coordinates are not a list")
    polygons = []
    for part in parts:
        rings = [_ring(ring) for ring in part or []]
        if rings and len(rings[0]) >= 4:  # a closed ring with at least three corners
            polygons.append([ring for ring in rings if len(ring) >= 4])
    return polygons


def polygon_area(rings: Sequence[np.ndarray]) -> float:
    """Area in px² of a polygon: its exterior ring minus its holes (orientation ignored)."""
    exterior, *holes = (abs(signed_area(ring)) for ring in rings)
    return max(0.0, exterior - sum(holes))


def parse_annotations(
    document: object, path: Path, names: Mapping[str, int] | None = None
) -> AnnotationSet:
    """Annotations of a parsed GeoJSON document (see the module docstring for the rules).

    Args:
        document: the JSON value of the file. path: named in errors.
        names: lower-case class name -> label (default :func:`class_table`).

    Raises:
        InputError: not GeoJSON, malformed coordinates, or an unknown class name.
    """
    table = class_table() if names is None else names
    result = AnnotationSet()
    for number, feature in enumerate(_features(document, path)):
        if _object_type(feature).lower() in _NON_ANNOTATION_TYPES:
            result.ignored_objects += 1
            continue
        try:
            polygons = _polygons(feature.get("geometry"))
        except (ValueError, TypeError) as error:
            raise InputError(path, f"feature {number}: bad geometry ({error})") from None
        if not polygons:
            result.ignored_geometries += 1
            continue
        name = _class_name((feature.get("properties") or {}).get("classification"))
        if name is None or not name.strip():
            result.unclassified += 1
            continue
        area = sum(polygon_area(rings) for rings in polygons)
        result.annotations.append(Annotation(_class_label(name, table, path), polygons, area))
    return result


def read_annotations(path: str | Path, names: Mapping[str, int] | None = None) -> AnnotationSet:
    """Read a QuPath GeoJSON export (see :func:`parse_annotations`)."""
    path = Path(path)
    return parse_annotations(_load_json(path), path, names)


# ---------------------------------------------------------------------------------------------
# Rasterising

# Crossing-parity cells filled at once per polygon: bounds the temporary memory (bytes ~ 2x this).
_FILL_CELLS = 1 << 23


@dataclass
class RasterCounts:
    """What painting annotations onto the mosaic grid did."""

    overlapping: int = 0  # annotations covering pixels already painted by a larger one
    overlap_px: int = 0  # such pixels, counted once per annotation painted over them
    clipped: int = 0  # annotations reaching past the mosaic's edges


def _crossings(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Where the rings cross each pixel row's centre line: (rows, first column right of it).

    A pixel (r, c) is inside by the even-odd rule when an odd number of crossings of row r have
    column <= c, i.e. lie at x <= c + 0.5. Columns are clipped to 0..W (W = no pixel affected).
    """
    height, width = shape
    rows_out, cols_out = [], []
    for ring in rings:
        (x0, y0), (x1, y1) = ring[:-1].T, ring[1:].T
        low, high = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows whose centre r + 0.5 lies in [low, high): half-open, so a vertex counts once.
        first = np.clip(np.ceil(low - 0.5), 0, height).astype(np.int64)
        stop = np.clip(np.ceil(high - 0.5), 0, height).astype(np.int64)
        counts = np.maximum(stop - first, 0)
        edge = np.repeat(np.arange(len(counts)), counts)
        rows = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows += first[edge]
        centre = rows + 0.5
        x = x0[edge] + (centre - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        rows_out.append(rows)
        cols_out.append(np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64))
    return np.concatenate(rows_out), np.concatenate(cols_out)


def polygon_strips(
    rings: Sequence[np.ndarray], shape: tuple[int, int]
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """The pixels of the (H, W) grid inside a polygon, in strips of its bounding box.

    Yields ``(rows, cols, mask)``: slices of the grid and a bool mask of that window. Even-odd
    rule over all ``rings`` with the pixel-centre rule of the module docstring; the window is
    clipped to the grid, and temporary memory is bounded by ``_FILL_CELLS``.
    """
    rows, cols = _crossings(rings, shape)
    if rows.size == 0:
        return
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    left, right = int(cols.min()), min(int(cols.max()), shape[1])
    if right <= left:
        return
    width = right - left + 1
    step = max(1, _FILL_CELLS // width)
    for top in range(int(rows[0]), int(rows[-1]) + 1, step):
        bottom = min(top + step, int(rows[-1]) + 1)
        lo, hi = np.searchsorted(rows, [top, bottom])
        toggles = np.zeros((bottom - top, width), dtype=np.uint8)
        np.add.at(toggles, (rows[lo:hi] - top, cols[lo:hi] - left), 1)
        inside = np.bitwise_xor.accumulate(toggles & 1, axis=1)[:, :-1].view(bool)
        yield slice(top, bottom), slice(left, right), inside


def _reaches_past(polygons: Sequence[Sequence[np.ndarray]], shape: tuple[int, int]) -> bool:
    exteriors = np.concatenate([rings[0] for rings in polygons])
    return bool(
        (exteriors < 0).any()
        or (exteriors[:, 0] > shape[1]).any()
        or (exteriors[:, 1] > shape[0]).any()
    )


def rasterise(
    annotations: Sequence[Annotation], shape: tuple[int, int]
) -> tuple[np.ndarray, RasterCounts]:
    """Paint annotations onto an (H, W) full-resolution grid: uint8 labels, 255 = unlabelled.

    Larger annotations first, so the smaller one wins where they overlap (equal areas: file order,
    the later wins). Memory: the label map plus bounded strips (:func:`polygon_strips`).
    """
    labels = np.full(shape, UNLABELLED, dtype=np.uint8)
    counts = RasterCounts()
    order = sorted(range(len(annotations)), key=lambda i: -annotations[i].area_px)
    for annotation in (annotations[i] for i in order):
        counts.clipped += _reaches_past(annotation.polygons, shape)
        covered = 0
        for rings in annotation.polygons:
            for rows, cols, inside in polygon_strips(rings, shape):
                window = labels[rows, cols]
                covered += int(np.count_nonzero(inside & (window != UNLABELLED)))
                window[inside] = annotation.label
        counts.overlapping += covered > 0
        counts.overlap_px += covered
    return labels, counts
