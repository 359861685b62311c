"""Training data: the split into training and validation cases, the in-memory cache of the
mosaics at the working resolution, and the per-epoch patch loader.

Mosaics are small at 2 µm/px (a 6 × 6 mm mosaic is 3000 × 3000 px, 9 MB as float32), so each
labelled case is read once per run and kept in memory across epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader

from rcmseg.errors import InputError
from rcmseg.io.dataset import Case, case_id, load_case, read_manifest
from rcmseg.splits import holdout_fold, split_cases_of
from rcmseg.transforms import EpochPatchDataset


@dataclass
class LoadedCase:
    """One labelled mosaic at the working resolution: image float32 (H, W) on the 0-255 scale,
    labels uint8 (H, W) with class indices or UNLABELLED."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def _matches(case: Case, root: Path, wanted: str) -> bool:
    mosaic = Path(case.mosaic)
    return wanted in (case_id(case, root), mosaic.name, mosaic.stem)


def _pick(cases: Sequence[Case], root: Path, wanted: Sequence[str], role: str) -> list[Case]:
    picked = []
    for name in wanted:
        found = [case for case in cases if _matches(case, root, name)]
        if not found:
            raise InputError(root / "manifest.csv", f"{role} case {name!r} is not a labelled case")
        picked.extend(found)
    return picked


def split_cases(
    root: Path,
    train_cases: Sequence[str] | None,
    val_cases: Sequence[str] | None,
    fold: int,
    num_folds: int,
    seed: int,
    remap: dict[int, int] | None = None,
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases of the labelled mosaics in ``root/manifest.csv``.

    Without named cases, fold ``fold`` of :func:`rcmseg.splits.holdout_fold` validates: the same
    patients that fold ``fold`` of ``rcmseg cv`` tests.

    Raises :class:`InputError` when the manifest is missing or unreadable, when it has no labelled
    case, when a named case is absent, or when a split leaves no training case.
    """
    if not (root / "manifest.csv").is_file():
        raise InputError(root, "no manifest.csv here: not a data set (see `rcmseg synth`)")
    labelled = [case for case in read_manifest(root) if case.labels is not None]
    if not labelled:
        raise InputError(root / "manifest.csv", "no labelled mosaics to train on")
    if train_cases is None and val_cases is None:
        by_id = {case_id(case, root): case for case in labelled}
        train_ids, val_ids = holdout_fold(
            split_cases_of(root, labelled, remap=remap), fold, num_folds, seed
        )
        train, val = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
    else:
        val = _pick(labelled, root, val_cases or [], "validation")
        if train_cases is None:
            train = [case for case in labelled if case not in val]
        else:
            train = _pick(labelled, root, train_cases, "training")
    if not train:
        patients = len({case.patient for case in labelled})
        why = (
            f": all {len(labelled)} labelled mosaic(s) belong to {patients} patient(s), and the "
            f"patient-wise split validates on fold {fold}; training needs labelled mosaics of "
            "more than one patient (the manifest's patient column)"
            if train_cases is None and val_cases is None
            else ""
        )
        manifest = root / "manifest.csv"
        raise InputError(manifest, f"the split leaves no labelled training mosaic{why}")
    return train, val


def load_cases(
    cases: Sequence[Case], root: Path, remap: dict[int, int] | None = None
) -> list[LoadedCase]:
    """Read each case once at the working resolution (the run's in-memory cache)."""
    return [LoadedCase(case_id(case, root), *load_case(case, remap=remap)) for case in cases]


def epoch_order(
    num_patches: int,
    epoch_seed: Sequence[int],
    rank: int = 0,
    world_size: int = 1,
    max_patches: int | None = None,
) -> list[int]:
    """Shuffled patch indices of one epoch, then this process's share.

    Every process draws the same permutation (same ``epoch_seed``) and keeps every
    ``world_size``-th index, trimmed so all processes run the same number of steps (DDP needs
    that); ``max_patches`` caps the share for quick runs.
    """
    order = np.random.default_rng(list(epoch_seed)).permutation(num_patches)
    usable = num_patches - num_patches % world_size
    share = order[rank:usable:world_size].tolist()
    return share if max_patches is None else share[:max_patches]


def patch_loader(
    patches: EpochPatchDataset,
    indices: Sequence[int],
    batch_size: int,
    augment_seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of the epoch's patches ``indices``, augmented: ``image`` (B, 1, h, w) float in
    [0, 1] and ``label`` (B, 1, h, w) int64 with class indices or UNLABELLED.

    The augmentation's random state depends only on ``augment_seed`` (MONAI's DataLoader seeds
    the transforms from the generator, in the main process and in every worker), so an epoch
    is augmented the same way whether or not the run was resumed in between.
    """
    return DataLoader(
        patches,
        batch_size=batch_size,
        sampler=list(indices),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(augment_seed),
        pin_memory=pin_memory,
    )
