"""Training throughput of rcmseg: samples (256 px patches at 2 µm/px) per second.

Three figures, each over ``--steps`` batches after one warm-up batch:

- ``pipeline``: per-epoch patch sampling, the DataLoader (``--workers`` processes) and the paper's
  augmentation, batched on the device (the trainer's default, ``BatchAugment``), no network;
- ``pipeline_per_patch``: the same with MONAI's per-patch transforms (``train_transforms``) in
  the DataLoader instead;
- ``network``: forward + backward + optimiser step of the network on ready tensors already on the
  device (mixed precision on CUDA), no data pipeline;
- ``training``: both together, through the trainer's own ``train_epoch`` (what ``rcmseg train``
  runs per epoch, validation excluded).

Mosaics come from ``--data`` (a data set folder, e.g. from ``rcmseg synth``) or, without it, from
random 2048 x 2048 px images with random labels (the pipeline's cost does not depend on content).

    python benchmarks/bench_train.py --device cpu --batch-size 8 --steps 3
    python benchmarks/bench_train.py --device cuda --batch-size 48 --steps 20 --workers 12
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor

from rcmseg.inference import resolve_device
from rcmseg.losses import make_loss
from rcmseg.networks import get_network
from rcmseg.training.augment import BatchAugment
from rcmseg.training.bundle import bundle_train_settings
from rcmseg.training.data import epoch_order, load_cases, patch_loader, split_cases
from rcmseg.training.loop import autocast_dtype, grad_scaler, train_epoch, train_step
from rcmseg.transforms import EpochPatchDataset, train_transforms


def mosaics(data: Path | None, count: int = 4, side: int = 2048) -> list[tuple[np.ndarray, ...]]:
    """(image, labels) pairs at the working resolution."""
    if data is not None:
        cases, _ = split_cases(data, None, [], 0, 1, 0)
        return [(case.image, case.labels) for case in load_cases(cases, data)]
    rng = np.random.default_rng(0)
    return [
        (
            rng.uniform(0, 255, (side, side)).astype(np.float32),
            rng.integers(0, 6, (side, side)).astype(np.uint8),
        )
        for _ in range(count)
    ]


def loader_for(
    args: argparse.Namespace, pairs: list, batches: int, per_patch: bool = False
) -> torch.utils.data.DataLoader:
    transform = train_transforms() if per_patch else None
    patches = EpochPatchDataset(pairs, transform, window=2 * args.patch_size, crop=args.patch_size)
    indices = epoch_order(len(patches), (0, 0))
    while len(indices) < batches * args.batch_size:  # small data: repeat the epoch's patches
        indices = indices + indices
    return patch_loader(
        patches,
        indices[: batches * args.batch_size],
        args.batch_size,
        augment_seed=0,
        num_workers=args.workers,
        pin_memory=args.device.type == "cuda",
    )


def timed(batches: Iterator, count: int) -> float:
    """Seconds per batch over ``count`` batches after one warm-up batch."""
    next(batches)
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return (time.perf_counter() - started) / count


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augmented_batches(args: argparse.Namespace, pairs: list) -> Iterator[None]:
    """Batches as the trainer prepares them by default: collated crops, augmented on the device."""
    augment = BatchAugment()
    generator = torch.Generator(device=args.device).manual_seed(0)
    for batch in loader_for(args, pairs, args.steps + 1):
        images = convert_to_tensor(batch["image"], track_meta=False).to(args.device)
        labels = convert_to_tensor(batch["label"], track_meta=False).to(args.device)
        augment(images, labels.long(), generator)
        synchronise(args.device)
        yield None


def bench_pipeline(args: argparse.Namespace, pairs: list) -> float:
    return args.batch_size / timed(augmented_batches(args, pairs), args.steps)


def bench_pipeline_per_patch(args: argparse.Namespace, pairs: list) -> float:
    loader = loader_for(args, pairs, args.steps + 1, per_patch=True)
    return args.batch_size / timed(iter(loader), args.steps)


def network_steps(args: argparse.Namespace) -> Iterator[None]:
    network = get_network(args.network).to(args.device).train()
    loss_function = make_loss("mdsc_tv")
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    dtype = autocast_dtype(args.device, args.amp)
    scaler = grad_scaler(args.device, args.amp)
    shape = (args.batch_size, 1, args.patch_size, args.patch_size)
    images = torch.rand(shape, device=args.device)
    labels = torch.randint(0, 6, shape, device=args.device)
    while True:
        train_step(network, images, labels, loss_function, optimizer, scaler, dtype)
        synchronise(args.device)
        yield None


def bench_network(args: argparse.Namespace) -> float:
    return args.batch_size / timed(network_steps(args), args.steps)


def bench_training(args: argparse.Namespace, pairs: list) -> float:
    network = get_network(args.network).to(args.device)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    scaler = grad_scaler(args.device, args.amp)
    loss_function = make_loss("mdsc_tv")
    # Warm-up epoch of one batch, then the timed epoch.
    generator = torch.Generator(device=args.device).manual_seed(0)
    augment = functools.partial(BatchAugment(), generator=generator)
    for batches in (1, args.steps):
        loader = loader_for(args, pairs, batches)
        synchronise(args.device)
        started = time.perf_counter()
        train_epoch(
            network,
            loader,
            loss_function,
            optimizer,
            scaler,
            args.device,
            args.amp,
            augment=augment,
        )
        synchronise(args.device)
        seconds = time.perf_counter() - started
    return args.batch_size * args.steps / seconds


BENCHMARKS: tuple[str, ...] = ("pipeline", "pipeline_per_patch", "network", "training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data set folder (manifest.csv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--network", default=None, help="default: the bundle's (train.json)")
    parser.add_argument("--only", choices=BENCHMARKS, nargs="*")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision, the trainer's default: fp16 on CUDA, bf16 on CPUs with native bf16",
    )
    args = parser.parse_args()
    if args.network is None:
        args.network = bundle_train_settings()["network"]
    torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    card = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    pairs = mosaics(args.data)
    figures = {}
    for name in args.only or BENCHMARKS:
        if name == "network":
            figures[name] = bench_network(args)
        else:
            figures[name] = globals()[f"bench_{name}"](args, pairs)
        print(f"{name}: {figures[name]:.1f} samples/s", flush=True)
    print(
        json.dumps(
            {
                "device": card,
                "cpu": platform.processor() or platform.machine(),
                "threads": args.threads,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "patch_size": args.patch_size,
                "network": args.network,
                "autocast": str(autocast_dtype(args.device, args.amp) or "float32"),
                "samples_per_s": {key: round(value, 1) for key, value in figures.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
