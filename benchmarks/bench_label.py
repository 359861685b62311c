"""Time from request to label map for rcmseg's MONAI Label app (``docs/benchmarks.md``).

Starts ``rcmseg label serve`` on 127.0.0.1 with a synthetic mosaic (``rcmseg.synth``), then:

* whole mosaic: ``POST /infer/mednet?image=...`` until the label TIFF (mosaic pixel grid) is
  received, with the server's own split into read / segment / post / write;
* a viewer region: ``POST /infer/wsi_v2/mednet`` for a ``--region`` px square at the centre,
  polygons as JSON (what QuPath's extension asks for).

Each request runs on a freshly started server, so the whole-mosaic time includes reading the
mosaic (the app caches the working-resolution image per file for later region requests).
Needs the ``rcmseg[label]`` extra. Example::

    python benchmarks/bench_label.py --size 12000 --device cpu
    python benchmarks/bench_label.py --size 12000 --device cpu --backend openvino \
        --openvino-cache /tmp/ov-cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import requests
import tifffile
import torch
from requests_toolbelt.multipart import decoder

from rcmseg.bundle import WEIGHTS_FILE, build_network, default_bundle_dir
from rcmseg.label_app.local_server import LocalServer
from rcmseg.synth import make_mosaic, write_mosaic_tiff

# background scoring would compete for the CPU with the timed request
NO_SCORING = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def bundle_with_weights(work: Path) -> tuple[Path, str]:
    """The default bundle when it has weights, else a copy with random ones (same cost)."""
    source = default_bundle_dir()
    if (source / WEIGHTS_FILE).is_file():
        return source, "default bundle"
    target = work / "bundle"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("models", "runs", "eval"))
    (target / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_network(target).state_dict(), target / WEIGHTS_FILE)
    return target, "random weights (no trained weights in the default bundle)"


def time_whole_mosaic(server: LocalServer, image_id: str, out: Path) -> dict:
    started = time.perf_counter()
    response = requests.post(f"{server.url}/infer/mednet?image={image_id}", timeout=7200)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    parts = decoder.MultipartDecoder.from_response(response).parts
    params = json.loads(parts[0].text)
    out.write_bytes(parts[1].content)
    labels = tifffile.imread(out, level=0)
    return {
        "seconds": round(seconds, 1),
        "label_map_px": list(labels.shape[::-1]),
        "server_latencies_s": params["latencies"],
    }


def time_region(server: LocalServer, image_id: str, size: int, side: int) -> dict:
    corner = (size - side) // 2
    wsi = {"location": [corner, corner], "size": [side, side], "tile_size": [1024, 1024]}
    started = time.perf_counter()
    response = requests.post(
        f"{server.url}/infer/wsi_v2/mednet?image={image_id}&output=json",
        data={"wsi": json.dumps(wsi)},
        timeout=3600,
    )
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return {
        "seconds": round(seconds, 1),
        "region_px": [side, side],
        "server_latencies_s": response.json().get("latencies"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000, help="mosaic side in px at 0.5 µm/px")
    parser.add_argument("--region", type=int, default=2048, help="viewer region side in px")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--skip-whole", action="store_true", help="time the region request only")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--backend", default="torch", help="torch or openvino")
    parser.add_argument("--openvino-cache", type=Path, help="keep/reuse the OpenVINO conversion")
    args = parser.parse_args()
    if args.workdir:
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-label-") as work:
            run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    """Write the mosaic and bundle under ``work``, then time each request on a fresh server."""
    studies = work / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    mosaic = studies / f"mosaic{args.size}.tif"
    if not mosaic.is_file():
        started = time.perf_counter()
        image, _labels = make_mosaic(args.size, seed=0)
        write_mosaic_tiff(mosaic, image)
        print(f"synthetic mosaic {args.size}² written in {time.perf_counter() - started:.0f} s")
    bundle, weights = bundle_with_weights(work)
    log = work / "server.log"
    results = {
        "size_px": args.size,
        "preset": args.preset,
        "weights": weights,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "precision": args.precision,
        "backend": args.backend,
    }
    runtime = ["--precision", args.precision, "--backend", args.backend]
    if args.openvino_cache:
        runtime += ["--openvino-cache", str(args.openvino_cache)]
    requests_to_time = [
        ("whole_mosaic", lambda s: time_whole_mosaic(s, mosaic.stem, work / "labels.tif")),
        ("region", lambda s: time_region(s, mosaic.stem, args.size, args.region)),
    ]
    for name, measure in requests_to_time[1:] if args.skip_whole else requests_to_time:
        options = ["--bundle", str(bundle), "--preset", args.preset, "--device", args.device]
        with LocalServer(studies, log, options + runtime, env=NO_SCORING) as server:
            results[name] = measure(server)
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
