"""Partially labelled multi-region mosaics built from real texture photographs.

Synthetic RCM data is ours and can be tuned to; real textures cannot. Six confusable Brodatz
textures from the USC-SIPI database stand in for the six RCM patterns. The database holds two
separate digitisations of each texture (``1.1.*`` at 512 px, ``1.3.*`` at 1024 px, taken here
as covering the same field, so 2x finer; the textures' correlation lengths suggest ``1.3`` is
about 1.3x coarser still, docs/benchmarks.md); the ``1.3`` images are area-averaged 2x, then
training mosaics are cut from one digitisation and test mosaics from the other.

Each mosaic is a soft partition of the plane into regions at several scales: one smoothed random
field per class (a mix of Gaussian-filtered noise at several widths), a softmax over the fields
gives blending weights (gradual borders), the argmax gives the label. Every texture layer is
normalised to a common mean and standard deviation so brightness alone does not separate the
classes. About 57 % of pixels are labelled, as in the paper: blurred borders and whole regions
are left unlabelled (255).

Mosaics are written at 2 µm/px (the working resolution: no downsampling when read) in the
rcmseg dataset layout, with ``clinic`` naming the digitisation (``usc_1.3`` / ``usc_1.1``).

A second, independent set (``source="kth"``): six other materials from KTH-TIPS (200 px
photographs at nine scales, nine pose/illumination shots each). Training mosaics take shots 1-6
of scales 4-6, test mosaics shots 7-9 of the same scales (``clinic`` ``kth_shots_1-6`` /
``kth_shots_7-9``): the shift is pose and illumination, not the scan; each mosaic draws one shot
per class from its side's pool, so layers vary from mosaic to mosaic.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

from rcmseg.classes import CLASS_NAMES, UNLABELLED, WORKING_MPP
from rcmseg.io.dataset import Case, read_manifest, write_manifest


@dataclass(frozen=True)
class Texture:
    """A class's texture: its name and its file in each digitisation of USC-SIPI volume 3."""

    name: str
    file_512: str  # digitisation 1.1, 512x512
    file_1024: str  # digitisation 1.3, 1024x1024


# Class index (rcmseg.classes order) -> texture. 1.1.05 and 1.3.04 are the same wool sample (the
# two volumes number it differently); the others share their number.
TEXTURES: tuple[Texture, ...] = (
    Texture("water", "1.1.08.tiff", "1.3.08.tiff"),
    Texture("pressed leather", "1.1.06.tiff", "1.3.06.tiff"),
    Texture("pigskin", "1.1.11.tiff", "1.3.11.tiff"),
    Texture("beach sand", "1.1.07.tiff", "1.3.07.tiff"),
    Texture("bubbles", "1.1.13.tiff", "1.3.13.tiff"),
    Texture("wool", "1.1.05.tiff", "1.3.04.tiff"),
)
TARGET_MEAN, TARGET_STD = 128.0, 40.0  # every texture layer is brought to these (0-255 scale)
DIGITISATIONS = ("1.3", "1.1")
SOURCES = ("usc", "kth")
# Class index -> KTH-TIPS material: the isotropic, speckle-like ones (textures README).
KTH_MATERIALS: tuple[str, ...] = (
    "styrofoam",
    "sandpaper",
    "sponge",
    "cracker",
    "orange_peel",
    "brown_bread",
)
KTH_SCALES: tuple[int, ...] = (4, 5, 6)
KTH_SHOTS: dict[str, tuple[int, ...]] = {"1-6": (1, 2, 3, 4, 5, 6), "7-9": (7, 8, 9)}


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = image.shape[0] // factor, image.shape[1] // factor
    return image[: rows * factor, : cols * factor].reshape(rows, factor, cols, factor).mean((1, 3))


