"""Batch segmentation benchmark: seconds and peak memory per mosaic, and fast-vs-paper agreement.

Usage::

    python benchmarks/bench_batch.py speed --size 12000 --presets fast paper --paper-crop 512
    python benchmarks/bench_batch.py speed --size 24000 --presets fast
    python benchmarks/bench_batch.py speed --size 12000 24000 --presets fast --stand-in  # memory
    python benchmarks/bench_batch.py agreement --seeds 0 1 --crop 1024      # choose "fast"

``speed`` writes a synthetic ``size``×``size`` 8-bit TIFF at 0.5 µm/px (a 4000² ``rcmseg synth``
mosaic mirrored into a seamless tiling, to save minutes of generation) and segments it end to end
with :meth:`rcmseg.batch.Segmenter.segment_mosaic`, the code ``rcmseg batch`` runs (read, infer,
write the label TIFF), once per preset, each in a fresh child process so that its peak resident
memory (``ru_maxrss``) is its own. With ``--paper-crop N`` the ``paper`` preset is timed on an
N×N crop of the working-resolution image and its inference time extrapolated by the number of
windows (stated in the output); read and write do not depend on the preset. Each stage reports wall
seconds and the process's CPU seconds: on a shared machine the wall time grows with the load,
CPU seconds / threads estimate the wall time on an idle machine.

``--stand-in`` swaps MED-Net for a one-layer convolution with the same input and output, so that
a 24000² mosaic goes through the whole pipeline (read, banded stitching, label statistics,
write) in minutes on a CPU: the peak memory it reports is that of the pipeline, and the growth
from 12000² to 24000² is the pipeline's growth (MED-Net's activations for a window batch are the
same for every mosaic size and add a constant, measured by the run without ``--stand-in``).

``agreement`` segments working-resolution crops of mosaics (files, or synthetic ones by seed)
with ``paper`` and with candidate ``fast`` settings and prints the share of pixels whose label
agrees with ``paper``, with each candidate's cost (windows per pixel, CPU time relative to
``paper``); the cheapest candidate at ≥ 99 % is the one to name ``fast``.
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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rcmseg.batch import BatchOptions, MosaicJob, Segmenter
from rcmseg.batch.progress import MosaicProgress
from rcmseg.bundle import load_bundle
from rcmseg.classes import NUM_CLASSES
from rcmseg.inference import PRESETS, Preset, get_preset, segment_image, window_starts
from rcmseg.networks import get_network

TILE_PX = 4000  # side of the synthetic mosaic mirrored into a large one


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB (Linux ``VmHWM``).

    Not ``ru_maxrss``: that one survives ``exec`` and can report the parent's size at fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_large_mosaic(path: Path, size: int, seed: int = 0) -> None:
    """Write a size×size uint8 TIFF at 0.5 µm/px, tiled from one synthetic mosaic with mirroring."""
    import tifffile

    from rcmseg.synth.mosaic import make_mosaic

    tile, _labels = make_mosaic(min(TILE_PX, size), seed=seed)
    reps = math.ceil(size / tile.shape[0])

    def rows() -> object:
        for r in range(reps):
            band = tile if r % 2 == 0 else tile[::-1]
            row = np.concatenate([band if c % 2 == 0 else band[:, ::-1] for c in range(reps)], 1)
            yield row[: min(tile.shape[0], size - r * tile.shape[0]), :size]

    tifffile.imwrite(
        path,
        data=np.concatenate(list(rows()), axis=0),
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        rowsperstrip=256,
    )


def windows_in(preset: Preset, height: int, width: int) -> int:
    """Number of windows MONAI's grid places on an image (one band)."""
    window = preset.window_for(height, width)
    rows, cols = (
        len(window_starts(side, roi, preset.stride_px))
        for side, roi in zip((height, width), window, strict=True)
    )
    return rows * cols


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageClock(MosaicProgress):
    """CPU seconds at the end of reading and of inference, from segment_mosaic's progress calls."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"start": cpu_seconds()}

    def step(self, stage: str) -> None:
        if stage != "segmenting" or "read" not in self.marks:
            self.marks["read" if stage == "segmenting" else "infer"] = cpu_seconds()


def stand_in_network() -> torch.nn.Module:
    """One 3×3 convolution, 1 → 6 channels: the pipeline without MED-Net's cost."""
    return torch.nn.Conv2d(1, NUM_CLASSES, 3, padding=1)


