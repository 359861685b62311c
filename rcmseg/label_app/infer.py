"""Infer task: MED-Net label maps at the mosaic's own pixel grid, for a whole mosaic or a region.

The task reads, resamples and segments with the code behind ``rcmseg batch``
(:func:`rcmseg.io.mosaics.read_mosaic` and :class:`rcmseg.inference.SegmentationEngine`), so a
mosaic gets the same labels from both. It implements MONAI Label's
:class:`~monailabel.interfaces.tasks.infer_v2.InferTask` directly rather than ``BasicInferTask``,
whose transform pipeline and constant-weight sliding window would be a second segmentation path.

Requests (MONAI Label's ``/infer/{model}`` params or ``/infer/wsi_v2/{model}`` body):
    image: path of the mosaic (MONAI Label resolves datastore ids).
    location, size: region ``[x, y]``, ``[width, height]`` in mosaic pixels (level 0); a size of
        ``[0, 0]`` or none means the whole mosaic.
    output: ``asap`` / ``dsa`` (a polygon file for viewers), ``json`` (polygons in the reply),
        else a label TIFF: uint8, mosaic pixels, class indices 0..5, pixel size in the tags.
    min_poly_area: polygons smaller than this many mosaic pixels are dropped (viewer outputs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.others.pathology import (
    create_asap_annotations_xml,
    create_dsa_annotations_json,
)

from rcmseg.batch import check_size
from rcmseg.bundle import LoadedBundle, segmenting_with
from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, MOSAIC_MPP
from rcmseg.errors import InputError
from rcmseg.inference import SegmentationEngine
from rcmseg.io.geojson import collector_paused, label_polygons, signed_area
from rcmseg.io.mosaics import MosaicInfo, read_mosaic
from rcmseg.label_app.pixel_sizes import StudyPixelSizes
from rcmseg.label_app.workspace import ServedModel

logger = logging.getLogger(__name__)

VIEWER_OUTPUTS = ("asap", "dsa", "json")
MIN_POLY_AREA_PX = 80  # MONAI Label's default for WSI polygons, in mosaic pixels


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """Answer bad input with HTTP 400 and the one-line :class:`InputError` message."""
    try:
        yield
    except InputError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


@functools.lru_cache(maxsize=2)
def _read_working_image(
    path: str, mtime_ns: int, size: int, fallback_mpp: float
) -> tuple[np.ndarray, MosaicInfo]:
    # Keyed on the file's stamp: viewers ask for many regions of one mosaic in a row.
    del mtime_ns, size
    return read_mosaic(path, fallback_mpp=fallback_mpp)


def read_working_image(
    path: Path, pixel_sizes: StudyPixelSizes | None = None
) -> tuple[np.ndarray, MosaicInfo]:
    """The mosaic at the working resolution (float32 (H', W'), 0-255), cached per file version;
    a file without a pixel size is read at the one ``pixel_sizes`` gives (none: 0.5 µm/px)."""
    try:
        stat = path.stat()
    except OSError:
        raise InputError(path, "mosaic not found") from None
    fallback_mpp = pixel_sizes.fallback_mpp(path) if pixel_sizes is not None else MOSAIC_MPP
    return _read_working_image(str(path), stat.st_mtime_ns, stat.st_size, fallback_mpp)


@dataclass(frozen=True)
class Region:
    """A rectangle in mosaic pixels (level 0): origin ``x``, ``y`` and ``width`` × ``height``."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def from_request(cls, request: dict[str, Any], info: MosaicInfo) -> Region:
        """The requested region clipped to the mosaic; the whole mosaic when none is asked."""
        x, y = (int(v) for v in (request.get("location") or (0, 0)))
        width, height = (int(v) for v in (request.get("size") or (0, 0)))
        if int(request.get("level") or 0) != 0:
            raise InputError(info.path, "only level 0 (full resolution) regions are supported")
        if width <= 0 or height <= 0:
            return cls(0, 0, info.width_px, info.height_px)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, info.width_px), min(y + height, info.height_px)
        if x1 <= x0 or y1 <= y0:
            raise InputError(
                info.path,
                f"region at ({x}, {y}) of {width}×{height} px lies outside the "
                f"{info.width_px}×{info.height_px} px mosaic",
            )
        return cls(x0, y0, x1 - x0, y1 - y0)

    def is_whole(self, info: MosaicInfo) -> bool:
        return (self.x, self.y, self.width, self.height) == (0, 0, info.width_px, info.height_px)


