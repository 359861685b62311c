"""Open RCM mosaics of every format users have and read them at the working resolution.

Formats: TIFF/SVS (pyramidal or not, tiled or strips; pixels through tifffile, pixel size through
tiffslide's metadata parsers), BMP/PNG/JPEG (Pillow, with no decompression-bomb limit: VivaScope
writes 12000² BMPs) and NIfTI (nibabel).

Conventions kept here:

- Axis order. Images are (H, W) = (rows, columns). NIfTI arrays are indexed (x, y[, z]) with
  x = columns and y = rows, so the first two axes are transposed and no affine flip is applied;
  :mod:`rcmseg.io.labels` reads label maps by the same rule, so mosaic and labels line up.
- Pixel size. Taken from the file where present (OME-XML ``PhysicalSizeX/Y`` with their units,
  TIFF resolution tags with their unit, Aperio and other scanners' metadata via tiffslide,
  BMP/PNG/JPEG dpi, NIfTI zooms in their unit, mm when unset); a value outside
  :data:`PLAUSIBLE_MPP_RANGE` (e.g. a 72 or 96 dpi default written by a paint program) is treated
  as absent, and ``fallback_mpp`` is used instead (``mpp_source="fallback"``).
- Intensity. Output is float32 on the 0-255 scale. RGB(A) becomes luminance
  Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as Pillow's "L"). 8-bit data is kept as it is;
  wider integers are divided by their effective bit depth, ``2**bits - 1`` with ``bits`` the
  fewest bits (at least 8) that hold the largest value, so 8-bit data stored in 16 bits stays
  unchanged and 12-bit or 16-bit data fills 0-255; signed integers with negative values and floats
  outside [0, 255] are stretched min-max to 0-255; floats within [0, 1] are multiplied by 255 and
  floats within [0, 255] are kept. Non-finite values count as 0.
- Resampling (:func:`read_mosaic`). The output has ``floor(size * mosaic_mpp / target_mpp)``
  pixels per side. When the ratio ``target_mpp / mosaic_mpp`` is an integer n (within 1 %), each
  output pixel is the mean of an n×n block (trailing rows/columns that do not fill a block are
  dropped). Otherwise blocks of ``floor(ratio)`` are averaged first and the result is resampled to
  the output size with torch's ``interpolate(mode="area")`` (adaptive average pooling). A ratio
  below 1 (mosaic coarser than the target) is upsampled bilinearly.
- Memory. Pixels are read in bands of rows (whole strips or tiles), so a 12000×12000 8-bit TIFF
  or BMP is never held at full resolution; PNG/JPEG, gzipped NIfTI and TIFFs stored as a few huge
  compressed strips can only be decoded whole, and are held once at their stored type.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcmseg.classes import MOSAIC_MPP, WORKING_MPP
from rcmseg.errors import InputError, os_reason

MOSAIC_SUFFIXES: tuple[str, ...] = (
    ".tif",
    ".tiff",
    ".svs",
    ".bmp",
    ".png",
    ".jpg",
    ".jpeg",
    ".nii",
    ".nii.gz",
)
# µm/px a file may plausibly claim for a microscopy mosaic; other values are defaults of the writer.
PLAUSIBLE_MPP_RANGE: tuple[float, float] = (0.05, 20.0)
LUMINANCE_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
BAND_ROWS: int = 256  # full-resolution rows read at a time, before rounding to strips and blocks
_INTEGER_RATIO_TOLERANCE = 0.01
_WHOLE_DECODE_BYTES = 64 * 2**20  # a chunk bigger than this is decoded once, not per band

_TIFF_SUFFIXES = (".tif", ".tiff", ".svs")
_PILLOW_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_FORMAT_NAMES = {
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".svs": "SVS",
    ".bmp": "BMP",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
}


@dataclass(frozen=True)
class MosaicInfo:
    """What a mosaic file holds, read from its header.

    ``width_px``/``height_px`` are at full resolution, ``mosaic_mpp`` in µm/px, ``mpp_source`` is
    ``"file"`` or ``"fallback"``, ``dtype`` the stored sample type (e.g. ``"uint8"``).
    """

    path: Path
    width_px: int
    height_px: int
    mosaic_mpp: float
    mpp_source: str
    dtype: str

    def working_shape(self, target_mpp: float = WORKING_MPP) -> tuple[int, int]:
        """(H', W') that :func:`read_mosaic` returns at ``target_mpp``."""
        ratio = target_mpp / self.mosaic_mpp
        return _output_size(self.height_px, ratio), _output_size(self.width_px, ratio)

    @property
    def area_mm2(self) -> float:
        """Area of the whole mosaic in mm²."""
        return self.width_px * self.height_px * (self.mosaic_mpp * 1e-3) ** 2


def pixel_size(value: object) -> float | None:
    """``value`` as a pixel size in µm/px if it is one (a finite number above 0), else None: a
    word (a bundle's command line, a manifest cell), 0, a negative number, NaN or infinity."""
    try:
        size = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return size if 0 < size < math.inf else None


def check_fallback_mpp(mpp: float) -> float:
    """``mpp`` (``--mpp``: µm/px of mosaics whose file carries none) if it is a pixel size,
    above 0 µm and finite; else a one-line error."""
    size = pixel_size(mpp)
    if size is None:
        raise InputError(None, f"--mpp {mpp}: a pixel size must be above 0 µm")
    return size


def mosaic_suffix(path: str | Path) -> str:
    """The file ending that decides the reader, lower case (``".nii.gz"`` counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def distinct_stems(relatives: list[str]) -> list[str]:
    """Output stems for mosaic paths (``sub/a.tif`` → ``sub/a``), one per path, in order.

    Two mosaics that differ only by ending (``a.tif``, ``a.png``, and on a case-sensitive file
    system ``a.TIF``) keep it, as written, in their stems (``a_tif``, ``a_png``, ``a_TIF``), so
    that neither's outputs overwrite the other's.
    """
    stems = [relative[: -len(mosaic_suffix(relative))] for relative in relatives]
    return [
        stem + relative[len(stem) :].replace(".", "_") if stems.count(stem) > 1 else stem
        for relative, stem in zip(relatives, stems, strict=True)
    ]


def is_mosaic_file(path: Path) -> bool:
    """A visible file whose ending is one of :data:`MOSAIC_SUFFIXES`, or a broken link with such
    a name (a mosaic on an unmounted drive: it must fail in the report, not go unnoticed)."""
    broken_link = path.is_symlink() and not path.exists()
    visible = (path.is_file() or broken_link) and not path.name.startswith(".")
    return visible and mosaic_suffix(path) in MOSAIC_SUFFIXES


def check_mosaic_source(source: Path) -> None:
    """Refuse a batch's input that is neither a folder nor a mosaic file, in one line.

    Raises:
        InputError: ``source`` does not exist or is a file of another type.
    """
    if not (source.is_file() or source.is_dir()):
        raise InputError(source, "no such mosaic file or folder")
    if source.is_file() and not is_mosaic_file(source):
        raise InputError(source, f"not a mosaic file (endings: {' '.join(MOSAIC_SUFFIXES)})")


# Folders an operating system keeps on a drive for itself, never a lab's mosaics: Windows's recycle
# bin (deleted mosaics, and `$I…` records named like them) and restore points on an NTFS or exFAT
# drive, and ext4's `lost+found` (fragments recovered by fsck).
SYSTEM_FOLDERS = frozenset({"$recycle.bin", "recycler", "system volume information", "lost+found"})


@dataclass(frozen=True)
class FolderTree:
    """What one walk of a folder found (:func:`walk_folder`): every command that searches a
    folder for mosaics and manifests, and says what it could not search, reads one walk.

    Attributes:
        folder: the folder walked.
        files: files (and links to files or to nothing), sorted by path as reached from the
            folder.
        unreadable: folders the walk could not list, each with the reason, e.g.
            ``(IN/patient03, "Permission denied")``.
    """

    folder: Path
    files: list[Path]
    unreadable: list[tuple[Path, str]]

    def mosaics(
        self, skip_folders: Iterable[Path] = (), skip_endings: Iterable[str] = ()
    ) -> list[Path]:
        """The mosaic files among :attr:`files` (:func:`is_mosaic_file`), sorted by path.

        Files inside a ``skip_folders`` entry that lies strictly below the folder (an output or
        annotation folder kept among the mosaics) are left out. A skip folder that is the folder
        itself or holds it is where the mosaics live, so only files whose names end with one of
        ``skip_endings`` (case-insensitive; e.g. ``rcmseg batch``'s own outputs) are left out
        there, as they are everywhere.
        """
        root = self.folder.resolve()
        below = [
            skipped.resolve()
            for skipped in skip_folders
            if skipped.resolve() != root and skipped.resolve().is_relative_to(root)
        ]
        endings = tuple(ending.lower() for ending in skip_endings)
        return [
            path
            for path in self.files
            if is_mosaic_file(path)
            and not path.name.lower().endswith(endings)
            and not any(path.resolve().is_relative_to(skipped) for skipped in below)
        ]

    def unsearched_note(self) -> str | None:
        """One line naming what under the folder could not be searched for mosaics; None when
        all of it could.

        Two things are named: links that lead nowhere and whose name is not a mosaic's (a
        linked folder on a share that is not mounted; a broken link named like a mosaic fails
        in a batch's report instead), and folders that cannot be listed (permissions).
        """
        broken = [
            path
            for path in self.files
            if path.is_symlink()
            and not path.exists()
            and not path.name.startswith(".")
            and mosaic_suffix(path) not in MOSAIC_SUFFIXES
        ]
        problems = []
        if broken:
            problems.append(
                f"{len(broken)} link(s) lead nowhere, e.g. {broken[0]} → {os.readlink(broken[0])} "
                "(is the drive mounted?)"
            )
        if self.unreadable:
            path, reason = self.unreadable[0]
            problems.append(
                f"{len(self.unreadable)} folder(s) cannot be read, e.g. {path} ({reason})"
            )
        if not problems:
            return None
        return f"under {self.folder}, {'; '.join(problems)}; mosaics there are not searched"


def walk_folder(folder: Path) -> FolderTree:
    """Walk ``folder`` recursively, as the commands that search it for mosaics do; a path that is
    not a folder gives an empty tree.

    Linked folders are followed (a lab links each patient's folder from a share into one tree;
    ``Path.rglob`` before Python 3.13 passes over them without a word), each real folder once, so
    a link loop ends. Hidden folders (``.Trash-1000``, ``.ipynb_checkpoints``, the label app's
    ``.rcmseg``) and :data:`SYSTEM_FOLDERS` are left out, as hidden files are by the callers. A
    folder reached twice is listed under the first path in sorted order. Folders that cannot be
    listed (permissions, a share gone mid-walk) are returned, not raised, so that one locked
    folder does not hide the rest.
    """
    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return FolderTree(folder, found, unreadable)
    seen: set[str] = set()

    def note_unreadable(error: OSError) -> None:
        unreadable.append((Path(error.filename), os_reason(error)))

    for top, folders, files in os.walk(folder, onerror=note_unreadable, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if searched_folder(name))
        found += [Path(top, name) for name in files]
    return FolderTree(folder, sorted(found), sorted(unreadable))


def searched_folder(name: str) -> bool:
    """Whether a folder of this name may hold a lab's mosaics (not hidden, not the system's)."""
    return not name.startswith(".") and name.lower() not in SYSTEM_FOLDERS


def probe_mosaic(path: str | Path, fallback_mpp: float = MOSAIC_MPP) -> MosaicInfo:
    """Size, pixel size and sample type of a mosaic, from its header only (no pixel decoding)."""
    with _open_source(Path(path)) as source:
        return source.info(fallback_mpp)


def read_mosaic(
    path: str | Path, target_mpp: float = WORKING_MPP, fallback_mpp: float = MOSAIC_MPP
) -> tuple[np.ndarray, MosaicInfo]:
    """Read a mosaic as float32 (H', W') on the 0-255 scale, area-averaged to ``target_mpp`` µm/px.

    Raises :class:`InputError` for a missing, corrupt, truncated or unsupported file, and for a
    mosaic smaller than one output pixel. See the module docstring for the resampling and
    intensity rules.
    """
    path = Path(path)
    with _open_source(path) as source:
        info = source.info(fallback_mpp)
        ratio = target_mpp / info.mosaic_mpp
        out_h, out_w = info.working_shape(target_mpp)
        if out_h < 1 or out_w < 1:
            raise InputError(
                path,
                f"mosaic of {info.width_px}×{info.height_px} px at {info.mosaic_mpp:g} µm/px is "
                f"smaller than one {target_mpp:g} µm pixel",
            )
        block = _block_factor(ratio)
        with _library_errors(path, "cannot decode pixel data"):
            scale, offset = _intensity_rule(source)
            image = _block_mean(source, block)
    image *= np.float32(scale)
    image += np.float32(offset)
    if image.shape != (out_h, out_w):
        image = _resample(image, (out_h, out_w), upsample=ratio < 1)
    return np.clip(image, 0.0, 255.0, out=image), info


# ---------------------------------------------------------------------------------------------
# Resampling and intensity


def _output_size(size_px: int, ratio: float) -> int:
    # A small epsilon keeps exact ratios (12000 * 0.5 / 2) from losing a pixel to rounding.
    return math.floor(size_px / ratio + 1e-6)


def _block_factor(ratio: float) -> int:
    """The integer block size averaged while streaming: the ratio itself or its floor."""
    nearest = round(ratio)
    if nearest >= 1 and abs(ratio - nearest) <= _INTEGER_RATIO_TOLERANCE * ratio:
        return int(nearest)
    return max(1, math.floor(ratio))


def _block_mean(source: _Source, block: int) -> np.ndarray:
    """Mean over ``block``×``block`` blocks of the luminance, streamed in bands of rows."""
    height, width = source.shape
    out_h, out_w = height // block, width // block
    out = np.empty((out_h, out_w), dtype=np.float32)
    band = block * math.ceil(max(source.chunk_rows, BAND_ROWS) / block)
    for y0 in range(0, out_h * block, band):
        y1 = min(y0 + band, out_h * block)
        rows = _luminance(source.read_rows(y0, y1))[:, : out_w * block]
        blocks = rows.reshape((y1 - y0) // block, block, out_w, block)
        out[y0 // block : y1 // block] = blocks.mean(axis=(1, 3), dtype=np.float32)
    return out


def _resample(image: np.ndarray, size: tuple[int, int], upsample: bool) -> np.ndarray:
    import torch  # here, not at the top: the commands check their inputs before torch loads
    import torch.nn.functional as F

    tensor = torch.from_numpy(image)[None, None]
    if upsample:
        resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    else:
        resized = F.interpolate(tensor, size=size, mode="area")
    return resized[0, 0].numpy()


def _luminance(samples: np.ndarray) -> np.ndarray:
    """(rows, W) or (rows, W, S) samples → float32 (rows, W); RGB(A) → BT.601 luminance."""
    if samples.dtype.kind == "f":
        samples = np.where(np.isfinite(samples), samples, 0)
    if samples.ndim == 2:
        return samples.astype(np.float32, copy=False)
    if samples.shape[-1] < 3:  # grey + alpha
        return samples[..., 0].astype(np.float32)
    weights = np.asarray(LUMINANCE_WEIGHTS, dtype=np.float32)
    return samples[..., :3].astype(np.float32) @ weights


def _intensity_rule(source: _Source) -> tuple[float, float]:
    """(scale, offset) with ``value * scale + offset`` on the 0-255 scale (module docstring)."""
    dtype = source.dtype
    if dtype == np.uint8:
        return 1.0, 0.0
    if dtype == np.bool_:
        return 255.0, 0.0
    low, high = _value_range(source)
    if dtype.kind in "ui" and low >= 0:
        bits = max(8, math.ceil(math.log2(high + 1))) if high > 0 else 8
        return 255.0 / (2**bits - 1), 0.0
    if dtype.kind == "f" and low >= 0 and high <= 1:
        return 255.0, 0.0
    if dtype.kind == "f" and low >= 0 and high <= 255:
        return 1.0, 0.0
    if high <= low:
        return 0.0, 0.0
    return 255.0 / (high - low), -255.0 * low / (high - low)


def _value_range(source: _Source) -> tuple[float, float]:
    """Smallest and largest finite sample value, by one streamed pass."""
    low, high = math.inf, -math.inf
    height = source.shape[0]
    band = max(source.chunk_rows, BAND_ROWS)
    for y0 in range(0, height, band):
        rows = source.read_rows(y0, min(y0 + band, height))
        finite = rows[np.isfinite(rows)] if rows.dtype.kind == "f" else rows
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (0.0, 0.0) if low > high else (low, high)


# ---------------------------------------------------------------------------------------------
# Sources: one per reader, each giving header facts and bands of full-resolution rows


class _Source:
    """A mosaic opened for reading: ``shape`` (H, W), sample ``dtype``, ``file_mpp`` or None."""

    path: Path
    shape: tuple[int, int]
    dtype: np.dtype
    file_mpp: float | None = None
    chunk_rows: int = 1  # rows decoded together; bands are multiples of it where possible

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0..y1 (full resolution) as (rows, W) or (rows, W, samples)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""

    def info(self, fallback_mpp: float) -> MosaicInfo:
        mpp = _plausible_mpp(self.file_mpp)
        return MosaicInfo(
            path=self.path,
            width_px=int(self.shape[1]),
            height_px=int(self.shape[0]),
            mosaic_mpp=float(mpp if mpp is not None else fallback_mpp),
            mpp_source="file" if mpp is not None else "fallback",
            dtype=str(self.dtype),
        )


def _plausible_mpp(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    low, high = PLAUSIBLE_MPP_RANGE
    # Six significant digits: NIfTI zooms are float32 (0.0005 mm → 0.50000002 µm).
    return float(f"{mpp:.6g}") if low <= mpp <= high else None


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[_Source]:
    if path.is_symlink() and not path.exists():
        raise InputError(path, f"broken link: its target {os.readlink(path)} does not exist")
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not a mosaic file")
    if path.stat().st_size == 0:  # e.g. a copy that never finished
        raise InputError(path, "empty file (0 bytes)")
    suffix = mosaic_suffix(path)
    if suffix in _TIFF_SUFFIXES:
        opener = _TiffSource
    elif suffix in _PILLOW_SUFFIXES:
        opener = _PillowSource
    elif suffix in _NIFTI_SUFFIXES:
        opener = _NiftiSource
    else:
        expected = ", ".join(MOSAIC_SUFFIXES)
        raise InputError(path, f"unsupported file type '{suffix}' (expected one of {expected})")
    with _library_errors(path, f"cannot read as {_FORMAT_NAMES[suffix]}"):
        source = opener(path)
    try:
        _check_sample_type(source)
        yield source
    finally:
        source.close()


def _check_sample_type(source: _Source) -> None:
    if source.dtype.kind not in "buif":
        raise InputError(
            source.path, f"unsupported sample type {source.dtype} (need integer or real)"
        )
    if source.shape[0] < 1 or source.shape[1] < 1:
        raise InputError(source.path, f"image has no pixels (shape {source.shape})")


@contextlib.contextmanager
def _library_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a reader library's exception into a one-line :class:`InputError`.

    A refusal by the system (permissions, an I/O error of a failing drive, a stale share: an
    ``OSError`` carrying an errno) is named as such; anything else a reader raises means a bad
    file. (Pillow's "truncated" and "cannot identify" errors are ``OSError`` without an errno.)
    """
    try:
        yield
    except (InputError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file to the user
        if isinstance(error, OSError) and error.errno is not None:
            raise InputError(path, f"cannot be read ({os_reason(error)})") from error
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise InputError(
            path, f"{what}: corrupt, truncated or not that type of file ({detail[:200]})"
        ) from error


def _non_planar_axes(axes: str, shape: tuple[int, ...], path: Path) -> None:
    """Reject stacks: only Y, X and a samples/colour axis may be longer than 1."""
    extra = [(a, n) for a, n in zip(axes, shape, strict=True) if a not in "YXSC" and n > 1]
    if extra or ("C" in axes and shape[axes.index("C")] not in (1, 3, 4)):
        raise InputError(
            path,
            f"holds a stack of images (axes {axes}, shape {shape}); expected one 2-D mosaic"
            " (save each plane as its own file, e.g. Fiji's Image > Stacks > Stack to Images)",
        )


def main_tiff_series(tiff) -> tuple[int, object]:
    """Index and series of a TIFF's main image: the largest in pixels (the first of equals), so
    a thumbnail, label or overview image stored ahead of the mosaic is never taken for it."""

    def pixels(indexed: tuple[int, object]) -> int:
        level = indexed[1].levels[0]
        return math.prod(n for axis, n in zip(level.axes, level.shape, strict=True) if axis in "YX")

    return max(enumerate(tiff.series), key=pixels)


class _TiffSource(_Source):
    """TIFF/SVS: level 0 of the main series, memory-mapped when stored raw, else via zarr."""

    _decode_whole = False

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.path = path
        self._tiff = tifffile.TiffFile(path)
        try:
            series_index, series = main_tiff_series(self._tiff)
            level = series.levels[0]
            _non_planar_axes(level.axes, level.shape, path)
            _check_tiff_complete(path, level.pages)
            page = level.pages[0]
            self.dtype = np.dtype(level.dtype)
            self._axes = level.axes.replace("C", "S")
            self.shape = (
                int(level.shape[level.axes.index("Y")]),
                int(level.shape[level.axes.index("X")]),
            )
            self.file_mpp = (
                _ome_mpp(self._tiff, series_index)
                or _imagej_mpp(self._tiff, page)
                or (_tiff_mpp(path, page) if series_index == 0 else _resolution_tag_mpp(page))
            )
            if len(level.pages) == 1 and page.is_memmappable:
                self._array = tifffile.memmap(path, page=page.index, mode="r")
                self._axes = page.axes.replace("C", "S")
                self.chunk_rows = 1
            else:
                self._array = zarr.open(series.aszarr(level=0), mode="r")
                self.chunk_rows = int(page.chunks[0]) if page.chunks else 1
                chunk_bytes = self.chunk_rows * self._array.nbytes // self.shape[0]
                # One or two huge strips: decode once (on first read) at the stored type rather
                # than converting bands as large as the whole image to float32.
                self._decode_whole = (
                    chunk_bytes > _WHOLE_DECODE_BYTES and 2 * self.chunk_rows >= self.shape[0]
                )
                if self._decode_whole:
                    self.chunk_rows = 1
        except BaseException:
            self._tiff.close()
            raise

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        if self._decode_whole:
            self._array, self._decode_whole = np.asarray(self._array[...]), False
        index = tuple(
            slice(y0, y1) if axis == "Y" else slice(None) if axis in "XS" else 0
            for axis in self._axes
        )
        kept = [axis for axis in self._axes if axis in "YXS"]
        rows = np.asarray(self._array[index])
        order = [kept.index(axis) for axis in "YXS" if axis in kept]
        return rows.transpose(order)

    def close(self) -> None:
        self._tiff.close()


def _check_tiff_complete(path: Path, pages: list) -> None:
    """Raise if a strip or tile lies past the end of the file (a truncated copy or download)."""
    size = os.path.getsize(path)
    for page in pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
        if ends and max(ends) > size:
            raise InputError(
                path, f"file is truncated: image data ends at byte {max(ends)}, file has {size}"
            )


# OME's UnitsLength symbols for PhysicalSizeX/Y → µm.
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(tiff, image_index: int) -> float | None:
    """µm/px of an image of an OME-TIFF (``Pixels`` ``PhysicalSizeX/Y`` in their units, µm when
    unset), as Bio-Formats and QuPath write it; None without one. tiffslide does not read
    OME-XML."""
    import xml.etree.ElementTree as ElementTree

    if not tiff.is_ome or not tiff.ome_metadata:
        return None
    try:
        images = ElementTree.fromstring(tiff.ome_metadata).findall(".//{*}Image")
    except ElementTree.ParseError:
        return None
    pixels = images[image_index].find("{*}Pixels") if image_index < len(images) else None
    if pixels is None:
        return None
    sizes = []
    for axis in "XY":
        unit = _OME_UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            sizes.append(float(pixels.get(f"PhysicalSize{axis}")) * unit)
        except (TypeError, ValueError):  # absent, not a number, or a unit that is no length
            return None
    mpp = sum(sizes) / 2
    return pixel_size(mpp)


# ImageJ/Fiji's ``unit=`` (its description) → µm; it escapes µ as the six characters \u00B5.
_IMAGEJ_UNIT_UM = {
    **dict.fromkeys(("micron", "microns", "um", "µm", "μm", "\\u00b5m"), 1.0),
    **{"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "meter": 1e6, "inch": 25400.0},
}


def _imagej_mpp(tiff, page) -> float | None:
    """µm/px of an ImageJ/Fiji TIFF: its resolution tags count pixels per the ``unit`` of its
    description, and their ResolutionUnit says NONE for every unit but inch and cm, so neither
    tiffslide nor the tags alone give a size. None for other TIFFs and for ``unit=pixel``."""
    if not tiff.is_imagej:
        return None
    unit = _IMAGEJ_UNIT_UM.get(str((tiff.imagej_metadata or {}).get("unit", "")).lower())
    return None if unit is None else _mpp_from_resolution(page, unit)


def _tiff_mpp(path: Path, page) -> float | None:
    """µm/px from tiffslide's parsers (Aperio, Leica, Hamamatsu, ... and resolution tags: of the
    first series only), else the tags themselves."""
    try:
        import tiffslide

        with tiffslide.TiffSlide(path) as slide:
            mpp_x = slide.properties.get("tiffslide.mpp-x")
            mpp_y = slide.properties.get("tiffslide.mpp-y")
        if mpp_x and mpp_y:
            return (float(mpp_x) + float(mpp_y)) / 2
    except Exception:  # noqa: BLE001 - tiffslide rejects some layouts (planar RGB); use the tags
        pass
    return _resolution_tag_mpp(page)


_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # TIFF ResolutionUnit → µm per unit


def _resolution_tag_mpp(page) -> float | None:
    tags = page.tags
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    return _mpp_from_resolution(page, _UNIT_UM[unit]) if unit in _UNIT_UM else None


def _mpp_from_resolution(page, um_per_unit: float) -> float | None:
    """µm/px from the X/YResolution tags (pixels per unit), the unit being ``um_per_unit`` µm."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    x_num, x_den = tags["XResolution"].value
    y_num, y_den = tags["YResolution"].value
    if x_num == 0 or y_num == 0:
        return None
    return um_per_unit * (x_den / x_num + y_den / y_num) / 2


@contextlib.contextmanager
def _pillow_unlimited() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit: large mosaics are what we expect to read."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


# Uncompressed BMP pixel layouts that can be memory-mapped: raw mode → bytes per pixel.
_RAW_BMP_MODES = {"L": 1, "P": 1, "BGR": 3, "BGRX": 4, "BGRA": 4}
_PILLOW_DTYPES = {"1": "bool", "I;16": "uint16", "I;16B": "uint16", "I": "int32", "F": "float32"}


class _PillowSource(_Source):
    """BMP/PNG/JPEG. Uncompressed BMPs are memory-mapped; the rest is decoded whole."""

    def __init__(self, path: Path) -> None:
        from PIL import Image

        self.path = path
        with _pillow_unlimited():
            image = Image.open(path)
        self._image = image
        width, height = image.size
        self.shape = (height, width)
        self.dtype = np.dtype(_PILLOW_DTYPES.get(image.mode, "uint8"))
        dpi = image.info.get("dpi")
        self.file_mpp = 25400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None
        self._array: np.ndarray | None = None

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        if self._array is None:
            self._array = self._map_raw_bmp()
        if self._array is None:
            self._array = self._decode_whole()
        return self._array[y0:y1]

    def _map_raw_bmp(self) -> np.ndarray | None:
        image = self._image
        tiles = image.tile
        if image.format != "BMP" or len(tiles) != 1 or tiles[0][0] != "raw":
            return None
        offset, (raw_mode, stride, orientation) = tiles[0][2], tiles[0][3][:3]
        if raw_mode not in _RAW_BMP_MODES:
            return None
        height, width = self.shape
        depth = _RAW_BMP_MODES[raw_mode]
        _check_file_holds(self.path, offset + stride * height)
        rows = np.memmap(self.path, np.uint8, mode="r", offset=offset, shape=(height, stride))
        pixels = rows[::-1] if orientation == -1 else rows
        pixels = pixels[:, : width * depth].reshape(height, width, depth)
        if raw_mode == "P":
            return _PaletteRows(pixels[..., 0], _palette_luminance(image))
        if depth == 1:
            return pixels[..., 0]
        return pixels[..., 2::-1]  # BGR(X) → RGB

    def _decode_whole(self) -> np.ndarray:
        image = self._image
        with _pillow_unlimited():
            if image.format == "JPEG" and image.mode in ("RGB", "YCbCr"):
                image.draft("L", image.size)  # decode the luma plane only
            image.load()
            if image.mode not in ("L", "1", "I;16", "I;16B", "I", "F"):
                image = image.convert("L")  # BT.601 luminance, like _luminance
            array = np.asarray(image)
        self._image.close()
        return array

    def close(self) -> None:
        self._image.close()


class _PaletteRows:
    """Rows of an 8-bit palette BMP, looked up to luminance on access."""

    def __init__(self, indices: np.ndarray, lut: np.ndarray) -> None:
        self._indices, self._lut = indices, lut

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self._lut[self._indices[rows]]


def _palette_luminance(image) -> np.ndarray:
    palette = np.asarray(image.getpalette() or [], dtype=np.float32).reshape(-1, 3)
    lut = np.zeros(256, dtype=np.float32)
    lut[: len(palette)] = palette[:256] @ np.asarray(LUMINANCE_WEIGHTS, dtype=np.float32)
    return lut


def _check_file_holds(path: Path, nbytes: int) -> None:
    size = os.path.getsize(path)
    if size < nbytes:
        raise InputError(
            path, f"file is truncated: pixel data needs {nbytes} bytes, file has {size}"
        )


_NIFTI_UNIT_UM = {"mm": 1000.0, "micron": 1.0, "meter": 1e6, "unknown": 1000.0}


class _NiftiSource(_Source):
    """NIfTI-1/2: axes (x, y[, 1...]) → (rows = y, columns = x); zooms → µm (mm when unset).

    Uncompressed files are read band by band; a gzipped file cannot seek cheaply, so its
    voxels are decompressed once and kept (one copy at the stored type).
    """

    def __init__(self, path: Path) -> None:
        import nibabel as nib

        self.path = path
        image = nib.load(path)
        self._proxy = image.dataobj
        shape = tuple(int(n) for n in image.shape)
        if len(shape) < 2 or any(n > 1 for n in shape[2:]):
            raise InputError(path, f"holds a {len(shape)}-D volume of shape {shape}; expected 2-D")
        self._extra = (0,) * (len(shape) - 2)
        self.shape = (shape[1], shape[0])
        stored = np.dtype(image.get_data_dtype())
        slope = float(getattr(self._proxy, "slope", 1.0))
        inter = float(getattr(self._proxy, "inter", 0.0))
        scaled = (slope, inter) != (1.0, 0.0)
        self.dtype = np.dtype(np.float64) if scaled and stored.kind in "biu" else stored
        zooms = image.header.get_zooms()[:2]
        unit = image.header.get_xyzt_units()[0]
        self.file_mpp = _NIFTI_UNIT_UM.get(unit, 1000.0) * (float(zooms[0]) + float(zooms[1])) / 2
        self._gzipped = mosaic_suffix(path) == ".nii.gz"
        self._voxels: np.ndarray | None = None

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        if self._gzipped:
            if self._voxels is None:
                self._voxels = np.asarray(self._proxy[(slice(None), slice(None), *self._extra)])
            return self._voxels[:, y0:y1].T
        return np.asarray(self._proxy[(slice(None), slice(y0, y1), *self._extra)]).T

    def close(self) -> None:
        self._voxels = None