def untrained_network(spec: str) -> torch.nn.Module:
    """``NAME`` or ``NAME:{json kwargs}`` of :func:`rcmseg.networks.get_network`, random weights
    (the arithmetic, hence the speed, of a network without weights trained for it)."""
    name, _, kwargs = spec.partition(":")
    return get_network(name, **(json.loads(kwargs) if kwargs else {}))


def child_speed(args: argparse.Namespace) -> dict:
    """One preset on one mosaic, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    bundle = load_bundle(device=args.device)
    if args.stand_in:
        bundle = replace(bundle, network=stand_in_network().to(bundle.device).eval())
    elif args.network:
        bundle = replace(bundle, network=untrained_network(args.network).to(bundle.device).eval())
    out = Path(args.out_dir)
    job = MosaicJob(Path(args.mosaic), Path(args.mosaic).name, out / f"bench-{args.preset}", "x")
    result = {
        "preset": args.preset,
        "device": str(bundle.device),
        "threads": args.threads,
        "stand_in_network": args.stand_in,
        "network": args.network or "bundle",
        "rss_after_load_mb": peak_rss_mb(),
    }
    if args.crop:
        from rcmseg.io.mosaics import read_mosaic

        image, _info = read_mosaic(args.mosaic)
        crop = image[: args.crop, : args.crop]
        preset = bundle.presets[args.preset]
        engine = bundle.engine(preset, precision=args.precision, backend=args.backend)
        started, cpu_started = time.perf_counter(), cpu_seconds()  # conversion not counted
        engine.probabilities(crop)
        result["backend"] = args.backend
        scale = windows_in(preset, *image.shape) / windows_in(preset, *crop.shape)
        result.update(
            crop_px=args.crop,
            crop_infer_seconds=time.perf_counter() - started,
            crop_infer_cpu_seconds=cpu_seconds() - cpu_started,
            extrapolated_by_windows=scale,
        )
        result["infer_seconds"] = result["crop_infer_seconds"] * scale
        result["infer_cpu_seconds"] = result["crop_infer_cpu_seconds"] * scale
    else:
        clock = StageClock()
        options = BatchOptions(preset=args.preset, device=args.device)
        built = time.perf_counter()
        engine = bundle.engine(
            args.preset,
            precision=args.precision,
            backend=args.backend,
            openvino_cache=args.openvino_cache,
        )
        result.update(backend=args.backend, engine_build_seconds=time.perf_counter() - built)
        if engine._openvino is not None:
            result["openvino_cached"] = engine._openvino.cached
        record = Segmenter(bundle, engine, options).segment_mosaic(job, clock)
        result["precision"] = engine.precision
        marks = clock.marks
        result.update(
            read_seconds=record.read_seconds,
            infer_seconds=record.infer_seconds,
            write_seconds=record.write_seconds,
            seconds=record.seconds,
            read_cpu_seconds=marks["read"] - marks["start"],
            infer_cpu_seconds=marks["infer"] - marks["read"],
            write_cpu_seconds=cpu_seconds() - marks["infer"],
            working_shape=list(record.working_shape),
        )
    if bundle.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(bundle.device)
    result["peak_rss_mb"] = peak_rss_mb()
    result["load_average"] = os.getloadavg()[0]
    return result


def run_folder(args: argparse.Namespace) -> dict:
    """A folder of ``count`` mosaics through :func:`rcmseg.batch.run_batch`: wall time against
    the sum of the stages (reads and writes overlap the segmentation of the neighbours)."""
    from rcmseg.batch import run_batch

    with tempfile.TemporaryDirectory(prefix="bench_folder_") as workdir:
        folder = Path(workdir) / "in"
        folder.mkdir()
        for index in range(args.count):
            make_large_mosaic(folder / f"m{index}.tif", args.size, seed=index)
        started = time.perf_counter()
        options = BatchOptions(
            device=args.device,
            precision=args.precision,
            threads=args.threads,
            backend=args.backend,
            openvino_cache=args.openvino_cache,
        )
        result = run_batch(folder, Path(workdir) / "out", options=options, show_progress=False)
        wall = time.perf_counter() - started
    records = result.records
    summary = {
        "mosaics": args.count,
        "size_px": args.size,
        "wall_seconds": wall,
        "sum_infer_seconds": sum(r.infer_seconds for r in records),
        "sum_read_write_seconds": sum(r.read_seconds + r.write_seconds for r in records),
        "statuses": [r.status for r in records],
        "peak_rss_mb": peak_rss_mb(),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(summary), flush=True)
    return summary


def run_speed(args: argparse.Namespace) -> list[dict]:
    results = []
    for size in args.size:
        with tempfile.TemporaryDirectory(prefix="bench_batch_") as workdir:
            mosaic = Path(workdir) / f"mosaic_{size}.tif"
            started = time.perf_counter()
            make_large_mosaic(mosaic, size)
            print(f"# wrote {size}² test mosaic in {time.perf_counter() - started:.0f} s")
            cache = ["--openvino-cache", str(args.openvino_cache)] if args.openvino_cache else []
            for preset in args.presets:
                crop = args.paper_crop if preset == "paper" and args.paper_crop else 0
                command = [
                    sys.executable, __file__, "child",
                    "--mosaic", str(mosaic), "--out-dir", workdir, "--preset", preset,
                    "--device", args.device, "--threads", str(args.threads), "--crop", str(crop),
                    "--precision", args.precision, "--backend", args.backend,
                    *cache,
                    *(["--stand-in"] if args.stand_in else []),
                    *(["--network", args.network] if args.network else []),
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                result["size_px"] = size
                results.append(result)
                print(json.dumps(result), flush=True)
    return results


DEFAULT_CANDIDATES = ("512/0.5", "512/0.25", "384/0.5", "256/0.5", "256/0.75")


def layout(preset: Preset) -> tuple[int, float, float]:
    return preset.window_px, preset.overlap, preset.sigma_scale


def parse_candidate(text: str) -> Preset:
    """``WINDOW/OVERLAP[/SIGMA_SCALE]``, e.g. ``512/0.5`` or ``512/0.5/0.25``."""
    window, overlap, *sigma = text.split("/")
    extra = {"sigma_scale": float(sigma[0])} if sigma else {}
    return Preset(int(window), float(overlap), **extra)


def agreement_images(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """Working-resolution crops (``--crop`` px) of ``--mosaics`` (no labels), or of fresh
    synthetic ones with their label maps brought to 2 µm/px (``downsample_labels``)."""
    from rcmseg.io.labels import downsample_labels
    from rcmseg.io.mosaics import read_mosaic
    from rcmseg.synth.mosaic import make_mosaic

    images: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for path in args.mosaics:
        image, _info = read_mosaic(path)
        images.append((Path(path).name, image[: args.crop, : args.crop], None))
    for seed in args.seeds:
        image_full, labels = make_mosaic(4 * args.crop, seed=seed)
        side = args.crop
        image = image_full.reshape(side, 4, side, 4).mean((1, 3))
        images.append((f"synth seed {seed}", image, downsample_labels(labels, 4)))
    return images


def mean_dice(predicted: np.ndarray, labels: np.ndarray | None) -> float:
    """Mean over classes of one-vs-rest Dice on labelled pixels (nan without labels)."""
    from rcmseg.metrics import confusion_matrix, one_vs_rest

    if labels is None:
        return float("nan")
    return float(one_vs_rest(confusion_matrix(predicted, labels))["mean_dice"])


def load_weights(network: torch.nn.Module, path: str) -> None:
    """Weights from a state dict or a trainer checkpoint (its ``network`` entry)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("network", state))


