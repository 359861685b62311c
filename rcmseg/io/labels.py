"""Expert label maps: reading PNG/TIFF/NIfTI/NRRD, remapping encodings, 4x downsampling.

A label map is uint8 (H, W), values 0..5 (``rcmseg.classes.CLASS_NAMES`` order) or 255
(unlabelled), at the label file's own resolution, pixel-aligned with the mosaic (row 0 = top row).

Axis rule for NIfTI and NRRD (Seg3D, ITK, 3D Slicer): these formats index voxels (i, j, k) with i
along the image's x axis (columns) and j along y (rows), i fastest in memory. A 2-D label map is
therefore ``volume[:, :, 0].T``: voxel (i, j) lands on mosaic row j, column i. The affine or
space directions are ignored: tools that paint on a 2-D mosaic keep its pixel grid and only
record orientation signs (e.g. ITK's LPS-to-RAS flip) in the header, which would otherwise
mirror the map against the mosaic.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcmseg.classes import (
    CLASS_NAMES,
    NUM_CLASSES,
    UNLABELLED,
    invalid_label_values,
    remap_labels,
)
from rcmseg.errors import InputError, os_reason
from rcmseg.io.csvfiles import read_spreadsheet_text, spreadsheet_delimiter
from rcmseg.io.mosaics import main_tiff_series

__all__ = [
    "LABEL_SUFFIXES",
    "RemapTable",
    "downsample_labels",
    "load_remap_table",
    "read_label_map",
    "read_remap",
]

LABEL_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".nhdr",
)
# Fine rows handled at once by downsample_labels: bounds its temporary memory for 12000² maps.
_DOWNSAMPLE_STRIP_ROWS = 512


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        if picture.mode not in ("L", "P", "I", "I;16", "1"):
            raise InputError(
                path,
                f"label PNG has mode {picture.mode}; expected one channel of class indices "
                "(grayscale or palette), not colours",
            )
        # Palette images give their indices, which is what painted label maps store.
        return np.asarray(picture)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = main_tiff_series(tif)[1].levels[0]
        if page.ndim > 2 and page.shape[-1] in (3, 4) and page.dtype == np.uint8:
            raise InputError(
                path, f"label TIFF has {page.shape[-1]} colour channels; expected class indices"
            )
        return page.asarray()


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel

    image = nibabel.load(str(path))
    volume = np.asanyarray(image.dataobj)
    return _voxels_to_rows_cols(path, volume)


def _read_nrrd(path: Path) -> np.ndarray:
    try:
        import nrrd
    except ImportError:
        raise InputError(
            path, "reading NRRD label maps needs the package pynrrd: pip install pynrrd"
        ) from None
    volume, _header = nrrd.read(str(path), index_order="F")
    return _voxels_to_rows_cols(path, volume)


def _voxels_to_rows_cols(path: Path, volume: np.ndarray) -> np.ndarray:
    """(i=x, j=y[, k]) voxels to (rows, cols); see the module docstring for the rule."""
    if volume.ndim == 3:
        if volume.shape[2] != 1:
            raise InputError(
                path, f"label volume has {volume.shape[2]} slices; expected a 2-D label map"
            )
        volume = volume[:, :, 0]
    if volume.ndim != 2:
        raise InputError(path, f"label volume has shape {volume.shape}; expected a 2-D label map")
    return np.ascontiguousarray(volume.T)


_READERS = {
    ".png": _read_png,
    ".tif": _read_tiff,
    ".tiff": _read_tiff,
    ".nii": _read_nifti,
    ".nii.gz": _read_nifti,
    ".nrrd": _read_nrrd,
    ".nhdr": _read_nrrd,
}


def _as_uint8_labels(path: Path, raw: np.ndarray) -> np.ndarray:
    """Integer-valued 0..255 data as uint8, else InputError."""
    raw = np.squeeze(raw)
    if raw.ndim != 2:
        raise InputError(path, f"label map has shape {raw.shape}; expected one 2-D channel")
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype == np.bool_:
        return raw.astype(np.uint8)
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise InputError(
            path, f"label values range {raw.min()}..{raw.max()}; expected integers 0..255"
        )
    if not np.issubdtype(raw.dtype, np.integer) and not np.array_equal(raw, np.round(raw)):
        raise InputError(path, f"label map holds non-integer values (dtype {raw.dtype})")
    return raw.astype(np.uint8)


def read_label_map(path: str | Path, remap: dict[int, int] | None = None) -> np.ndarray:
    """Read a label map as uint8 (H, W) with values 0..5 or UNLABELLED (255).

    Args:
        path: PNG, TIFF, NIfTI (``.nii``/``.nii.gz``) or NRRD (``.nrrd``/``.nhdr``, needs pynrrd).
        remap: source value -> canonical class index or UNLABELLED, for other encodings (see
            :func:`load_remap_table`); values not in the table pass through unchanged.

    Raises:
        InputError: unreadable file, unknown format, more than one channel, or values that are
            neither a class index nor 255 after remapping.
    """
    path = Path(path)
    reader = _READERS.get(_suffix(path))
    if reader is None:
        raise InputError(
            path, f"unknown label map format; expected one of {', '.join(LABEL_SUFFIXES)}"
        )
    if not path.is_file():
        raise InputError(path, "label map file does not exist")
    try:
        raw = reader(path)
    except InputError:
        raise
    except Exception as error:  # a corrupt file fails deep inside the reader: say so in one line
        raise InputError(path, f"cannot read label map ({type(error).__name__}: {error})") from None
    labels = _as_uint8_labels(path, raw)
    if remap:
        labels = remap_labels(labels, remap)
    invalid = invalid_label_values(labels)
    if invalid:
        shown = ", ".join(str(v) for v in invalid[:8]) + (" ..." if len(invalid) > 8 else "")
        raise InputError(
            path,
            f"label values {shown} are not class indices 0..{NUM_CLASSES - 1} or "
            f"{UNLABELLED} (unlabelled); pass a remapping table",
        )
    return labels


def _parse_target(source: str, value: object, table_path: Path) -> int:
    """A remap target: an index, a class name, or 'unlabelled'."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        target = int(value)
    else:
        text = str(value).strip().lower()
        if text in CLASS_NAMES:
            target = CLASS_NAMES.index(text)
        elif text in ("unlabelled", "unlabeled", "ignore"):
            target = UNLABELLED
        elif text.lstrip("-").isdigit():
            target = int(text)
        else:
            raise InputError(table_path, f"remap target {value!r} for {source!r} is unknown")
    if not (0 <= target < NUM_CLASSES or target == UNLABELLED):
        raise InputError(
            table_path, f"remap target {target} for {source!r} is not a class index or 255"
        )
    return target


