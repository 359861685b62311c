"""Which mosaics a batch segments, where their outputs go and which lesion each belongs to.

For each mosaic ``IN/<dir>/<name>.<ext>`` the outputs go to ``OUT/<dir>/<name>.*``. IN may also
be a single mosaic file; its outputs then go to ``OUT/<name>.*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rcmseg.errors import InputError
from rcmseg.io.dataset import cases_near, declared_mpps
from rcmseg.io.mosaics import (
    FolderTree,
    check_mosaic_source,
    distinct_stems,
    walk_folder,
)

LABELS, PROBABILITIES, UNCERTAINTY, OVERLAY, GEOJSON, SUMMARY = (
    "labels.tif",
    "probabilities.tif",
    "uncertainty.tif",
    "overlay.png",
    "geojson",
    "summary.json",
)
OUTPUT_KINDS = (SUMMARY, LABELS, PROBABILITIES, UNCERTAINTY, OVERLAY, GEOJSON)
# Outputs whose endings are also mosaic endings: never segmented as mosaics, wherever they lie
# (a batch with --out equal to its input folder, or a results folder kept among the mosaics).
OUTPUT_IMAGE_ENDINGS = tuple(f".{kind}" for kind in (LABELS, PROBABILITIES, UNCERTAINTY, OVERLAY))
MONAI_LABEL_RECORD = "datastore_v2.json"  # MONAI Label's record, in a studies folder it serves


@dataclass(frozen=True)
class MosaicJob:
    """One mosaic to segment: where it is, where its outputs go, which lesion it belongs to;
    ``declared_mpp``: the µm/px a manifest gives it for a file that carries none."""

    path: Path
    relative: str
    out_stem: Path
    lesion: str
    declared_mpp: float | None = None

    def fallback_mpp(self, default: float) -> float:
        """µm/px to read the mosaic at when its file carries no pixel size (``--mpp``: default)."""
        return self.declared_mpp or default

    def output(self, kind: str) -> Path:
        return self.out_stem.with_name(f"{self.out_stem.name}.{kind}")


def plan_jobs(source: Path, out_dir: Path, tree: FolderTree | None = None) -> list[MosaicJob]:
    """Every mosaic under the folder ``source`` (or the one mosaic file ``source``) with its
    output stem and lesion id, sorted by path.

    ``out_dir`` may be ``source`` itself, hold it, or lie inside it: the files a batch writes
    are never taken for mosaics, and a folder of outputs inside ``source`` is not searched.

    The lesion id (and a pixel size for a file that carries none, ``mosaic_mpp``) comes from a
    manifest when one lists the mosaic; else the lesion is the file name. Files a
    manifest lists as label maps are not mosaics (``rcmseg batch DATA`` on a data set folder
    segments its mosaics, not its ``labels/``), nor are the label maps of a MONAI Label studies
    folder (:func:`monai_label_labels`). Stems are :func:`distinct_stems`.

    ``tree`` is the caller's walk of ``source`` (one walk serves the plan and the note on what
    could not be searched); it is used when it is the walk of :func:`batch_root`.

    Raises:
        InputError: ``source`` does not exist or is a file of another type.
    """
    check_mosaic_source(source)
    root = batch_root(source)
    if tree is None or tree.folder != root:
        tree = walk_folder(root)
    if source.is_file():
        mosaics = [source]
    else:
        skipped = [out_dir, *monai_label_labels(source)]
        mosaics = tree.mosaics(skipped, skip_endings=OUTPUT_IMAGE_ENDINGS)
    cases = cases_near(tree)
    lesions = {case.mosaic.resolve(): case.lesion for case in cases if case.lesion}
    declared = declared_mpps(cases)
    if source.is_dir():  # a file named on purpose is segmented whatever a manifest says
        label_maps = {case.labels.resolve() for case in cases if case.labels is not None}
        mosaics = [path for path in mosaics if path.resolve() not in label_maps]
    relatives = [path.relative_to(root).as_posix() for path in mosaics]
    return [
        MosaicJob(
            path=path,
            relative=relative,
            out_stem=out_dir / stem,
            lesion=lesions.get(path.resolve(), Path(stem).name),
            declared_mpp=declared.get(path.resolve()),
        )
        for path, relative, stem in zip(mosaics, relatives, distinct_stems(relatives), strict=True)
    ]


def batch_root(source: Path) -> Path:
    """The folder a batch on ``source`` walks: ``source`` itself, or a mosaic file's folder
    (searched for the manifest that names the file's lesion)."""
    return source if source.is_dir() else source.parent


def monai_label_labels(folder: Path) -> list[Path]:
    """``folder/labels`` when ``folder`` is a studies folder MONAI Label serves (``rcmseg label
    serve``): the label maps annotators submitted are kept there, and they are not mosaics."""
    return [folder / "labels"] if (folder / MONAI_LABEL_RECORD).is_file() else []


def parts_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(num_parts, part_id)`` from torchrun's ``WORLD_SIZE`` and ``RANK``; ``(1, 0)`` alone."""
    return int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))


def select_part(jobs: list[MosaicJob], num_parts: int, part_id: int) -> list[MosaicJob]:
    """Every ``num_parts``-th job starting at ``part_id``: parts are disjoint and cover all."""
    if num_parts < 1:
        raise InputError(None, f"--num-parts {num_parts}: at least 1 part is needed")
    if not 0 <= part_id < num_parts:
        raise InputError(None, f"--part-id {part_id}: must be in 0..{num_parts - 1}")
    return jobs[part_id::num_parts]
