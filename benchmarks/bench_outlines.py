"""Time tracing a whole label map into QuPath GeoJSON outlines (``docs/benchmarks.md``).

What ``rcmseg batch --geojson`` and the label app's whole-mosaic polygons do after segmenting:
:func:`rcmseg.io.geojson.label_features` (every 4-connected region of every class traced along
pixel edges, holes as interior rings, scaled to mosaic pixels) and ``json.dumps`` of the result.
The maps are at the working grid of a ``--size``² mosaic (2 µm/px, so 3000² for 12000² at
0.5 µm/px):

* ``synthetic``: the label map of ``rcmseg.synth.make_mosaic`` at that size (large smooth blobs);
* ``noise-S``: the argmax of six Gaussian-smoothed noise fields (sigma S working px), a stand-in
  for the fragmented maps of an undertrained network or a hard mosaic; smaller S, more regions.

Each map runs in a fresh child process, which reports its peak resident memory. Example::

    python benchmarks/bench_outlines.py --size 12000 --sigma 4 8 16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import time

import numpy as np
from scipy import ndimage

import rcmseg.io.geojson
from rcmseg.classes import CLASS_NAMES
from rcmseg.synth import make_mosaic

WORKING_PX_PER_MOSAIC_PX = 0.25  # 2 µm/px working grid of a 0.5 µm/px mosaic


def label_map(kind: str, side: int) -> np.ndarray:
    """A (side, side) uint8 label map of the named kind, seeded."""
    if kind == "synthetic":
        return make_mosaic(side, seed=0)[1]
    sigma = float(kind.removeprefix("noise-"))
    rng = np.random.default_rng(0)
    fields = np.stack(
        [
            ndimage.gaussian_filter(rng.standard_normal((side, side), np.float32), sigma)
            for _ in range(6)
        ]
    )
    return fields.argmax(axis=0).astype(np.uint8)


def measure(kind: str, side: int, repeats: int) -> dict:
    labels = label_map(kind, side)
    regions = sum(
        ndimage.label(labels == index, structure=rcmseg.io.geojson._FOUR_CONNECTED)[1]
        for index in range(len(CLASS_NAMES))
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trace_s, dump_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        features = rcmseg.io.geojson.label_features(labels, 1 / WORKING_PX_PER_MOSAIC_PX)
        trace_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        text = json.dumps({"type": "FeatureCollection", "features": features})
        dump_s.append(time.perf_counter() - started)
    vertices = sum(len(ring) for f in features for ring in f["geometry"]["coordinates"])
    return {
        "map": kind,
        "side_px": side,
        "regions": regions,
        "features": len(features),
        "vertices": vertices,
        "json_mb": round(len(text) / 1e6, 1),
        "trace_s": [round(s, 2) for s in trace_s],
        "json_s": [round(s, 2) for s in dump_s],
        "rss_mib": [
            round(rss_before),
            round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000, help="mosaic side in px at 0.5 µm/px")
    parser.add_argument("--sigma", type=float, nargs="*", default=[4.0, 8.0, 16.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    side = round(args.size * WORKING_PX_PER_MOSAIC_PX)
    kinds = ["synthetic"] + [f"noise-{sigma:g}" for sigma in args.sigma]
    print(f"tracer {rcmseg.io.geojson.__file__}; {platform.processor() or platform.machine()}")
    results = []
    context = multiprocessing.get_context("spawn")
    for kind in kinds:
        with context.Pool(1) as pool:  # fresh process: its own peak memory
            results.append(pool.apply(measure, (kind, side, args.repeats)))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as sink:
            json.dump(results, sink, indent=1)


if __name__ == "__main__":
    main()