def working_index(start: int, count: int, scale: float, limit: int) -> np.ndarray:
    """Working-grid index of each mosaic pixel ``start .. start + count - 1`` along one axis.

    ``scale`` is working pixels per mosaic pixel (0.25 for 0.5 → 2 µm/px); a mosaic pixel takes
    the working pixel its centre falls in, clipped to the ``limit`` working pixels.
    """
    centres = (np.arange(start, start + count) + 0.5) * scale
    return np.minimum(centres.astype(np.intp), limit - 1)


@dataclass(frozen=True)
class Segmentation:
    """Labels of a region at the mosaic grid, and the region's mean per-pixel entropy (nats).

    ``outline_grid`` holds the same labels on the coarser of the two grids (the working grid's
    pixels that the region's pixels take, or the mosaic grid itself), and ``edges_x`` /
    ``edges_y`` the mosaic-pixel coordinate of each of its pixel edges (lengths W + 1, H + 1):
    outlines traced on it and mapped through the edges are those of ``labels``.
    """

    labels: np.ndarray
    mean_entropy: float
    outline_grid: np.ndarray
    edges_x: np.ndarray
    edges_y: np.ndarray


@dataclass(frozen=True)
class Runtime:
    """How the served network runs (the app options ``precision``, ``backend`` and
    ``openvino_cache``; :class:`~rcmseg.inference.SegmentationEngine`)."""

    precision: str = "auto"
    backend: str = "torch"
    openvino_cache: str | None = None


def segment_region(
    image: np.ndarray,
    info: MosaicInfo,
    region: Region,
    bundle: LoadedBundle,
    preset: str,
    runtime: Runtime = Runtime(),
) -> Segmentation:
    """Segment ``region`` as a whole-mosaic run would; labels at the mosaic grid.

    The engine runs only the windows that reach the region, on the whole image's window grid
    (:meth:`rcmseg.inference.SegmentationEngine.segment` with rows and columns), so regions,
    tiles and whole mosaics agree pixel for pixel.

    Args:
        image: the whole mosaic at the working resolution, float32 (H', W') on the 0-255 scale.
        info: the mosaic's header (full-resolution size and µm/px).
        region: rectangle in mosaic pixels.

    Returns:
        uint8 (region.height, region.width) class indices, nearest-neighbour from the working grid,
        and the mean entropy of the region's working pixels.
    """
    scale = info.mosaic_mpp / bundle.working_mpp
    height, width = image.shape
    check_size(width, height, info.path)
    rows = working_index(region.y, region.height, scale, height)
    cols = working_index(region.x, region.width, scale, width)
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    engine = engine_for(bundle, preset, runtime)
    maps = engine.segment(image, (r0, r1), (c0, c1), entropy=True)
    labels = maps.labels[(rows - r0)[:, None], (cols - c0)[None, :]]
    assert maps.entropy is not None  # asked for with entropy=True
    if scale < 1:  # every working pixel of the block is taken by some mosaic pixel
        grid, edges_y, edges_x = maps.labels, _edges(rows, region.y), _edges(cols, region.x)
    else:
        grid = labels
        edges_y = region.y + np.arange(region.height + 1)
        edges_x = region.x + np.arange(region.width + 1)
    return Segmentation(labels, float(maps.entropy.mean()), grid, edges_x, edges_y)


def _edges(index: np.ndarray, start: int) -> np.ndarray:
    """Mosaic-pixel coordinate of each working-pixel edge of the block ``index`` reaches.

    ``index`` is :func:`working_index` of the region's mosaic pixels along one axis (non-
    decreasing); working edge ``e`` lies before the first mosaic pixel that takes a working pixel
    at or past ``e``, so the region's own edges bound the first and last working pixels.
    """
    first = int(index[0])
    return start + np.searchsorted(index, np.arange(first, int(index[-1]) + 2))


