"""Annotation import benchmark: seconds and peak memory to import QuPath GeoJSON of a big mosaic.

Usage::

    python benchmarks/bench_import.py --size 12000
    python benchmarks/bench_import.py --size 12000 --scenario qupath batch

Each scenario runs :func:`rcmseg.labels_import.import_labels` (what ``rcmseg labels import``
runs: probe the mosaic, read and rasterise the GeoJSON, count, write the PNG label map, the
manifest and the summary) on one ``size``² 8-bit TIFF mosaic, in a fresh child process so that
its peak resident memory (``ru_maxrss``) is its own; the child also reports its resident memory
after the imports, before the work, so the growth due to the import is visible.

Scenarios:

- ``qupath``: what an expert draws in QuPath: one coarse meshwork region over most of the mosaic
  (a wavy outline of 1500 vertices, with 4 holes of 64 vertices), 40 smaller corrected details
  (ellipses of 48 vertices, drawn inside it: they win the overlaps), a MultiPolygon of two pieces,
  3 annotations past the mosaic's edge (clipped), a detection and a line (ignored): about 4000
  vertices in all.
- ``batch``: what ``rcmseg batch --geojson`` writes for the mosaic: pixel-edge outlines of a
  blocky working-resolution (size/4)² label map, scaled ×4 (tens of thousands of vertices).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _ring(cx: float, cy: float, rx: float, ry: float, n: int, wobble: float = 0.0) -> list:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = 1 + wobble * np.sin(7 * angles) + wobble / 2 * np.sin(23 * angles)
    points = np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], 1)
    points = np.round(points, 2).tolist()
    return [*points, points[0]]


def _feature(coordinates: list, name: str, kind: str = "Polygon", **properties) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coordinates},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": [0, 0, 0]},
            **properties,
        },
    }


def qupath_features(size: int, seed: int = 0) -> list[dict]:
    """The ``qupath`` scenario's features (see the module docstring)."""
    rng = np.random.default_rng(seed)
    c = size / 2
    holes = [_ring(c + dx * size / 5, c + dy * size / 5, size / 30, size / 40, 64)
             for dx, dy in ((-1, -1), (1, -1), (-1, 1), (1, 1))]  # fmt: skip
    features = [_feature([_ring(c, c, 0.42 * size, 0.4 * size, 1500, 0.05), *holes], "meshwork")]
    for _ in range(40):
        x, y = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.01, 0.04) * size
        name = ["nested", "ring", "aspecific"][int(rng.integers(3))]
        features.append(_feature([_ring(x, y, r, 0.7 * r, 48)], name))
    pieces = [
        [_ring(0.05 * size, 0.05 * size, 200, 150, 40)],
        [_ring(0.95 * size, 0.1 * size, 250, 250, 40)],
    ]
    features.append(_feature(pieces, "artifact", "MultiPolygon"))
    for x, y in ((0, c), (size, c), (c, size)):  # past the edges
        features.append(_feature([_ring(x, y, 400, 300, 80)], "background"))
    features.append(_feature([_ring(c, c, 50, 50, 16)], "ring", objectType="detection"))
    features.append(_feature([[0, 0], [size, size]], "ring", "LineString"))
    return features


def batch_features(size: int, seed: int = 0) -> list[dict]:
    """The ``batch`` scenario's features: ``label_features`` of a blocky (size/4)² map."""
    from rcmseg.io.geojson import label_features

    rng = np.random.default_rng(seed)
    working = size // 4
    blocks = rng.integers(0, 6, (working // 40 + 1, working // 40 + 1)).astype(np.uint8)
    labels = np.kron(blocks, np.ones((40, 40), np.uint8))[:working, :working]
    return label_features(labels, 4.0)


def _vertices(geometry: dict) -> int:
    """Polygon vertices of a Polygon or MultiPolygon geometry (0 for others)."""
    kind, coordinates = geometry["type"], geometry["coordinates"]
    polygons = {"Polygon": [coordinates], "MultiPolygon": coordinates}.get(kind, [])
    return sum(len(ring) for rings in polygons for ring in rings)


def run_child(size: int, scenario: str) -> dict:
    """Run one scenario in this process (the child) and return its figures."""
    import tifffile

    from rcmseg.labels_import import import_labels

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "mosaics").mkdir()
        (root / "exported").mkdir()
        mosaic = root / "mosaics" / "m.tif"
        tiles = math.ceil(size / 512)
        tifffile.imwrite(
            mosaic,
            (np.zeros((512, 512), np.uint8) for _ in range(tiles * tiles)),
            shape=(size, size),
            dtype=np.uint8,
            tile=(512, 512),
            compression="zlib",
            resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER",
        )
        features = qupath_features(size) if scenario == "qupath" else batch_features(size)
        vertices = sum(_vertices(f["geometry"]) for f in features)
        path = root / "exported" / "m.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        del features
        rss_before = _rss_mib()
        start = time.perf_counter()
        cpu = time.process_time()
        (result,) = import_labels(root / "mosaics", root / "exported", root / "dataset")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        png_mib = (root / "dataset" / "labels" / "m.png").stat().st_size / 2**20
        geojson_mib = path.stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "scenario": scenario,
        "size": size,
        "features": result.annotations_used + result.ignored_objects + result.ignored_geometries,
        "vertices": vertices,
        "geojson_mib": round(geojson_mib, 2),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "rss_before_mib": round(rss_before),
        "peak_rss_mib": round(peak),
        "label_map_mib": round(size * size / 2**20),
        "png_mib": round(png_mib, 2),
        "labelled_pct": round(result.labelled_pct, 1),
        "overlapping": result.overlapping,
        "clipped": result.clipped,
        "ignored": result.ignored_objects + result.ignored_geometries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[12000])
    parser.add_argument("--scenario", nargs="+", default=["qupath", "batch"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.size[0], args.scenario[0])))
        return
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}")
    for size in args.size:
        for scenario in args.scenario:
            command = [sys.executable, __file__, "--child", "--size", str(size)]
            output = subprocess.run(
                [*command, "--scenario", scenario], check=True, capture_output=True, text=True
            )
            print(output.stdout.strip())
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
