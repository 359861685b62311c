"""Write synthetic mosaics, label maps and a manifest in the data set layout of
:mod:`rcmseg.io.dataset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rcmseg.classes import MOSAIC_MPP, colour_lut
from rcmseg.io.dataset import Case, write_manifest
from rcmseg.synth.mosaic import make_mosaic

TILE_SIDE = 512  # tile side of written TIFFs (as QuPath's exports)
TILED_ABOVE_PX = 2048  # mosaics with a longer side are written tiled


def write_mosaic_tiff(path: str | Path, image: np.ndarray, mpp: float = MOSAIC_MPP) -> Path:
    """An 8-bit grayscale TIFF with its pixel size in resolution tags (pixels per cm).

    Lossless deflate; tiled (512 px) when a side exceeds 2048 px, so OpenSlide and tiffslide
    read it as a whole-slide image.
    """
    import tifffile

    path = Path(path)
    tiled = max(image.shape) > TILED_ABOVE_PX
    tifffile.imwrite(
        path,
        image,
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 1},
        tile=(TILE_SIDE, TILE_SIDE) if tiled else None,
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    return path


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """A palette PNG: values are class indices (255 = unlabelled), colours as in the paper."""
    from PIL import Image

    path = Path(path)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    indexed = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    indexed.putpalette(colour_lut().ravel().tolist())
    indexed.save(path, compress_level=1)
    return path


def _mosaic_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_dataset(
    out: str | Path,
    n: int,
    size: int | tuple[int, int] = 2048,
    seed: int = 0,
    patients: int | None = None,
    clinics: int = 2,
    labelled_fraction: float = 0.57,
) -> list[Case]:
    """Write ``n`` synthetic mosaics as a data set: ``OUT/mosaics/*.tif``, ``OUT/labels/*.png``,
    ``OUT/manifest.csv``.

    Mosaic i belongs to patient ``i % patients`` (default: one patient per two mosaics), one
    lesion per patient, and patient p to clinic ``p % clinics``. Deterministic per seed.
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    patients = patients or max(1, (n + 1) // 2)
    (out / "mosaics").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(n):
        image, labels = make_mosaic(
            size, seed=_mosaic_seed(seed, index), labelled_fraction=labelled_fraction
        )
        name = f"synth_{index:04d}"
        mosaic = write_mosaic_tiff(out / "mosaics" / f"{name}.tif", image)
        label_map = write_label_png(out / "labels" / f"{name}.png", labels)
        patient = index % patients
        cases.append(
            Case(
                mosaic=mosaic,
                labels=label_map,
                patient=f"P{patient:03d}",
                lesion=f"P{patient:03d}-L1",
                clinic=f"C{patient % clinics + 1}",
            )
        )
    write_manifest(out, cases)
    return cases