def calibrate_batch_norm(network: torch.nn.Module, images: list[np.ndarray], steps: int) -> None:
    """Re-estimate batch-norm statistics on random 256² crops of ``images`` (no training).

    Turns an untrained network, whose output is one class everywhere, into one with normalised
    random features whose labels follow the texture at MED-Net's scales: a stand-in for trained
    weights when judging how window layout changes labels.
    """
    rng = np.random.default_rng(0)
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    network.train()
    with torch.no_grad():
        for _ in range(steps):
            crops = []
            for _ in range(4):
                image = images[rng.integers(len(images))]
                y, x = (rng.integers(0, side - 256 + 1) for side in image.shape)
                crops.append(image[y : y + 256, x : x + 256] / 255.0)
            network(torch.from_numpy(np.stack(crops)[:, None].astype(np.float32)))
    network.eval()


def run_agreement(args: argparse.Namespace) -> list[dict]:
    """Pixel agreement of candidate fast settings with ``paper``."""
    torch.set_num_threads(args.threads)
    bundle = load_bundle(device=args.device)
    if args.weights:
        load_weights(bundle.network, args.weights)
    images = agreement_images(args)
    if args.calibrate_bn:
        calibrate_batch_norm(bundle.network, [image for _, image, _ in images], args.calibrate_bn)
    candidates = {text: parse_candidate(text) for text in args.candidates}
    agree: dict[str, list[float]] = {name: [] for name in candidates}
    margins: dict[str, list[float]] = {name: [] for name in candidates}
    dice: dict[str, list[float]] = {name: [] for name in ["paper", *candidates]}
    cost: dict[str, list[float]] = {name: [] for name in candidates}
    for name, image, labels_2um in images:
        image = np.ascontiguousarray(image, dtype=np.float32)
        started = cpu_seconds()
        paper_probabilities = segment_image(image, bundle.network, "paper", bundle.device)
        paper = paper_probabilities.argmax(0)
        paper_cpu = cpu_seconds() - started
        top_two = np.sort(paper_probabilities, axis=0)[-2:]
        paper_margin = top_two[1] - top_two[0]  # how firmly paper decides each pixel
        dice["paper"].append(mean_dice(paper, labels_2um))
        shares = np.bincount(paper.ravel(), minlength=NUM_CLASSES) / paper.size
        print(
            f"# {name}: {image.shape}, paper {paper_cpu:.0f} CPU s, classes {shares.round(3)}, "
            f"median margin of paper's top two classes {np.median(paper_margin):.2f}"
        )
        for candidate, preset in candidates.items():
            started = cpu_seconds()
            labels = segment_image(image, bundle.network, preset, bundle.device).argmax(0)
            cost[candidate].append((cpu_seconds() - started) / paper_cpu)
            agree[candidate].append(float((labels == paper).mean()))
            margins[candidate].append(float(np.median(paper_margin[labels != paper])))
            dice[candidate].append(mean_dice(labels, labels_2um))
    rows = []
    for candidate, preset in candidates.items():
        row = {
            "candidate": candidate,
            "windows_per_pixel": (preset.window_px / preset.stride_px) ** 2,
            "agreement_min": min(agree[candidate]),
            "agreement_mean": float(np.mean(agree[candidate])),
            "cpu_time_vs_paper": float(np.mean(cost[candidate])),
            "paper_margin_where_they_differ": float(np.mean(margins[candidate])),
            "dice_vs_truth": float(np.mean(dice[candidate])),
            "paper_dice_vs_truth": float(np.mean(dice["paper"])),
            "is_fast_preset": layout(preset) == layout(get_preset("fast")),
            "weights": (args.weights or "bundle")
            + (" + BN calibration" if args.calibrate_bn else ""),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("speed", help="seconds and peak memory per mosaic")
    speed.add_argument("--size", type=int, nargs="+", default=[12000], help="side(s) in px")
    speed.add_argument("--presets", nargs="+", default=list(PRESETS))
    speed.add_argument("--paper-crop", type=int, default=0, help="time paper on an N² crop")
    speed.add_argument("--stand-in", action="store_true", help="a 1-layer net for MED-Net")
    agreement = commands.add_parser("agreement", help="fast candidates vs paper")
    agreement.add_argument("--mosaics", nargs="*", default=[], help="mosaic files to crop")
    agreement.add_argument("--seeds", type=int, nargs="*", default=[], help="synthetic mosaics")
    agreement.add_argument("--crop", type=int, default=1024, help="side at 2 µm/px")
    agreement.add_argument("--weights", help="state dict or checkpoint instead of the bundle's")
    agreement.add_argument("--calibrate-bn", type=int, default=0, help="BN calibration batches")
    agreement.add_argument(
        "--candidates",
        nargs="+",
        default=list(DEFAULT_CANDIDATES),
        help="WINDOW/OVERLAP[/SIGMA_SCALE] settings to compare with paper",
    )
    folder = commands.add_parser("folder", help="a folder of mosaics end to end")
    folder.add_argument("--count", type=int, default=3)
    folder.add_argument("--size", type=int, default=12000)
    child = commands.add_parser("child")
    child.add_argument("--mosaic", required=True)
    child.add_argument("--out-dir", required=True)
    child.add_argument("--preset", required=True)
    child.add_argument("--crop", type=int, default=0)
    child.add_argument("--stand-in", action="store_true")
    for command in (speed, child):
        command.add_argument(
            "--network",
            default="",
            help='NAME or NAME:{"kwarg": ...} with random weights instead of the bundle\'s',
        )
    for command in (speed, child, folder):
        command.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16")
        command.add_argument("--backend", default="torch", help="torch or openvino")
        command.add_argument(
            "--openvino-cache", type=Path, help="keep/reuse the converted OpenVINO network here"
        )
    for command in (speed, agreement, child, folder):
        command.add_argument("--device", default="auto")
        command.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "child":
        print(json.dumps(child_speed(args)))
    elif args.command == "speed":
        run_speed(args)
    elif args.command == "folder":
        run_folder(args)
    else:
        run_agreement(args)


if __name__ == "__main__":
    main()
