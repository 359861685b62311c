"""Import QuPath annotations as a data set: label maps on each mosaic's grid plus ``manifest.csv``.

``rcmseg labels import MOSAICS --annotations DIR --out DATASET`` pairs every mosaic under
MOSAICS (the suffixes of :data:`rcmseg.io.mosaics.MOSAIC_SUFFIXES`) with its annotations in DIR,
found by the mosaic's path relative to MOSAICS without its suffix (``sub/a1``), then by its stem
(``a1``), then by its file name (``a1.tif``), each with ``.geojson``/``.json`` (QuPath's
GeoJSON export, rasterised by :mod:`rcmseg.io.geojson`) or ``.png``/``.tif``/``.tiff``/``.ome.tif``
(QuPath's labelled-image export), the labelled image also as ``a1-labels.png`` etc., the name
QuPath's documented "full labeled image" script gives it. With ``format="auto"`` a GeoJSON file
is preferred.

Labelled-image rules:

- Values: single-channel images (grayscale, or palette images read by palette index) hold label
  values: 0..5 in rcmseg's class order and 255 for unlabelled, what the shipped QuPath script
  writes (``backgroundLabel(255)``, ``addLabel(name, index)``); other encodings (QuPath's default
  background 0, say) go through the ``--remap`` table's value entries. RGB images (or
  ``colours="colour"``) are read by colour: exactly a class colour of
  :data:`rcmseg.classes.CLASS_COLOURS`, or white, black or rcmseg's unlabelled grey for unlabelled;
  any other colour is an error naming it.
- Grid: the downsample factor n = mosaic size / image size must be one integer for both axes
  (QuPath writes ``floor(size / n)`` pixels, ceil is accepted too). Mosaic pixel (row, col) takes
  image pixel (row // n, col // n) (nearest neighbour); mosaic pixels past the image's last
  block are unlabelled.

Outputs: ``DATASET/labels/<relative stem>.png`` (stems as ``distinct_stems`` makes them; uint8,
255 = unlabelled, full resolution), ``DATASET/manifest.csv`` (rows of other mosaics kept, rows
of imported mosaics replaced; paths relative to DATASET when inside it, else absolute;
patient/lesion/clinic from a ``manifest.csv`` under or next to MOSAICS, else the mosaic's
stem) and ``DATASET/import_summary.csv`` (this run's mosaics). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from rcmseg.batch.jobs import OUTPUT_IMAGE_ENDINGS
from rcmseg.classes import (
    CLASS_COLOURS,
    CLASS_NAMES,
    NUM_CLASSES,
    UNLABELLED,
    UNLABELLED_COLOUR,
)
from rcmseg.errors import InputError
from rcmseg.io.atomic import atomic_path, is_utf8_name, write_text_atomic
from rcmseg.io.dataset import (
    MANIFEST_NAME,
    Case,
    cases_near,
    has_rows,
    read_manifest,
    write_manifest,
)
from rcmseg.io.geojson import AnnotationSet, RasterCounts, class_table, rasterise, read_annotations
from rcmseg.io.labels import RemapTable, read_label_map
from rcmseg.io.mosaics import (
    MOSAIC_SUFFIXES,
    FolderTree,
    distinct_stems,
    main_tiff_series,
    mosaic_suffix,
    probe_mosaic,
    walk_folder,
)

__all__ = [
    "FORMATS",
    "SUMMARY_NAME",
    "MosaicImport",
    "find_annotations",
    "geojson_label_map",
    "import_labels",
    "read_label_image",
    "upsample_labels",
    "value_counts",
    "write_label_map",
]

FORMATS: tuple[str, ...] = ("auto", "geojson", "image")
GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson", ".json")
LABEL_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".ome.tif", ".ome.tiff")
# QuPath's docs export a labelled image as "<image name>-labels.png".
LABEL_IMAGE_NAMES: tuple[str, ...] = tuple(
    f"{tail}{suffix}" for tail in ("", "-labels") for suffix in LABEL_IMAGE_SUFFIXES
)
UNLABELLED_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (0, 0, 0),
    UNLABELLED_COLOUR,
)
SUMMARY_NAME = "import_summary.csv"
LABELS_FOLDER = "labels"
_UPSAMPLE_ROWS = 256  # label-image rows expanded at a time


# ---------------------------------------------------------------------------------------------
# Label maps from one annotation file


def geojson_label_map(
    path: str | Path, shape: tuple[int, int], names: Mapping[str, int] | None = None
) -> tuple[np.ndarray, AnnotationSet, RasterCounts]:
    """QuPath GeoJSON rasterised on an (H, W) full-resolution grid (rules: rcmseg.io.geojson).

    ``names``: a remap table's class-name entries (lower case -> class index or UNLABELLED).
    Returns the uint8 (H, W) label map, what was read and what painting did.
    """
    annotations = read_annotations(path, class_table(names))
    labels, counts = rasterise(annotations.annotations, shape)
    return labels, annotations, counts


def _colour_keys(colours: np.ndarray) -> np.ndarray:
    colours = colours.astype(np.int64)
    return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def _labels_from_colours(path: Path, rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 colours -> (h, w) labels by exact match to the class table."""
    table = dict.fromkeys(UNLABELLED_COLOURS, UNLABELLED)
    table.update({colour: index for index, colour in enumerate(CLASS_COLOURS)})
    keyed = sorted(zip(_colour_keys(np.array(list(table))).tolist(), table.values(), strict=True))
    known = np.array([key for key, _label in keyed], dtype=np.int64)
    label_of = np.array([label for _key, label in keyed], dtype=np.uint8)
    keys = _colour_keys(rgb[..., :3])
    found = np.unique(keys)
    unknown = found[~np.isin(found, known)]
    if unknown.size:
        shown = ", ".join(f"({k >> 16 & 255}, {k >> 8 & 255}, {k & 255})" for k in unknown[:4])
        classes = ", ".join(f"{n} {c}" for n, c in zip(CLASS_NAMES, CLASS_COLOURS, strict=True))
        raise InputError(
            path,
            f"colour(s) {shown} are not class colours ({classes}; unlabelled: white, black, "
            f"{UNLABELLED_COLOUR}); read the image by index or export with rcmseg's colours",
        )
    return label_of[np.searchsorted(known, keys)]