def _without_dark_bottom(image: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """Drop the black rows that end some scans (2 rows in every 1.1 image, 26 in 1.1.11):
    mirror tiling would otherwise turn them into dark lines that give the class away."""
    rows = image.astype(np.float64).mean(axis=1)
    keep = len(rows)
    while keep > 1 and rows[keep - 1] < threshold:
        keep -= 1
    return image[:keep].astype(np.float64)


def load_texture(
    texture_dir: Path, texture: Texture, digitisation: str, shrink: int = 1, zoom: float = 1.0
) -> np.ndarray:
    """float64 texture at the ``1.1`` scale shrunk ``shrink`` times (area average), normalised
    to TARGET_MEAN/TARGET_STD: about (512 / shrink) px square. ``zoom`` ≠ 1 enlarges it that
    many times more (box-filtered resampling of the scan, e.g. 1.3 to bring ``1.1`` to the
    ``1.3`` scans' apparent scale)."""
    usc = Path(texture_dir) / "usc_sipi"
    if digitisation == "1.1":
        scan, factor = _without_dark_bottom(tifffile.imread(usc / texture.file_512)), shrink
    elif digitisation == "1.3":
        scan = _without_dark_bottom(tifffile.imread(usc / texture.file_1024))
        factor = 2 * shrink
    else:
        raise ValueError(f"digitisation must be one of {DIGITISATIONS}, not {digitisation!r}")
    if zoom == 1.0:
        return _normalised(_block_mean(scan, factor))
    size = [max(1, round(extent / factor * zoom)) for extent in scan.shape[::-1]]
    resized = Image.fromarray(scan.astype(np.float32)).resize(size, Image.Resampling.BOX)
    return _normalised(np.asarray(resized))


def _normalised(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float64)
    return (image - image.mean()) / image.std() * TARGET_STD + TARGET_MEAN


def load_kth_pool(texture_dir: Path, material: str, shots: Sequence[int]) -> list[np.ndarray]:
    """Every KTH-TIPS shot of ``material`` at :data:`KTH_SCALES` among ``shots`` (file names
    ``*-scale_S_im_N_grey.png``), each normalised to TARGET_MEAN/TARGET_STD."""
    folder = Path(texture_dir) / "kth_tips_grey" / material
    pool = [
        _normalised(np.asarray(Image.open(path).convert("L")))
        for scale in KTH_SCALES
        for shot in shots
        for path in sorted(folder.glob(f"*-scale_{scale}_im_{shot}_grey.png"))
    ]
    if not pool:
        raise FileNotFoundError(f"{folder}: no shots {list(shots)} at scales {KTH_SCALES}")
    return pool


def texture_layer(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) piece of ``source``: random rotation/flip, mirror-tiled, random offset."""
    layer = np.rot90(source, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        layer = layer[:, ::-1]
    # mirror-pad to at least twice the mosaic side so any offset fits (symmetric: no hard seams)
    pad = [(0, max(0, 2 * size - extent)) for extent in layer.shape]
    tiled = np.pad(layer, pad, mode="symmetric")
    row = rng.integers(0, tiled.shape[0] - size)
    col = rng.integers(0, tiled.shape[1] - size)
    return tiled[row : row + size, col : col + size]


def region_weights(
    size: int,
    classes: int,
    rng: np.random.Generator,
    scales_px: tuple[float, ...] = (24.0, 48.0, 96.0, 192.0),
    sharpness: float = 6.0,
) -> np.ndarray:
    """Soft class weights (classes, size, size) summing to 1: regions at several scales.

    Each class's field mixes smoothed noise at ``scales_px`` (σ in px) with random weights, so
    one mosaic has both large regions and small islands; ``sharpness`` sets how gradual borders
    are (softmax temperature over standardised fields). Fields are smoothed on a coarser grid
    (a third of the smallest σ) and interpolated up: they are smooth there, and it is far faster.
    """
    step = max(1, int(min(scales_px) // 3))
    coarse = -(-size // step)
    fields = np.zeros((classes, size, size))
    for c in range(classes):
        mix = rng.dirichlet(np.ones(len(scales_px)))
        field = np.zeros((coarse, coarse))
        for weight, sigma in zip(mix, scales_px, strict=True):
            smooth = ndimage.gaussian_filter(
                rng.standard_normal((coarse, coarse)), sigma / step, mode="wrap"
            )
            field += weight * smooth / smooth.std()
        fine = ndimage.zoom(field, step, order=3, mode="grid-wrap", grid_mode=True)
        fields[c] = (fine[:size, :size] - fine.mean()) / fine.std()
    logits = sharpness * fields
    logits -= logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=0, keepdims=True)


def partial_labels(
    weights: np.ndarray,
    rng: np.random.Generator,
    labelled_fraction: float = 0.57,
    border_confidence: float = 0.8,
) -> np.ndarray:
    """uint8 labels: argmax of the weights; blurred borders and whole regions unlabelled.

    Pixels whose winning weight is below ``border_confidence`` are unlabelled (the expert's
    uncertain borders); then randomly chosen connected regions are dropped until about
    ``labelled_fraction`` of the pixels stay labelled.
    """
    labels = weights.argmax(axis=0).astype(np.uint8)
    labels[weights.max(axis=0) < border_confidence] = UNLABELLED
    regions, count = ndimage.label(labels != UNLABELLED)
    sizes = np.bincount(regions.reshape(-1), minlength=count + 1)
    excess = (labels != UNLABELLED).sum() - labelled_fraction * labels.size
    for region in rng.permutation(np.arange(1, count + 1)):
        if excess <= 0:
            break
        if sizes[region] <= 2 * excess:  # never overshoot by much with one big region
            labels[regions == region] = UNLABELLED
            excess -= sizes[region]
    return labels


def make_texture_mosaic(
    sources: list[np.ndarray], size: int, rng: np.random.Generator, shrink: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image (size, size) blending the textures by region weights, and uint8 labels.

    Region scales shrink with the textures (``shrink``) so regions hold the same pattern count.
    """
    image, labels, _full = make_texture_mosaic_with_truth(sources, size, rng, shrink)
    return image, labels


def make_texture_mosaic_with_truth(
    sources: list[np.ndarray], size: int, rng: np.random.Generator, shrink: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`make_texture_mosaic` plus the complete label map (argmax of the region weights,
    every pixel labelled), the reference for fragmentation metrics. Same random draws."""
    scales = tuple(s / shrink for s in (24.0, 48.0, 96.0, 192.0))
    weights = region_weights(size, len(sources), rng, scales_px=scales)
    layers = np.stack([texture_layer(source, size, rng) for source in sources])
    image = np.clip((weights * layers).sum(axis=0), 0, 255)
    full = weights.argmax(axis=0).astype(np.uint8)
    # blending lowers contrast at borders; that is what gradual transitions look like
    return np.round(image).astype(np.uint8), partial_labels(weights, rng), full


def write_texture_dataset(
    texture_dir: Path,
    out: Path,
    train_mosaics: int = 16,
    test_mosaics: int = 6,
    size: int = 384,
    seed: int = 0,
    train_digitisation: str = "1.3",
    shrink: int = 2,
    source: str = "usc",
    test_zoom: float = 1.0,
) -> list[Case]:
    """Write the benchmark dataset: training mosaics from one digitisation, tests from the other
    (``source="usc"``), or from KTH-TIPS shots 1-6 and 7-9 (``source="kth"``).

    ``shrink`` makes the USC textures (and, for both sources, the region scales, which are in px)
    that many times smaller than the ``1.1`` scan, so a small patch holds as much pattern as a
    large one would; KTH-TIPS shots are used at their own scale. ``test_zoom`` enlarges the USC
    test side's textures (:func:`load_texture`'s ``zoom``): a scale-matched test set.
    Returns the cases (also in ``out/manifest.csv``, training side first); ``clinic`` is
    ``usc_<digitisation>`` or ``kth_shots_<shots>``. The complete label maps (no unlabelled
    pixel) go to ``out/labels_full/<name>.png``, outside the manifest: the reference for
    fragmentation metrics.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    rng = np.random.default_rng(seed)
    cases = []
    groups = clinic_groups(source, train_digitisation)
    for group, count in zip(groups, (train_mosaics, test_mosaics), strict=True):
        zoom = test_zoom if group != groups[0] else 1.0
        pools = _texture_pools(texture_dir, source, group, shrink, zoom)
        for index in range(count):
            # usc_1.3 -> usc13_00, kth_shots_1-6 -> kth16_00
            prefix = "".join(ch for ch in group.replace("_shots", "") if ch.isalnum())
            name = f"{prefix}_{index:02d}"
            # a draw only where there is a choice: the USC mosaics stay those of earlier runs
            sources = [
                pool[int(rng.integers(len(pool)))] if len(pool) > 1 else pool[0] for pool in pools
            ]
            image, labels, full = make_texture_mosaic_with_truth(sources, size, rng, shrink)
            mosaic = out / "mosaics" / f"{name}.tif"
            label_path = out / "labels" / f"{name}.png"
            full_path = out / "labels_full" / f"{name}.png"
            for path in (mosaic, label_path, full_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(full).save(full_path)
            tifffile.imwrite(
                mosaic,
                image,
                resolution=(1e4 / WORKING_MPP, 1e4 / WORKING_MPP),
                resolutionunit="CENTIMETER",
            )
            Image.fromarray(labels).save(label_path)
            cases.append(Case(mosaic, label_path, name, name, group))
    write_manifest(out, cases)
    return cases


def clinic_groups(source: str, train_digitisation: str = "1.3") -> tuple[str, str]:
    """The training-side and test-side clinic names of a source."""
    if source == "kth":
        return tuple(f"kth_shots_{shots}" for shots in KTH_SHOTS)  # type: ignore[return-value]
    test_digitisation = next(d for d in DIGITISATIONS if d != train_digitisation)
    return f"usc_{train_digitisation}", f"usc_{test_digitisation}"


def _texture_pools(
    texture_dir: Path, source: str, group: str, shrink: int, zoom: float = 1.0
) -> list[list[np.ndarray]]:
    """Per class, the texture images a mosaic of ``group`` may draw its layer from."""
    if source == "kth":
        if zoom != 1.0:
            raise ValueError("a test zoom is for the USC digitisations only")
        shots = KTH_SHOTS[group.removeprefix("kth_shots_")]
        return [load_kth_pool(texture_dir, material, shots) for material in KTH_MATERIALS]
    digitisation = group.removeprefix("usc_")
    return [[load_texture(texture_dir, t, digitisation, shrink, zoom)] for t in TEXTURES]


def texture_names(source: str = "usc") -> list[str]:
    """The texture standing in for each class, in class order."""
    return list(KTH_MATERIALS) if source == "kth" else [t.name for t in TEXTURES]


def describe(source: str = "usc") -> str:
    """Class -> texture table for reports."""
    if source == "kth":
        return "\n".join(
            f"- {cls}: {material} (KTH-TIPS, scales {KTH_SCALES})"
            for cls, material in zip(CLASS_NAMES, KTH_MATERIALS, strict=True)
        )
    return "\n".join(
        f"- {cls}: {t.name} (USC-SIPI {t.file_512} / {t.file_1024})"
        for cls, t in zip(CLASS_NAMES, TEXTURES, strict=True)
    )


def write_benchmark_dataset(
    args: argparse.Namespace, out: Path, test_zoom: float = 1.0
) -> list[Case]:
    """:func:`write_texture_dataset` with the options of :func:`add_benchmark_arguments`, once:
    an existing ``out/manifest.csv`` is kept (its cases returned)."""
    if (out / "manifest.csv").is_file():
        return read_manifest(out)
    return write_texture_dataset(
        args.textures,
        out,
        args.train_mosaics,
        args.test_mosaics,
        args.size,
        args.seed,
        shrink=args.shrink,
        source=args.source,
        test_zoom=test_zoom,
    )


def add_benchmark_arguments(
    parser: argparse.ArgumentParser,
    *,
    train_mosaics: int,
    test_mosaics: int,
    size: int,
    shrink: int,
    epochs: int,
    iterations: int,
    batch_size: int,
    patch: int,
    lr: float,
) -> None:
    """The options every real-texture benchmark shares: the texture folder, the dataset built
    from it (:func:`write_texture_dataset`) and the training budget, with the script's defaults."""
    parser.add_argument("textures", type=Path, help="folder holding usc_sipi/ (textures README)")
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="usc",
        help="usc: train on the 1.3 scans, test on 1.1; kth: KTH-TIPS shots 1-6 / 7-9",
    )
    parser.add_argument("--train-mosaics", type=int, default=train_mosaics)
    parser.add_argument("--test-mosaics", type=int, default=test_mosaics)
    parser.add_argument("--size", type=int, default=size, help="mosaic side, px")
    parser.add_argument("--shrink", type=int, default=shrink, help="texture downscale vs 1.1")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--iterations", type=int, default=iterations, help="steps per epoch")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--patch", type=int, default=patch, help="training crop side, px")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
