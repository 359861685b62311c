"""A data set on disk: mosaics, label maps and ``manifest.csv`` tying them to patients.

Layout (what ``rcmseg synth`` writes; other layouts work as long as the manifest points at the
files)::

    ROOT/manifest.csv        mosaic,labels,patient,lesion,clinic[,mosaic_mpp]
    ROOT/mosaics/*.tif       8-bit grayscale mosaics (0.5 µm/px)
    ROOT/labels/*.png        uint8 label maps, same size as their mosaic, 255 = unlabelled

Paths in the manifest are relative to ROOT (absolute paths also work; ``\\`` separators, as a
manifest saved on Windows has them, are read as ``/``); ``labels`` may be empty for a mosaic
without labels. Fields are separated by ``,`` or, as a spreadsheet saves CSV where the decimal
mark is a comma, by ``;`` (or tabs); column names are matched case-insensitively. ``patient``
drives patient-wise splits, ``clinic`` clinic-wise splits, ``lesion`` per-lesion reports.
The optional ``mosaic_mpp`` column gives a mosaic's pixel size in µm for a file that carries
none (a PNG, JPEG or BMP export, a TIFF without resolution tags); a pixel size in the file wins,
and a mosaic with neither is taken at 0.5 µm/px.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np

from rcmseg.classes import MOSAIC_MPP, UNLABELLED, WORKING_MPP
from rcmseg.errors import InputError
from rcmseg.io.atomic import write_text_atomic
from rcmseg.io.csvfiles import read_spreadsheet_text, spreadsheet_delimiter
from rcmseg.io.labels import downsample_labels, read_label_map
from rcmseg.io.mosaics import FolderTree, pixel_size, probe_mosaic, read_mosaic

__all__ = [
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "Case",
    "cases_near",
    "has_rows",
    "load_case",
    "manifest_path",
    "pixel_size_note",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = ("mosaic", "labels", "patient", "lesion", "clinic")
MPP_COLUMN = "mosaic_mpp"  # optional: µm/px of a mosaic whose file carries no pixel size


@dataclass(frozen=True)
class Case:
    """One mosaic of a data set, with absolute paths; ``mosaic_mpp`` (µm/px) is the manifest's
    pixel size for a file that carries none (None: not given)."""

    mosaic: Path
    labels: Path | None
    patient: str
    lesion: str
    clinic: str
    mosaic_mpp: float | None = None

    @property
    def fallback_mpp(self) -> float:
        """µm/px to read the mosaic at when its file carries no pixel size."""
        return self.mosaic_mpp or MOSAIC_MPP


def case_id(case: Case, root: Path) -> str:
    """The mosaic's path relative to the dataset root (POSIX), which names a case everywhere."""
    mosaic = Path(case.mosaic)
    try:
        return mosaic.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return mosaic.as_posix()


def manifest_path(root: str | Path) -> Path:
    """``ROOT/manifest.csv`` for a data set folder; a path to a .csv file is taken as it is."""
    root = Path(root)
    return root if root.suffix.lower() == ".csv" else root / MANIFEST_NAME


def _resolve(root: Path, value: str) -> Path:
    """``value`` relative to ``root`` unless absolute; a Windows path (``mosaics\\a.tif``, as a
    manifest saved on Windows holds) is read with ``/`` when it names no file as written."""
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if "\\" in value and not path.exists():
        windows = PureWindowsPath(value)
        if not (windows.drive or windows.root):
            return root / windows.as_posix()
    return path


def _case_from_row(manifest: Path, line: int, row: dict[str, str | None]) -> Case:
    values = {column: (row.get(column) or "").strip() for column in MANIFEST_COLUMNS}
    if not values["mosaic"]:
        raise InputError(manifest, f"line {line}: the mosaic column is empty")
    mosaic = _resolve(manifest.parent, values["mosaic"])
    if not mosaic.is_file():
        raise InputError(manifest, f"line {line}: mosaic {values['mosaic']} does not exist")
    labels = _resolve(manifest.parent, values["labels"]) if values["labels"] else None
    if labels is not None and not labels.is_file():
        raise InputError(manifest, f"line {line}: label map {values['labels']} does not exist")
    mpp_text = (row.get(MPP_COLUMN) or "").strip()
    mosaic_mpp = pixel_size(mpp_text.replace(",", ".")) if mpp_text else None
    if mpp_text and mosaic_mpp is None:
        raise InputError(
            manifest, f"line {line}: {MPP_COLUMN} '{mpp_text}' is not a pixel size in µm above 0"
        )
    return Case(mosaic, labels, values["patient"], values["lesion"], values["clinic"], mosaic_mpp)


def read_manifest(root: str | Path) -> list[Case]:
    """The cases listed in ``ROOT/manifest.csv``, in file order.

    Raises:
        InputError: no manifest, missing columns, a listed file that does not exist, or no rows.
    """
    manifest = manifest_path(root)
    if not manifest.is_file():
        raise InputError(manifest, "data set manifest does not exist")
    with io.StringIO(read_spreadsheet_text(manifest), newline="") as handle:
        delimiter = spreadsheet_delimiter(
            handle.readline(), lambda names: set(MANIFEST_COLUMNS) <= {n.lower() for n in names}
        )
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [column for column in MANIFEST_COLUMNS if column not in header]
        if missing:
            raise InputError(
                manifest,
                f"manifest lacks the column(s) {', '.join(missing)}; "
                f"expected {','.join(MANIFEST_COLUMNS)}",
            )
        reader.fieldnames = header
        # Line numbers count the header as line 1, as an editor shows them.
        cases = [_case_from_row(manifest, line, row) for line, row in enumerate(reader, start=2)]
    if not cases:
        raise InputError(manifest, "manifest lists no mosaics (empty data set)")
    return cases