def _is_value_source(source: object) -> bool:
    """A table key that names a label value (an integer), not a class name."""
    return str(source).strip().isdigit()


def _parse_source(source: object, table_path: Path) -> int:
    text = str(source).strip()
    if int(text) > 255:
        raise InputError(table_path, f"remap source {source!r} is not an integer 0..255")
    return int(text)


def _parse_name(source: object, table_path: Path) -> str:
    name = " ".join(str(source).split()).lower()
    if not name or name.lstrip("-").isdigit():
        raise InputError(table_path, f"remap source {source!r} is not an integer 0..255 or a name")
    return name


@dataclass(frozen=True)
class RemapTable:
    """A remapping table: label values and annotation class names to rcmseg's classes.

    ``values``: source label value (0..255) -> class index or UNLABELLED, for label maps.
    ``names``: source class name (lower case, inner blanks collapsed) -> class index or
    UNLABELLED, for annotation class names (QuPath GeoJSON).
    """

    values: dict[int, int] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)


def _remap_pairs(path: Path) -> list[tuple[object, object]]:
    """(source, target) pairs of a JSON or CSV remapping table, unparsed."""
    try:
        text = read_spreadsheet_text(path)
    except OSError as error:
        raise InputError(path, f"cannot read remapping table ({os_reason(error)})") from None
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(path, f"remapping table is not valid JSON ({error.msg})") from None
        if not isinstance(entries, dict):
            raise InputError(path, "remapping table must be a JSON object {source: target}")
        pairs: list[tuple[object, object]] = list(entries.items())
    elif path.suffix.lower() == ".csv":
        lines = [line for line in text.splitlines() if line.strip()]
        delimiter = spreadsheet_delimiter(lines[0] if lines else "", lambda row: len(row) == 2)
        rows = [row for row in csv.reader(lines, delimiter=delimiter) if "".join(row).strip()]
        if rows and rows[0][0].strip().lower() == "source":
            rows = rows[1:]
        if any(len(row) != 2 for row in rows):
            raise InputError(path, "remapping table rows must be 'source,target' (or ';')")
        pairs = [(row[0], row[1]) for row in rows]
    else:
        raise InputError(path, "remapping table must be a .json or .csv file")
    if not pairs:
        raise InputError(path, "remapping table is empty")
    return pairs


