"""How hard is the synthetic RCM data? Texture-blind classifiers vs MED-Net with 1 and 3 levels.

Writes a synthetic data set (``rcmseg.synth``), keeps the last ``--test`` mosaics for testing and
reports per-class Dice on their labelled pixels (``rcmseg.metrics``) for:

- texture-blind pixel classifiers (Gaussian naive Bayes, fit on the training mosaics at 2 µm/px):
  intensity alone, and intensity plus local means over 5x5 and 9x9 px (10 and 18 µm);
- MED-Net with 3 levels and with 1 level, trained by ``rcmseg.training.train`` with the same small
  budget of process CPU time (``--cpu-minutes``; same data, batch, optimiser and schedule) and
  about the same parameter count, then segmenting the test mosaics with
  ``rcmseg.inference.segment_image``.

On a CPU the networks are shrunk (``--width-scale``, both to about the same parameter count, as in
the paper's ablation) so that a few minutes of training mean something. Example::

    python benchmarks/synth_difficulty.py --out /tmp/difficulty --train 8 --test 3 --size 2560
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from rcmseg.classes import CLASS_NAMES, NUM_CLASSES, UNLABELLED
from rcmseg.io.dataset import load_case, read_manifest
from rcmseg.metrics import confusion_matrix, one_vs_rest
from rcmseg.networks import DEFAULT_WIDTHS, count_parameters, get_network
from rcmseg.synth import write_dataset


def pixel_features(image: np.ndarray, radii: tuple[int, ...]) -> np.ndarray:
    """(H·W, 1 + len(radii)): intensity and box means over (2r+1)² px, no texture measure."""
    columns = [image.ravel()]
    columns += [ndimage.uniform_filter(image, 2 * r + 1, mode="reflect").ravel() for r in radii]
    return np.stack(columns, axis=1).astype(np.float64)


class GaussianNaiveBayes:
    """Per class: a prior and an independent Gaussian per feature (fit on labelled pixels)."""

    def fit(self, features: np.ndarray, labels: np.ndarray) -> GaussianNaiveBayes:
        self.log_prior = np.log(np.bincount(labels, minlength=NUM_CLASSES) / labels.size + 1e-12)
        self.mean = np.stack([features[labels == k].mean(axis=0) for k in range(NUM_CLASSES)])
        self.var = np.stack([features[labels == k].var(axis=0) for k in range(NUM_CLASSES)]) + 1e-3
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        log_likelihood = -0.5 * (
            ((features[:, None, :] - self.mean[None]) ** 2) / self.var[None]
            + np.log(2 * np.pi * self.var[None])
        ).sum(axis=2)
        return np.argmax(log_likelihood + self.log_prior[None], axis=1)


def evaluate(predictions: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, object]:
    cm = sum(confusion_matrix(p, t) for p, t in zip(predictions, labels, strict=True))
    metrics = one_vs_rest(cm)
    return {"dice": [float(d) for d in metrics["dice"]], "mean_dice": float(metrics["mean_dice"])}


def texture_blind(
    train: list[tuple[np.ndarray, np.ndarray]],
    test: list[tuple[np.ndarray, np.ndarray]],
    radii: tuple[int, ...],
    seed: int,
) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    features, targets = [], []
    for image, labels in train:
        labelled = np.flatnonzero(labels.ravel() != UNLABELLED)
        chosen = rng.choice(labelled, size=min(40_000, labelled.size), replace=False)
        features.append(pixel_features(image, radii)[chosen])
        targets.append(labels.ravel()[chosen].astype(np.int64))
    model = GaussianNaiveBayes().fit(np.concatenate(features), np.concatenate(targets))
    predictions = [model.predict(pixel_features(img, radii)).reshape(img.shape) for img, _ in test]
    return evaluate(predictions, [labels for _, labels in test])


def scaled_widths(levels: int, scale: float) -> tuple[int, ...]:
    return tuple(max(4, round(w * scale)) for w in DEFAULT_WIDTHS[levels])


def train_and_test(
    name: str,
    levels: int,
    args: argparse.Namespace,
    data_dir: Path,
    train_ids: list[str],
    test: list[tuple[np.ndarray, np.ndarray]],
) -> dict[str, object]:
    from rcmseg.inference import segment_image
    from rcmseg.training import TrainConfig, train

    widths = scaled_widths(levels, args.width_scale)
    config = TrainConfig(
        data_dir=data_dir,
        output_dir=args.out / f"run_{name}",
        train_cases=train_ids,
        val_cases=[],
        network=name,
        network_kwargs={"widths": widths},
        optimizer="adam",
        learning_rate=args.learning_rate,
        final_learning_rate=args.learning_rate / 10,
        max_epochs=args.epochs,
        batch_size=args.batch,
        patch_size=args.patch,
        window=2 * args.patch,
        iterations_per_epoch=args.iterations,
        seed=args.seed,
        device="cpu",
        threads=args.threads,
        progress=False,
        resume=True,
        stop_after_epochs=1,
    )
    # Same CPU-time budget for every network (process CPU time: fair on a shared machine),
    # one epoch per call, resuming, until the budget or the epochs are spent.
    started, cpu_started = time.perf_counter(), time.process_time()
    while True:
        result = train(config)
        cpu_s = time.process_time() - cpu_started
        if result.epochs_completed >= args.epochs or cpu_s >= args.cpu_minutes * 60:
            break
    train_s = time.perf_counter() - started
    network = get_network(name, widths=widths)
    network.load_state_dict(torch.load(result.model_path, map_location="cpu", weights_only=True))
    network.eval()
    started = time.perf_counter()
    predictions = [
        np.argmax(segment_image(image, network, preset="fast", device="cpu"), axis=0)
        for image, _ in test
    ]
    scores = evaluate(predictions, [labels for _, labels in test])
    scores.update(
        parameters=count_parameters(network),
        widths=list(widths),
        train_s=round(train_s, 1),
        train_cpu_s=round(cpu_s, 1),
        epochs=result.epochs_completed,
        segment_s=round(time.perf_counter() - started, 1),
        patches_seen=int(sum(row.get("patches", 0) for row in result.history)),
    )
    return scores


def table(results: dict[str, dict[str, object]]) -> str:
    header = "| method | " + " | ".join(CLASS_NAMES) + " | mean Dice |"
    lines = [header, "|" + "---|" * (len(CLASS_NAMES) + 2)]
    for method, scores in results.items():
        dice = " | ".join(f"{d:.2f}" for d in scores["dice"])  # type: ignore[union-attr]
        lines.append(f"| {method} | {dice} | {scores['mean_dice']:.2f} |")
    return "\n".join(lines)


def time_mosaic(size: int, seed: int) -> None:
    """Wall time and peak resident memory of generating one size x size mosaic."""
    import resource

    from rcmseg.synth import make_mosaic

    started = time.perf_counter()
    image, labels = make_mosaic(size, seed=seed)
    elapsed = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    labelled = float(np.mean(labels != UNLABELLED))
    print(
        f"make_mosaic({size}): {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB "
        f"(outputs {2 * image.nbytes / 2**20:.0f} MB), labelled {labelled:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/rcmseg_synth_difficulty"))
    parser.add_argument("--train", type=int, default=8, help="training mosaics")
    parser.add_argument("--test", type=int, default=3, help="held-out test mosaics")
    parser.add_argument("--size", type=int, default=2560, help="mosaic side, px at 0.5 µm/px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100, help="epochs at most")
    parser.add_argument(
        "--cpu-minutes", type=float, default=5.0, help="CPU-time budget per network (process)"
    )
    parser.add_argument("--iterations", type=int, default=4, help="optimiser steps per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256, help="training crop side, px at 2 µm/px")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--width-scale", type=float, default=0.25, help="x paper widths")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-networks", action="store_true")
    parser.add_argument(
        "--networks", nargs="+", choices=("mednet", "mednet1"), default=["mednet", "mednet1"]
    )
    parser.add_argument(
        "--time-mosaic", type=int, metavar="SIZE", help="only time make_mosaic(SIZE) and exit"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.time_mosaic:
        time_mosaic(args.time_mosaic, args.seed)
        return

    data_dir = args.out / "data"
    started = time.perf_counter()
    if not (data_dir / "manifest.csv").exists():
        n = args.train + args.test
        write_dataset(data_dir, n, size=args.size, seed=args.seed, patients=n)
    cases = read_manifest(data_dir)
    loaded = [load_case(case) for case in cases]
    train, test = loaded[: args.train], loaded[args.train :]
    train_ids = [case.mosaic.stem for case in cases[: args.train]]
    elapsed = time.perf_counter() - started
    print(f"data: {len(train)} train, {len(test)} test mosaics ({elapsed:.0f} s)")

    results: dict[str, dict[str, object]] = {}
    results["naive Bayes: intensity"] = texture_blind(train, test, (), args.seed)
    results["naive Bayes: intensity + local means (5, 9 px)"] = texture_blind(
        train, test, (2, 4), args.seed
    )
    if not args.skip_networks:
        for name, levels in (("mednet", 3), ("mednet1", 1)):
            if name not in args.networks:
                continue
            results[f"MED-Net {levels}-level"] = train_and_test(
                name, levels, args, data_dir, train_ids, test
            )
            print(f"{name}: {results[f'MED-Net {levels}-level']}", flush=True)
    print(table(results))
    (args.out / "results.json").write_text(json.dumps({"args": vars(args), **results}, default=str))


if __name__ == "__main__":
    main()