@functools.lru_cache(maxsize=4)
def engine_for(
    bundle: LoadedBundle, preset: str, runtime: Runtime = Runtime()
) -> SegmentationEngine:
    """The served bundle's engine for a preset, built once (batch norms folded once, the
    network converted once for OpenVINO); the server's log says once how it segments."""
    engine = bundle.engine(
        preset,
        precision=runtime.precision,
        backend=runtime.backend,
        openvino_cache=runtime.openvino_cache,
    )
    described = segmenting_with(engine, torch.get_num_threads())
    logger.info("%s %s: %s", bundle.name, bundle.version, described)
    return engine


def class_polygons(segmentation: Segmentation, region: Region, min_poly_area: float) -> dict:
    """Class outlines in MONAI Label's annotation format (mosaic pixel coordinates).

    Each 4-connected region of a class is traced along pixel edges of the segmentation's coarser
    grid (:func:`rcmseg.io.geojson.label_polygons`, as for ``rcmseg batch --geojson``) and
    mapped to the mosaic grid, so the outlines follow the label map's pixel edges exactly and lie
    inside the region. Viewer polygons carry no holes, so each region is its exterior outline,
    one element each, largest first: painted in that order, later over earlier (as
    :func:`rcmseg.label_app.asap.asap_label_map` reads a submitted label), the regions inside a
    hole paint over the one around it and the region's labels come back pixel for
    pixel. Outlines enclosing less than ``min_poly_area`` mosaic pixels are dropped.
    """
    found: list[tuple[float, int, list]] = []
    with collector_paused():
        for index, (exterior,), _pixels in label_polygons(
            segmentation.outline_grid, range(len(CLASS_NAMES)), holes=False
        ):
            mapped = np.stack(
                [segmentation.edges_x[exterior[:, 0]], segmentation.edges_y[exterior[:, 1]]],
                axis=1,
            )
            area = abs(signed_area(mapped))
            if area >= min_poly_area:
                found.append((area, index, mapped.tolist()))
    found.sort(key=lambda item: -item[0])  # stable: equal areas keep class order
    classes = sorted({index for _area, index, _ring in found})
    return {
        "location": [region.x, region.y],
        "size": [region.width, region.height],
        "elements": [{"label": CLASS_NAMES[k], "contours": [ring]} for _a, k, ring in found],
        "labels": {CLASS_NAMES[k]: list(CLASS_COLOURS[k]) for k in classes},
    }


def write_viewer_file(output: str, result: dict[str, Any], model: str) -> str:
    """An ASAP XML or DSA JSON polygon file made by MONAI Label's own writers."""
    whole = {
        "name": f"rcmseg {model}",
        "description": "RCM cellular patterns",
        "model": model,
        "location": result["location"],
        "size": result["size"],
        "annotations": [result],
        "latencies": result["latencies"],
    }
    writer = create_asap_annotations_xml if output == "asap" else create_dsa_annotations_json
    path, _count = writer(whole, "WARNING")
    return path


def write_label_map(labels: np.ndarray, mosaic_mpp: float) -> str:
    """The label map as a tiled uint8 TIFF (rcmseg's label writer) in a temporary file, which
    MONAI Label's endpoint deletes once sent (a file of its own, not a folder it would leave)."""
    from rcmseg.io.writers import write_label_tiff

    handle, path = tempfile.mkstemp(prefix="rcmseg-labels-", suffix=".tif")
    os.close(handle)
    try:
        write_label_tiff(path, labels, mosaic_mpp)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return path