def has_rows(manifest: Path) -> bool:
    """Whether a manifest lists any mosaic (a header alone, or blank lines, list none)."""
    rows = csv.reader(io.StringIO(read_spreadsheet_text(manifest), newline=""))
    return sum(1 for row in rows if any(cell.strip() for cell in row)) > 1


def cases_near(tree: FolderTree) -> list[Case]:
    """The cases of every ``manifest.csv`` in a folder's walk
    (:func:`rcmseg.io.mosaics.walk_folder`), or of ``FOLDER/../manifest.csv`` when the tree
    holds none (so that a command on ``DATA/mosaics`` finds ``DATA/manifest.csv``). Manifests
    that list no mosaic are passed over.

    Raises:
        InputError: a manifest that cannot be read (see :func:`read_manifest`).
    """
    found = [path for path in tree.files if path.name == MANIFEST_NAME]
    manifests = found or [tree.folder.parent / MANIFEST_NAME]
    return [
        case
        for manifest in manifests
        if manifest.is_file() and has_rows(manifest)
        for case in read_manifest(manifest)
    ]


def write_manifest(root: str | Path, cases: list[Case]) -> Path:
    """Write ``ROOT/manifest.csv`` atomically: paths relative to ROOT when inside it, else
    absolute."""
    root = Path(root)
    inside = root.resolve()

    def shown(path: Path | None) -> str:
        if path is None:
            return ""
        resolved = Path(path).resolve()
        return (
            resolved.relative_to(inside).as_posix()
            if resolved.is_relative_to(inside)
            else str(resolved)
        )

    with_mpp = any(case.mosaic_mpp for case in cases)  # the column only where it says something
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*MANIFEST_COLUMNS, *([MPP_COLUMN] if with_mpp else [])])
    for case in cases:
        row = [shown(case.mosaic), shown(case.labels), case.patient, case.lesion, case.clinic]
        writer.writerow([*row, *([case.mosaic_mpp or ""] if with_mpp else [])])
    return write_text_atomic(manifest_path(root), buffer.getvalue())


def declared_mpps(cases: list[Case]) -> dict[Path, float]:
    """The manifest's pixel sizes (``mosaic_mpp``, µm/px) by resolved mosaic path, for the
    mosaics that have one."""
    return {case.mosaic.resolve(): case.mosaic_mpp for case in cases if case.mosaic_mpp}


def pixel_size_note(cases: list[Case]) -> str | None:
    """A one-line note when mosaics carry no pixel size and the manifest gives none (they are
    taken at 0.5 µm/px, which sets the scale the network sees); None when every size is known.
    Reads file headers only."""
    unknown = []
    for case in cases:
        if case.mosaic_mpp is None:
            try:
                if probe_mosaic(case.mosaic).mpp_source == "fallback":
                    unknown.append(case.mosaic.name)
            except InputError:  # reading it will say why
                continue
    if not unknown:
        return None
    return (
        f"{len(unknown)} mosaic(s) carry no pixel size ({', '.join(unknown[:3])}"
        f"{', …' if len(unknown) > 3 else ''}); {MOSAIC_MPP} µm/px assumed: give theirs in a "
        f"{MPP_COLUMN} column of the manifest"
    )


def _labels_at(labels: np.ndarray, factor: float, shape: tuple[int, int]) -> np.ndarray:
    """Full-resolution labels at the image's working grid: vote over blocks, then match shape.

    For a non-integer factor the vote runs at the nearest integer factor and the result is
    resampled nearest-neighbour to ``shape``; a missing last row/column is unlabelled.
    """
    coarse = downsample_labels(labels, max(1, round(factor)))
    if coarse.shape == shape:
        return coarse
    if abs(factor - round(factor)) < 1e-6 and all(
        abs(a - b) <= 1 for a, b in zip(coarse.shape, shape, strict=True)
    ):
        # Same grid, one edge row/column more or less (ceil vs floor): crop or pad unlabelled.
        out = np.full(shape, UNLABELLED, dtype=np.uint8)
        h, w = min(shape[0], coarse.shape[0]), min(shape[1], coarse.shape[1])
        out[:h, :w] = coarse[:h, :w]
        return out
    rows = np.minimum((np.arange(shape[0]) + 0.5) * coarse.shape[0] / shape[0], coarse.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * coarse.shape[1] / shape[1], coarse.shape[1] - 1)
    return coarse[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]]


def load_case(
    case: Case, target_mpp: float = WORKING_MPP, remap: dict[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A case's image and labels at ``target_mpp`` (µm/px).

    Returns:
        image float32 (H, W) on the 0-255 scale (area-averaged, from
        :func:`rcmseg.io.mosaics.read_mosaic`) and labels uint8 (H, W) (block vote from
        :func:`rcmseg.io.labels.downsample_labels`; all UNLABELLED when the case has no labels).

    Raises:
        InputError: unreadable files, or a label map whose size differs from the mosaic's size at
            full resolution (the message names the label file and both sizes).
    """
    if case.labels is None:
        image, _info = read_mosaic(case.mosaic, target_mpp, case.fallback_mpp)
        return image, np.full(image.shape, UNLABELLED, dtype=np.uint8)
    info = probe_mosaic(case.mosaic, case.fallback_mpp)
    labels = read_label_map(case.labels, remap=remap)
    if labels.shape != (info.height_px, info.width_px):
        raise InputError(
            case.labels,
            f"label map is {labels.shape[1]}x{labels.shape[0]} px but its mosaic "
            f"{case.mosaic.name} is {info.width_px}x{info.height_px} px (width x height); "
            "they must match at full resolution",
        )
    image, info = read_mosaic(case.mosaic, target_mpp, case.fallback_mpp)
    return image, _labels_at(labels, target_mpp / info.mosaic_mpp, image.shape)