def read_remap(path: str | Path) -> RemapTable:
    """Read a remapping table (JSON or CSV): the one parser for ``--remap`` everywhere.

    JSON: an object ``{source: target}``. CSV: rows ``source,target`` (or ``;``; a header row
    ``source,target`` is allowed). A source is a label value 0..255 (for label maps) or a class
    name (for annotations, matched case-insensitively, e.g. ``"Tumour nests"``). A target is a
    class index, a class name from ``CLASS_NAMES``, or ``unlabelled`` (= 255). Example for an
    encoding with 7 = unlabelled and a lab's own QuPath class names::

        {"0": "ring", "1": "nested", "2": "meshwork", "3": "aspecific",
         "4": "background", "5": "artifact", "7": "unlabelled",
         "Junctional nests": "nested", "Unsure": "unlabelled"}
    """
    path = Path(path)
    table = RemapTable()
    for source, target in _remap_pairs(path):
        value = _parse_target(str(source), target, path)
        if _is_value_source(source):
            table.values[_parse_source(source, path)] = value
        else:
            table.names[_parse_name(source, path)] = value
    return table


def load_remap_table(path: str | Path) -> dict[int, int]:
    """The label-value part of :func:`read_remap` (what label maps are remapped with).

    Class-name entries, which only annotations use, are read (and checked) but not returned; a
    table with class names only is refused, as it cannot remap a label map.
    """
    table = read_remap(path)
    if not table.values:
        example = next(iter(table.names))
        raise InputError(
            path,
            f"remap source {example!r} is not an integer 0..255; class-name sources only remap "
            "annotations (rcmseg labels)",
        )
    return table.values


# Value code per label byte: classes keep their index, UNLABELLED -> NUM_CLASSES, rest -> ignored.
_CODES = NUM_CLASSES + 2
_CODE_LUT = np.full(256, NUM_CLASSES + 1, dtype=np.int64)
_CODE_LUT[:NUM_CLASSES] = np.arange(NUM_CLASSES)
_CODE_LUT[UNLABELLED] = NUM_CLASSES


def _downsample_strip(strip: np.ndarray, factor: int) -> np.ndarray:
    """Vote within the (factor x factor) blocks of a strip whose height is a multiple of factor
    (or the last strip); partial blocks count only the pixels they have."""
    rows_out = -(-strip.shape[0] // factor)
    cols_out = -(-strip.shape[1] // factor)
    block_of_row = (np.arange(strip.shape[0]) // factor) * cols_out
    block_of_col = np.arange(strip.shape[1]) // factor
    # One bincount over (block, value code) pairs counts every value in every block in one pass.
    keys = (block_of_row[:, None] + block_of_col[None, :]) * _CODES + _CODE_LUT[strip]
    counts = np.bincount(keys.ravel(), minlength=rows_out * cols_out * _CODES)
    counts = counts.reshape(rows_out, cols_out, _CODES)
    class_counts, unlabelled_count = counts[..., :NUM_CLASSES], counts[..., NUM_CLASSES]
    # argmax takes the first maximum: ties between classes go to the lower class index.
    result = np.argmax(class_counts, axis=-1).astype(np.uint8)
    result[unlabelled_count > class_counts.sum(axis=-1)] = UNLABELLED
    return result


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a label map by an integer factor with a vote that keeps "unlabelled" honest.

    Each output pixel covers a (factor x factor) block of fine pixels (partial blocks at the
    bottom and right edges count the pixels they have; output size ``ceil(H / factor)`` x
    ``ceil(W / factor)``). It is UNLABELLED where unlabelled fine pixels outnumber labelled ones,
    otherwise the most frequent class among the labelled fine pixels (ties: lower class index).

    Works in strips of fine rows, so temporary memory stays small even for 12000² maps.

    Args:
        labels: uint8 (H, W), values 0..5 or 255.
        factor: integer downsampling factor (4 for 0.5 -> 2 µm/px).
    """
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    labels = np.asarray(labels)
    if factor == 1:
        return labels.astype(np.uint8, copy=True)
    height, width = labels.shape
    out = np.empty((-(-height // factor), -(-width // factor)), dtype=np.uint8)
    strip_rows = max(factor, _DOWNSAMPLE_STRIP_ROWS // factor * factor)
    for top in range(0, height, strip_rows):
        coarse = _downsample_strip(labels[top : top + strip_rows], factor)
        out[top // factor : top // factor + coarse.shape[0]] = coarse
    return out
