"""Partial label maps from the ASAP XML that MONAI Label's QuPath extension submits.

QuPath's "Submit Label" sends every classified annotation as an ``<Annotation Name="<class>">``
polygon with ``<Coordinate X= Y=>`` points in full-resolution pixels of the image the label is
saved for (a whole mosaic, or the patch it uploads with the label for an ROI; the ``<Annotations
X= Y=>`` attributes only record where that patch came from). Pixels whose centre lies inside a
polygon take the class named by ``Name`` (the GeoJSON import's rule,
:func:`rcmseg.io.geojson.polygon_strips`: coordinates are pixel edges, so the square 0-1 is
pixel 0); every other pixel is unlabelled (255), which is what makes the labels partial. Later
polygons paint over earlier ones. Holes inside a polygon are not represented in this format
(QuPath sends the outline points only): draw the inner pattern as its own annotation on top.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
from PIL import Image

from rcmseg.classes import CLASS_NAMES, UNLABELLED
from rcmseg.errors import InputError
from rcmseg.io.geojson import polygon_strips

ASAP_SUFFIX = ".xml"


def class_index(name: str, path: Path) -> int:
    """Class index of an annotation's class name (case and surrounding spaces ignored)."""
    wanted = name.strip().lower()
    for index, known in enumerate(CLASS_NAMES):
        if known == wanted:
            return index
    raise InputError(path, f"annotation class {name!r} is not one of {', '.join(CLASS_NAMES)}")


def read_asap_polygons(path: Path) -> list[tuple[int, list[tuple[float, float]]]]:
    """``(class index, [(x, y), ...])`` per annotation, in file order, in image pixels."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise InputError(path, f"not readable ASAP XML ({error})") from None
    polygons = []
    for annotation in root.iter("Annotation"):
        index = class_index(annotation.get("Name") or annotation.get("PartOfGroup") or "", path)
        coordinates = sorted(annotation.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        try:
            points = [(float(c.get("X", "")), float(c.get("Y", ""))) for c in coordinates]
        except ValueError:
            raise InputError(path, "a Coordinate without numeric X and Y") from None
        if len(points) >= 3:
            polygons.append((index, points))
    return polygons


def asap_label_map(path: Path, width: int, height: int) -> np.ndarray:
    """uint8 (height, width): class indices inside the polygons, UNLABELLED elsewhere."""
    polygons = read_asap_polygons(path)
    if not polygons:
        raise InputError(path, "no classified polygon annotations: nothing is labelled")
    labels = np.full((height, width), UNLABELLED, dtype=np.uint8)
    for index, points in polygons:
        ring = np.asarray([*points, points[0]], dtype=np.float64)  # QuPath leaves rings open
        for rows, cols, inside in polygon_strips([ring], labels.shape):
            labels[rows, cols][inside] = index
    return labels


def rasterize_asap_labels(xml_path: Path, mosaic: Path, out_path: Path) -> Path:
    """Write the label map of ``xml_path`` at ``mosaic``'s full resolution as a PNG."""
    from rcmseg.io.mosaics import probe_mosaic

    info = probe_mosaic(mosaic)
    labels = asap_label_map(xml_path, info.width_px, info.height_px)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels).save(out_path)
    return out_path
