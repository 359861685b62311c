"""Engine variants on this machine: precision, backend and TTA against torch float32.

Usage::

    python benchmarks/bench_precision.py --textures /work/shared/data/textures --threads 2
    python benchmarks/bench_precision.py --variants fp32 bf16 openvino:fp32 openvino:bf16 fp32+tta

Segments synthetic mosaics (``rcmseg.synth``, with their ground truth) and real-texture mosaics
(``benchmarks/texture_mosaics.py``) with the bundled weights through
:class:`rcmseg.inference.SegmentationEngine` (preset ``fast``) once per precision, and reports
the share of pixels whose label equals torch float32's, the mean Dice against the labelled
pixels, the network milliseconds per 256² window (batch of 8, batch norms folded) and the
seconds to segment all images (TTA's cost factor), with the CPU's bf16 support as detected
(:func:`rcmseg.inference.cpu_has_native_bf16`). A variant is ``[backend:]precision[+tta]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rcmseg.bundle import load_bundle  # noqa: E402
from rcmseg.classes import NUM_CLASSES  # noqa: E402
from rcmseg.inference import SegmentationEngine, cpu_has_native_bf16  # noqa: E402
from rcmseg.metrics import confusion_matrix, one_vs_rest  # noqa: E402


def synthetic_images(seeds: list[int], side: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from rcmseg.io.labels import downsample_labels
    from rcmseg.synth.mosaic import make_mosaic

    images = []
    for seed in seeds:
        mosaic, labels = make_mosaic(4 * side, seed=seed)
        image = mosaic.reshape(side, 4, side, 4).mean(axis=(1, 3)).astype(np.float32)
        images.append((f"synthetic {seed}", image, downsample_labels(labels, 4)))
    return images


def texture_images(texture_dir: Path, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from texture_mosaics import write_texture_dataset

    from rcmseg.io.dataset import load_case

    with tempfile.TemporaryDirectory(prefix="rcmseg-precision-") as scratch:
        cases = write_texture_dataset(
            texture_dir, Path(scratch), train_mosaics=0, test_mosaics=count, size=768
        )
        return [(f"texture {case.mosaic.stem}", *load_case(case)) for case in cases]


def ms_per_window(engine: SegmentationEngine, repeats: int = 5) -> float:
    windows = torch.rand(8, 1, 256, 256, device=engine.device)
    with torch.inference_mode():
        engine._predict(windows)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            engine._predict(windows)
    return (time.perf_counter() - started) / repeats / 8 * 1000


def make_engine(bundle, variant: str) -> SegmentationEngine:
    """``[backend:]precision[+tta]``, e.g. ``openvino:bf16`` or ``fp32+tta``."""
    setting, _, extra = variant.partition("+")
    backend, _, precision = setting.rpartition(":")
    return bundle.engine(
        "fast", precision=precision, tta=extra == "tta", backend=backend or "torch"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--textures", type=Path, help="folder holding usc_sipi/ (optional)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202, 203])
    parser.add_argument("--side", type=int, default=768, help="synthetic side at 2 µm/px")
    parser.add_argument("--texture-mosaics", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "fp32+tta"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(device=args.device)
    images = synthetic_images(args.seeds, args.side)
    if args.textures:
        images += texture_images(args.textures, args.texture_mosaics)
    engines = {variant: make_engine(bundle, variant) for variant in ["fp32", *args.variants]}
    results = {"cpu_native_bf16": cpu_has_native_bf16(), "threads": args.threads, "rows": []}
    for variant, engine in engines.items():
        results["rows"].append({"variant": variant, "ms_per_window": ms_per_window(engine)})
    reference = {name: engines["fp32"].labels(image) for name, image, _ in images}
    for row in results["rows"]:
        engine = engines[row["variant"]]
        agreement, dice = {}, {}
        started = time.perf_counter()
        for name, image, truth in images:
            labels = engine.labels(image)
            agreement[name] = float((labels == reference[name]).mean())
            matrix = confusion_matrix(labels, truth, num_classes=NUM_CLASSES)
            dice[name] = float(one_vs_rest(matrix)["mean_dice"])
        row.update(agreement=agreement, dice=dice, seconds=time.perf_counter() - started)
        row["min_agreement"] = min(agreement.values())
        row["mean_dice"] = float(np.mean(list(dice.values())))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