class MEDNetInfer(InferTask):
    """Segment RCM mosaics into the six MED-Net patterns with the served bundle.

    Args:
        served: the working bundle, reloaded when fine-tuning replaces its weights.
        preset: sliding-window preset name (``fast`` or ``paper``).
        on_whole_mosaic: called with ``(path, model, mean entropy)`` after a whole mosaic is
            segmented (the active-learning cache takes it for free).
        runtime: how the network runs (precision, backend, OpenVINO cache).
        pixel_sizes: µm/px of mosaics whose file carries none (none: 0.5 µm/px).
    """

    def __init__(
        self,
        served: ServedModel,
        preset: str = "fast",
        on_whole_mosaic: Any = None,
        runtime: Runtime = Runtime(),
        pixel_sizes: StudyPixelSizes | None = None,
    ) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={name: index for index, name in enumerate(CLASS_NAMES)},
            dimension=2,
            description="The bundle's network: RCM mosaics into six cellular patterns",
            config={"preset": preset, "precision": runtime.precision, "backend": runtime.backend},
        )
        self.served = served
        self.preset = preset
        self.runtime = runtime
        self.on_whole_mosaic = on_whole_mosaic
        self.pixel_sizes = pixel_sizes

    def is_valid(self) -> bool:
        return self.served.weights_path.is_file()

    def get_path(self, validate: bool = True) -> str | None:
        path = self.served.weights_path
        return str(path) if path.is_file() or not validate else None

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        with client_errors():
            return self._infer(request)

    def _infer(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        started = time.perf_counter()
        image_path = request.get("image")
        if not isinstance(image_path, str):
            raise InputError(None, "the request names no mosaic file (image)")
        path = Path(image_path)
        preset = str(request.get("preset") or self.preset)
        bundle = self.served.get()
        if preset not in bundle.presets:
            raise InputError(path, f"unknown preset {preset!r}; choose {', '.join(bundle.presets)}")
        image, info = read_working_image(path, self.pixel_sizes)
        region = Region.from_request(request, info)
        read_done = time.perf_counter()

        result = segment_region(image, info, region, bundle, preset, self.runtime)
        if region.is_whole(info) and self.on_whole_mosaic is not None:
            self.on_whole_mosaic(path, bundle.model, result.mean_entropy)
        infer_done = time.perf_counter()

        output = request.get("output")
        wants_polygons = request.get("result_write_to_file") is False or output in VIEWER_OUTPUTS
        reply: dict[str, Any] = {
            "model": bundle.model,
            "classes": {name: index for index, name in enumerate(CLASS_NAMES)},
            "mosaic_size": [info.width_px, info.height_px],
            "mosaic_mpp": info.mosaic_mpp,
            "location": [region.x, region.y],
            "size": [region.width, region.height],
            "mean_entropy": result.mean_entropy,
        }
        if wants_polygons:
            min_area = min_poly_area(request.get("min_poly_area"), path)
            reply["annotation"] = class_polygons(result, region, min_area)
        post_done = time.perf_counter()

        file: str | None = None
        if request.get("result_write_to_file") is not False and output != "json":
            reply["latencies"] = latencies(started, read_done, infer_done, post_done)
            if output in ("asap", "dsa"):
                file = write_viewer_file(output, reply, bundle.model)
            else:
                file = write_label_map(result.labels, info.mosaic_mpp)
        reply["latencies"] = latencies(started, read_done, infer_done, post_done)
        logger.info("%s %s: %s", path.name, region, reply["latencies"])
        return file, reply


def min_poly_area(value: Any, path: Path) -> float:
    """The request's ``min_poly_area`` in mosaic pixels (none: MONAI Label's default, 80)."""
    if value is None:
        return MIN_POLY_AREA_PX
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"min_poly_area must be a number, not {value!r}") from None


def latencies(started: float, read_done: float, infer_done: float, post_done: float) -> dict:
    """Seconds per stage, with the keys MONAI Label's WSI endpoint adds up."""
    now = time.perf_counter()
    return {
        "pre": round(read_done - started, 3),
        "infer": round(infer_done - read_done, 3),
        "post": round(post_done - infer_done, 3),
        "write": round(now - post_done, 3),
        "total": round(now - started, 3),
    }


def whole_mosaic_entropy(
    path: Path,
    bundle: LoadedBundle,
    preset: str,
    runtime: Runtime = Runtime(),
    pixel_sizes: StudyPixelSizes | None = None,
) -> float:
    """Mean per-pixel entropy of a whole mosaic in nats (0 = certain, ln K = uniform)."""
    image, info = read_working_image(path, pixel_sizes)
    region = Region(0, 0, info.width_px, info.height_px)
    return segment_region(image, info, region, bundle, preset, runtime).mean_entropy