def _label_image_colours(path: Path) -> np.ndarray | None:
    """(h, w, 3) uint8 colours of a label image: RGB pixels, or palette indices looked up."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    import tifffile

    with tifffile.TiffFile(path) as tif:
        level = main_tiff_series(tif)[1].levels[0]
        data = level.asarray()
        colormap = level.pages[0].colormap
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        return data[..., :3].astype(np.uint8)
    if colormap is None:
        raise InputError(path, "label image has neither colours nor a colour table")
    palette = (np.asarray(colormap).T >> 8).astype(np.uint8)  # (N, 3), 16-bit -> 8-bit
    return palette[np.squeeze(data).astype(np.intp)]


def _is_colour_image(path: Path) -> bool:
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as picture:
            return picture.mode in ("RGB", "RGBA")
    import tifffile

    with tifffile.TiffFile(path) as tif:
        shape = main_tiff_series(tif)[1].levels[0].shape
    return len(shape) == 3 and shape[-1] in (3, 4)


def _grid_factor(path: Path, small: tuple[int, int], shape: tuple[int, int]) -> int:
    """The integer downsample factor from the mosaic grid ``shape`` to a label image ``small``."""
    (h, w), (height, width) = small, shape
    factor = max(1, round(width / w))
    fits = all(
        size // factor == got or -(-size // factor) == got
        for size, got in ((width, w), (height, h))
    )
    if not fits:
        raise InputError(
            path,
            f"label image is {w}x{h} px and its mosaic {width}x{height} px (width x height): "
            f"the downsample factor {width / w:.4g} x {height / h:.4g} is not one integer "
            "(export with .downsample(n), n an integer)",
        )
    return factor


def upsample_labels(small: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of (h, w) labels by ``factor`` onto an (H, W) grid.

    Pixel (r, c) takes ``small[r // factor, c // factor]``; pixels past the image are UNLABELLED.
    Expands a few rows at a time, so memory stays near the (H, W) output.
    """
    out = np.full(shape, UNLABELLED, dtype=np.uint8)
    cols = min(shape[1], small.shape[1] * factor)
    for top in range(0, min(small.shape[0], -(-shape[0] // factor)), _UPSAMPLE_ROWS):
        block = small[top : top + _UPSAMPLE_ROWS]
        expanded = np.repeat(np.repeat(block, factor, axis=0), factor, axis=1)
        rows = slice(top * factor, min(shape[0], (top + len(block)) * factor))
        out[rows, :cols] = expanded[: rows.stop - rows.start, :cols]
    return out


def read_label_image(
    path: str | Path,
    shape: tuple[int, int],
    values: Mapping[int, int] | None = None,
    colours: str = "auto",
) -> np.ndarray:
    """A QuPath labelled-image export on an (H, W) mosaic grid (rules: the module docstring).

    Args:
        values: label value -> class index or UNLABELLED (a remap table's value entries).
        colours: ``auto`` (RGB images by colour, others by index), ``index`` or ``colour``.

    Returns:
        uint8 (H, W) labels, 0..5 or 255.
    """
    path = Path(path)
    if colours not in ("auto", "index", "colour"):
        raise InputError(None, f"colours must be auto, index or colour, not {colours!r}")
    if not path.is_file():
        raise InputError(path, "label image does not exist")
    try:
        by_colour = colours == "colour" or (colours == "auto" and _is_colour_image(path))
        if by_colour:
            small = _labels_from_colours(path, _label_image_colours(path))
        else:
            small = read_label_map(path, remap=dict(values) if values else None)
    except InputError:
        raise
    except Exception as error:  # a corrupt file fails deep inside the reader: say so in one line
        raise InputError(
            path, f"cannot read label image ({type(error).__name__}: {error})"
        ) from None
    return upsample_labels(small, _grid_factor(path, small.shape, shape), shape)


def write_label_map(path: str | Path, labels: np.ndarray) -> Path:
    """Write uint8 (H, W) labels atomically as PNG (``.png``) or Deflate-tiled TIFF (``.tif``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise InputError(path, "label map must be written as .png, .tif or .tiff")
    with atomic_path(path) as partial:
        if suffix == ".png":
            from PIL import Image

            Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).save(partial, "PNG")
        else:
            import tifffile

            tifffile.imwrite(partial, labels, tile=(512, 512), compression="zlib")
    return path


# ---------------------------------------------------------------------------------------------
# Pairing mosaics with annotation files


def _candidates(relative: str) -> list[str]:
    """Base names to look for, most specific first: ``sub/a1``, ``a1``, ``a1.tif``."""
    stem = relative[: -len(mosaic_suffix(relative))]
    name = Path(relative).name
    return list(dict.fromkeys([stem, Path(stem).name, name]))


def find_annotations(
    folder: Path, relative: str, fmt: str = "auto", mosaic: Path | None = None
) -> Path | None:
    """The annotation file of a mosaic (path relative to MOSAICS) in ``folder``, or None.

    ``mosaic``, the mosaic file itself, is never its own annotation (annotations kept in the
    mosaic folder).
    """
    if fmt not in FORMATS:
        raise InputError(None, f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    kinds = {"geojson": [GEOJSON_SUFFIXES], "image": [LABEL_IMAGE_NAMES]}.get(
        fmt, [GEOJSON_SUFFIXES, LABEL_IMAGE_NAMES]
    )
    itself = mosaic.resolve() if mosaic is not None else None
    for suffixes in kinds:
        for base in _candidates(relative):
            for suffix in suffixes:
                path = folder / f"{base}{suffix}"
                if path.is_file() and path.resolve() != itself:
                    return path
    return None


def _find_mosaics(source: Path, tree: FolderTree, folder: Path, dataset: Path) -> list[Path]:
    """Mosaic files under ``source`` (or ``source`` itself; ``tree`` is its walk), sorted.

    Left out: the annotation folder and the data set's label maps where they lie inside
    ``source``, ``rcmseg batch``'s outputs, and, where annotations share the mosaics' folder,
    labelled images paired with a mosaic: ``a.png`` beside ``a.tif`` is ``a.tif``'s annotation
    (the first name of :data:`LABEL_IMAGE_NAMES` that exists), not a mosaic.
    """
    if source.is_file():
        return [source]
    found = tree.mosaics([folder, dataset / LABELS_FOLDER], skip_endings=OUTPUT_IMAGE_ENDINGS)
    # Whatever --format says: a labelled image beside its mosaic is never a mosaic itself.
    relatives = {path: path.relative_to(source).as_posix() for path in found}
    paired = {find_annotations(folder, relatives[path], "image", mosaic=path) for path in found}
    return [
        path
        for path in found
        if not (path in paired and find_annotations(folder, relatives[path], "image") == path)
    ]


def _known_cases(tree: FolderTree, dataset: Path) -> dict[Path, Case]:
    """Cases of the manifests under/next to the mosaics (``tree``: their folder's walk) and of
    the data set, by mosaic path."""
    cases = {case.mosaic.resolve(): case for case in cases_near(tree)}
    return cases | _dataset_cases(dataset)


# ---------------------------------------------------------------------------------------------
# The import


@dataclass
class MosaicImport:
    """The outcome for one mosaic: a row of ``import_summary.csv``.

    ``status``: ``imported``, ``no labels`` (annotations, but no labelled pixel), ``no
    annotations`` or ``failed`` (``error`` is one line). Pixel counts are at full resolution.
    """

    mosaic: str
    annotations: str = ""
    status: str = "no annotations"
    labels: str = ""
    labelled_pct: float = 0.0
    class_px: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASS_NAMES, 0))
    annotations_used: int = 0
    unclassified: int = 0
    ignored_objects: int = 0
    ignored_geometries: int = 0
    overlapping: int = 0
    overlap_px: int = 0
    clipped: int = 0
    error: str = ""

    def row(self) -> dict[str, object]:
        """The CSV row: every field, with one ``px_<class>`` column per class."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "class_px"}
        values["labelled_pct"] = round(self.labelled_pct, 3)
        pixels = {f"px_{name}": count for name, count in self.class_px.items()}
        columns = list(values)
        at = columns.index("labelled_pct") + 1
        ordered = columns[:at] + list(pixels) + columns[at:]
        return {key: (values | pixels)[key] for key in ordered}


def _label_map_of(
    annotation: Path, shape: tuple[int, int], remap: RemapTable, colours: str, result: MosaicImport
) -> np.ndarray:
    if annotation.suffix.lower() in GEOJSON_SUFFIXES:
        labels, found, counts = geojson_label_map(annotation, shape, remap.names)
        result.annotations_used = len(found.annotations)
        result.unclassified = found.unclassified
        result.ignored_objects = found.ignored_objects
        result.ignored_geometries = found.ignored_geometries
        result.overlapping, result.overlap_px = counts.overlapping, counts.overlap_px
        result.clipped = counts.clipped
        return labels
    return read_label_image(annotation, shape, remap.values, colours)


def value_counts(labels: np.ndarray, rows: int = 512) -> np.ndarray:
    """Pixels per value 0..255 of uint8 labels, (256,) int64, counted in bands of ``rows``
    (``bincount`` widens to int64: whole 12000² maps would need 1.1 GB)."""
    counts = np.zeros(256, dtype=np.int64)
    for top in range(0, labels.shape[0], rows):
        counts += np.bincount(labels[top : top + rows].ravel(), minlength=256)
    return counts


def _import_one(
    mosaic: Path, relative: str, annotation: Path, target: Path, remap: RemapTable, colours: str
) -> MosaicImport:
    result = MosaicImport(relative, annotations=str(annotation))
    for path in (mosaic, annotation):
        if not is_utf8_name(path):  # a manifest in UTF-8 could not name it
            raise InputError(path, "file name is not UTF-8 (a Latin-1 name?); rename it")
    info = probe_mosaic(mosaic)
    labels = _label_map_of(annotation, (info.height_px, info.width_px), remap, colours, result)
    counts = value_counts(labels)
    result.class_px = {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}
    labelled = int(counts[:NUM_CLASSES].sum())
    result.labelled_pct = 100.0 * labelled / max(1, labels.size)
    if labelled == 0:
        result.status = "no labels"
        return result
    write_label_map(target, labels)
    result.status, result.labels = "imported", str(target)
    return result


def _relative_names(source: Path, mosaics: list[Path]) -> list[str]:
    root = source if source.is_dir() else source.parent
    return [path.relative_to(root).as_posix() for path in mosaics]


def _summary_text(results: list[MosaicImport]) -> str:
    buffer = io.StringIO()
    columns = list(MosaicImport("").row())
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.row() for result in results)
    return buffer.getvalue()


def _dataset_cases(dataset: Path) -> dict[Path, Case]:
    """The data set's own manifest rows, in file order, by resolved mosaic path."""
    manifest = dataset / MANIFEST_NAME
    if not (manifest.is_file() and has_rows(manifest)):
        return {}
    return {case.mosaic.resolve(): case for case in read_manifest(manifest)}


def _updated_cases(
    dataset: Path, known: dict[Path, Case], mosaics: list[Path], results: list[MosaicImport]
) -> list[Case]:
    """The data set's rows with this run's mosaics added or replaced.

    Imported mosaics replace their row; mosaics without labels are added without a label map
    unless the data set already lists them; failed mosaics leave the data set as it was.
    """
    cases = _dataset_cases(dataset)
    for mosaic, result in zip(mosaics, results, strict=True):
        key = mosaic.resolve()
        if result.status == "failed" or (result.status != "imported" and key in cases):
            continue
        stem = mosaic.name[: -len(mosaic_suffix(mosaic))]
        base = known.get(key, Case(key, None, stem, stem, ""))
        labels = Path(result.labels) if result.labels else None
        cases[key] = replace(base, mosaic=key, labels=labels)
    return list(cases.values())


def import_labels(
    mosaics: str | Path,
    annotations: str | Path,
    dataset: str | Path,
    *,
    fmt: str = "auto",
    remap: RemapTable | None = None,
    colours: str = "auto",
    tree: FolderTree | None = None,
) -> list[MosaicImport]:
    """Import the annotations of every mosaic under ``mosaics`` into the data set ``dataset``.

    A mosaic without annotations is listed (``no annotations``); a bad annotation file fails that
    mosaic only (one-line ``error``). Writes label maps, ``manifest.csv`` and
    ``import_summary.csv`` atomically (see the module docstring). Returns one result per mosaic.
    ``tree`` is the caller's walk of ``mosaics``; it is used when it is the walk of the mosaics'
    folder (of a mosaic file's folder).

    Raises:
        InputError: the mosaic or annotation folder does not exist, or a manifest is unreadable.
    """
    source, folder, dataset = Path(mosaics), Path(annotations), Path(dataset)
    if not folder.is_dir():
        raise InputError(folder, "annotation folder does not exist")
    if not (source.is_file() or source.is_dir()):
        raise InputError(source, "mosaic folder does not exist")
    root = source if source.is_dir() else source.parent
    if tree is None or tree.folder != root:
        tree = walk_folder(root)
    found = _find_mosaics(source, tree, folder, dataset)
    if not found:
        raise InputError(source, f"no mosaics ({', '.join(MOSAIC_SUFFIXES)}) found")
    remap = remap or RemapTable()
    known = _known_cases(tree, dataset)
    relatives = _relative_names(source, found)
    results = []
    for mosaic, relative, stem in zip(found, relatives, distinct_stems(relatives), strict=True):
        annotation = find_annotations(folder, relative, fmt, mosaic=mosaic)
        if annotation is None:
            results.append(MosaicImport(relative))
            continue
        target = dataset / LABELS_FOLDER / f"{stem}.png"
        try:
            results.append(_import_one(mosaic, relative, annotation, target, remap, colours))
        except InputError as error:
            results.append(MosaicImport(relative, str(annotation), "failed", error=str(error)))
    cases = _updated_cases(dataset, known, found, results)
    write_manifest(dataset, cases)
    write_text_atomic(dataset / SUMMARY_NAME, _summary_text(results))
    return results
