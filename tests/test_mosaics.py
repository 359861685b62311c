"""Reading mosaics: every format, pixel sizes, area averaging, intensity rules, bad files."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from rcmseg.errors import InputError
from rcmseg.io.dataset import cases_near
from rcmseg.io.mosaics import (
    MOSAIC_SUFFIXES,
    mosaic_suffix,
    probe_mosaic,
    read_mosaic,
    walk_folder,
)

HEIGHT, WIDTH = 67, 50  # not multiples of 4: the trailing rows/columns are dropped


def block_mean_by_hand(image: np.ndarray, block: int) -> np.ndarray:
    """Reference area average written as plain loops."""
    out_h, out_w = image.shape[0] // block, image.shape[1] // block
    out = np.zeros((out_h, out_w))
    for row in range(out_h):
        for col in range(out_w):
            window = image[row * block : (row + 1) * block, col * block : (col + 1) * block]
            out[row, col] = window.astype(np.float64).sum() / block**2
    return out


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)


def _write_tiff_strips(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, image, compression="zlib", rowsperstrip=5)


def _write_tiff_raw(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, image)


def _write_tiff_tiled_pyramid(path: Path, image: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, tile=(16, 16), compression="zlib", subifds=1)
        tiff.write(image[::2, ::2], tile=(16, 16), compression="zlib", subfiletype=1)


def _write_tiff_rgb_planar(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, np.stack([image] * 3), photometric="rgb", planarconfig="separate")


def _write_tiff_rgb(path: Path, image: np.ndarray) -> None:
    tifffile.imwrite(path, np.stack([image] * 3, axis=-1), photometric="rgb", tile=(16, 16))


def _write_pillow(mode: str):
    def write(path: Path, image: np.ndarray) -> None:
        Image.fromarray(image).convert(mode).save(path)

    return write


def _write_bmp_palette(path: Path, image: np.ndarray) -> None:
    # A palette that is not grey: index i has colour (i, 255 - i, i).
    indexed = Image.fromarray(image).convert("P")
    indexed.putpalette([c for i in range(256) for c in (i, 255 - i, i)])
    indexed.save(path)


def _write_nifti(path: Path, image: np.ndarray) -> None:
    nifti = nib.Nifti1Image(np.ascontiguousarray(image.T), np.diag([5e-4, 5e-4, 1.0, 1.0]))
    nifti.header.set_xyzt_units("mm")
    nib.save(nifti, path)


WRITERS = {
    "strips.tif": _write_tiff_strips,
    "raw.tiff": _write_tiff_raw,
    "pyramid.tif": _write_tiff_tiled_pyramid,
    "rgb.tif": _write_tiff_rgb,
    "planar.tif": _write_tiff_rgb_planar,
    "grey.bmp": _write_pillow("L"),
    "rgb.bmp": _write_pillow("RGB"),
    "grey.png": _write_pillow("L"),
    "rgba.png": _write_pillow("RGBA"),
    "image.nii": _write_nifti,
    "image.nii.gz": _write_nifti,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_formats_read_to_the_hand_computed_area_average(tmp_path, grey, name):
    path = tmp_path / name
    WRITERS[name](path, grey)
    image, info = read_mosaic(path)
    assert image.dtype == np.float32
    assert image.shape == (HEIGHT // 4, WIDTH // 4)
    assert (info.height_px, info.width_px) == (HEIGHT, WIDTH)
    np.testing.assert_allclose(image, block_mean_by_hand(grey, 4), atol=1e-3)


def test_palette_bmp_is_read_as_luminance_of_its_colours(tmp_path, grey):
    path = tmp_path / "palette.bmp"
    _write_bmp_palette(path, grey)
    assert Image.open(path).mode == "P"
    image, _ = read_mosaic(path, target_mpp=0.5)
    expected = 0.299 * grey + 0.587 * (255.0 - grey) + 0.114 * grey
    np.testing.assert_allclose(image, expected, atol=1e-3)


def test_jpeg_reads_luma_close_to_the_source(tmp_path, grey):
    path = tmp_path / "mosaic.jpg"
    Image.fromarray(grey).convert("RGB").save(path, quality=100)
    image, info = read_mosaic(path)
    assert info.dtype == "uint8"
    assert np.abs(image - block_mean_by_hand(grey, 4)).max() < 2.0


def test_rgb_tiff_luminance_weights(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 200, 50
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    image, _ = read_mosaic(path)
    np.testing.assert_allclose(image, 0.299 * 100 + 0.587 * 200 + 0.114 * 50, rtol=1e-6)


def test_nifti_axes_follow_the_label_rule(tmp_path):
    """Voxel (x, y) lands on row y, column x, as rcmseg.io.labels reads label volumes."""
    volume = np.zeros((12, 8), dtype=np.uint8)  # x = 12 columns, y = 8 rows
    volume[11, 0] = 200  # far right column, top row
    path = tmp_path / "axes.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    image, info = read_mosaic(path, target_mpp=1.0, fallback_mpp=1.0)
    assert (info.height_px, info.width_px) == (8, 12)
    assert image.shape == (8, 12)
    assert image[0, 11] == 200 and image.sum() == 200


@pytest.mark.parametrize(
    ("write", "expected_mpp", "expected_source"),
    [
        # 20000 px/cm = 0.5 µm/px
        (
            lambda p, a: tifffile.imwrite(p, a, resolution=(2e4, 2e4), resolutionunit="CENTIMETER"),
            0.5,
            "file",
        ),
        # 25400 µm/inch / 50800 px/inch = 0.5 µm/px
        (
            lambda p, a: tifffile.imwrite(p, a, resolution=(50800, 50800), resolutionunit="INCH"),
            0.5,
            "file",
        ),
        # a paint program's 72 dpi default is not a microscope's pixel size
        (
            lambda p, a: tifffile.imwrite(p, a, resolution=(72, 72), resolutionunit="INCH"),
            0.7,
            "fallback",
        ),
        (lambda p, a: tifffile.imwrite(p, a), 0.7, "fallback"),
    ],
)
def test_tiff_pixel_size_from_tags_or_fallback(
    tmp_path, grey, write, expected_mpp, expected_source
):
    path = tmp_path / "mosaic.tif"
    write(path, grey)
    info = probe_mosaic(path, fallback_mpp=0.7)
    assert info.mosaic_mpp == pytest.approx(expected_mpp)
    assert info.mpp_source == expected_source


@pytest.mark.parametrize(
    ("metadata", "expected_mpp", "expected_source"),
    [
        ({"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, 0.5, "file"),  # µm when no unit
        (
            {
                "PhysicalSizeX": 400,
                "PhysicalSizeXUnit": "nm",
                "PhysicalSizeY": 400,
                "PhysicalSizeYUnit": "nm",
            },
            0.4,
            "file",
        ),
        ({"PhysicalSizeX": 0.5}, 0.7, "fallback"),  # one axis only: not trusted
        ({}, 0.7, "fallback"),
    ],
)
def test_ome_tiff_pixel_size_from_its_ome_xml(
    tmp_path, grey, metadata, expected_mpp, expected_source
):
    """Bio-Formats and QuPath keep an OME-TIFF's pixel size in its OME-XML; tiffslide does not
    read it, and the resolution tags (here a paint program's 72 dpi) may say nothing or less."""
    path = tmp_path / "mosaic.ome.tif"
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(
            grey,
            subifds=1,
            tile=(16, 16),
            metadata=metadata,
            resolution=(72, 72),
            resolutionunit="INCH",
        )
        tiff.write(grey[::2, ::2], subfiletype=1, tile=(16, 16))
    info = probe_mosaic(path, fallback_mpp=0.7)
    assert (info.mosaic_mpp, info.mpp_source) == (pytest.approx(expected_mpp), expected_source)


@pytest.mark.parametrize(
    ("unit", "pixels_per_unit", "expected_mpp", "expected_source"),
    [
        ("micron", 2.0, 0.5, "file"),
        ("\\u00B5m", 2.5, 0.4, "file"),  # how ImageJ escapes "µm" in its description
        ("um", 1.0, 1.0, "file"),
        ("nm", 0.002, 0.5, "file"),
        ("mm", 2000.0, 0.5, "file"),
        ("pixel", 1.0, 0.7, "fallback"),
    ],
)
def test_imagej_tiff_pixel_size_from_its_unit(
    tmp_path, grey, unit, pixels_per_unit, expected_mpp, expected_source
):
    """Fiji saves µm sizes as resolution tags per the ``unit=`` of its description, with
    ResolutionUnit NONE: the tags alone say nothing, tiffslide reads nothing."""
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(
        path,
        grey,
        imagej=True,
        resolution=(pixels_per_unit, pixels_per_unit),
        metadata={"unit": unit},
    )
    assert tifffile.TiffFile(path).pages[0].tags["ResolutionUnit"].value == 1  # NONE
    info = probe_mosaic(path, fallback_mpp=0.7)
    assert (info.mosaic_mpp, info.mpp_source) == (pytest.approx(expected_mpp), expected_source)


@pytest.mark.parametrize("ome", [False, True])
def test_a_thumbnail_stored_ahead_of_the_mosaic_is_not_taken_for_it(tmp_path, grey, ome):
    """A small overview image first and the mosaic second (two series): the mosaic is read,
    with its own pixel size (its resolution tags, or its own OME ``Image``)."""
    path = tmp_path / ("thumb_first.ome.tif" if ome else "thumb_first.tif")
    thumbnail = np.full((8, 8), 255, np.uint8)
    with tifffile.TiffWriter(path, ome=ome) as tiff:
        tiff.write(
            thumbnail,
            resolution=(1e3, 1e3),
            resolutionunit="CENTIMETER",
            metadata={"PhysicalSizeX": 10.0, "PhysicalSizeY": 10.0} if ome else None,
        )
        tiff.write(  # 0.4 µm/px: in its OME Image alone, or in its resolution tags
            grey,
            resolution=None if ome else (2.5e4, 2.5e4),
            resolutionunit=None if ome else "CENTIMETER",
            metadata={"PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4} if ome else None,
        )
    assert len(tifffile.TiffFile(path).series) == 2
    image, info = read_mosaic(path, target_mpp=0.8)
    assert (info.height_px, info.width_px) == grey.shape
    assert (info.mosaic_mpp, info.mpp_source) == (pytest.approx(0.4), "file")
    np.testing.assert_allclose(image, block_mean_by_hand(grey, 2), atol=1e-3)


def test_svs_pixel_size_from_aperio_description(tmp_path, grey):
    path = tmp_path / "slide.svs"
    description = "Aperio Image Library v12.0.0\r\n50x67 (16x16) RAW|AppMag = 40|MPP = 0.25"
    tifffile.imwrite(
        path, np.stack([grey] * 3, -1), photometric="rgb", tile=(16, 16), description=description
    )
    image, info = read_mosaic(path, target_mpp=1.0)
    assert (info.mosaic_mpp, info.mpp_source) == (0.25, "file")
    np.testing.assert_allclose(image, block_mean_by_hand(grey, 4), atol=1e-3)


def test_pixel_size_of_bmp_and_nifti(tmp_path, grey):
    bmp = tmp_path / "dpi.bmp"
    Image.fromarray(grey).save(bmp, dpi=(25400, 25400))  # 1 µm/px
    assert probe_mosaic(bmp).mosaic_mpp == pytest.approx(1.0, rel=1e-3)
    assert probe_mosaic(bmp).mpp_source == "file"
    nifti = tmp_path / "zoom.nii"
    _write_nifti(nifti, grey)
    info = probe_mosaic(nifti)
    assert (info.mosaic_mpp, info.mpp_source) == (0.5, "file")
    default_zoom = tmp_path / "default.nii"
    nib.save(nib.Nifti1Image(grey.T.copy(), np.eye(4)), default_zoom)  # 1 mm: not a mosaic's
    assert probe_mosaic(default_zoom, fallback_mpp=0.5).mpp_source == "fallback"


def test_fallback_mpp_sets_the_block_size(tmp_path, grey):
    path = tmp_path / "plain.png"
    Image.fromarray(grey).save(path)
    image, info = read_mosaic(path, target_mpp=2.0, fallback_mpp=1.0)
    assert info.mosaic_mpp == 1.0
    np.testing.assert_allclose(image, block_mean_by_hand(grey, 2), atol=1e-3)


def test_non_integer_ratio_keeps_size_rule_and_mean(tmp_path):
    rng = np.random.default_rng(3)
    mosaic = rng.integers(0, 256, (120, 90), dtype=np.uint8)
    path = tmp_path / "coarse.tif"
    tifffile.imwrite(path, mosaic, resolution=(1e4 / 0.6, 1e4 / 0.6), resolutionunit="CENTIMETER")
    image, info = read_mosaic(path, target_mpp=2.0)
    assert info.mosaic_mpp == pytest.approx(0.6)
    assert image.shape == (36, 27)  # floor(120 * 0.6 / 2), floor(90 * 0.6 / 2)
    assert image.mean() == pytest.approx(mosaic.mean(), abs=1.0)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(
        flat,
        np.full((120, 90), 77, np.uint8),
        resolution=(1e4 / 0.6, 1e4 / 0.6),
        resolutionunit="CENTIMETER",
    )
    np.testing.assert_allclose(read_mosaic(flat)[0], 77.0, atol=1e-4)


def test_coarser_mosaic_is_upsampled(tmp_path):
    path = tmp_path / "coarse.tif"
    tifffile.imwrite(
        path, np.full((10, 6), 40, np.uint8), resolution=(2500, 2500), resolutionunit="CENTIMETER"
    )  # 4 µm/px
    image, _ = read_mosaic(path, target_mpp=2.0)
    assert image.shape == (20, 12)
    np.testing.assert_allclose(image, 40.0, atol=1e-4)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 4095]], np.uint16), [0.0, 255.0]),  # 12-bit: divided by 4095
        (np.array([[0, 200]], np.uint16), [0.0, 200.0]),  # 8-bit values in 16 bits: unchanged
        (np.array([[0, 65535]], np.uint16), [0.0, 255.0]),
        (np.array([[0.0, 0.5]], np.float32), [0.0, 127.5]),  # [0, 1] floats: × 255
        (np.array([[10.0, 200.0]], np.float32), [10.0, 200.0]),  # [0, 255] floats: kept
        (np.array([[-1.0, 3.0]], np.float32), [0.0, 255.0]),  # otherwise min-max
        (np.array([[-100, 100]], np.int16), [0.0, 255.0]),
    ],
)
def test_intensity_rescaling_rule(tmp_path, values, expected):
    path = tmp_path / "values.tif"
    tifffile.imwrite(path, values)
    image, info = read_mosaic(path, target_mpp=1.0, fallback_mpp=1.0)
    assert info.dtype == str(values.dtype)
    np.testing.assert_allclose(image[0], expected, atol=1e-3)


def _write_big_tiled_tiff(path: Path, mosaic: np.ndarray) -> None:
    tifffile.imwrite(path, mosaic, tile=(256, 256), compression="zlib")


def _write_big_bmp(path: Path, mosaic: np.ndarray) -> None:
    Image.fromarray(mosaic).save(path)


@pytest.mark.parametrize(
    ("name", "write"), [("big.tif", _write_big_tiled_tiff), ("big.bmp", _write_big_bmp)]
)
def test_bounded_memory(tmp_path, name, write):
    """A 4000² 8-bit mosaic is read without holding it at full resolution (16 MB)."""
    rows, cols = np.ogrid[:4000, :4000]
    mosaic = ((rows * 3 + cols * 5) % 256).astype(np.uint8)
    path = tmp_path / name
    write(path, mosaic)
    expected = block_mean_by_hand(mosaic[:8, :4000], 4)
    del mosaic
    tracemalloc.start()
    try:
        image, _ = read_mosaic(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == (1000, 1000)
    np.testing.assert_allclose(image[:2], expected, atol=1e-3)
    assert peak < 16e6, f"peak {peak / 1e6:.1f} MB"


def test_pillow_decompression_bomb_limit_does_not_block_large_mosaics(tmp_path, grey, monkeypatch):
    # Lower the limit so that this small BMP counts as a "bomb" (VivaScope BMPs really are).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", HEIGHT * WIDTH // 4)
    path = tmp_path / "large.bmp"
    Image.fromarray(grey).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    image, info = read_mosaic(path)
    assert (info.height_px, info.width_px) == (HEIGHT, WIDTH)
    np.testing.assert_allclose(image, block_mean_by_hand(grey, 4), atol=1e-3)
    assert Image.MAX_IMAGE_PIXELS == HEIGHT * WIDTH // 4  # restored afterwards


def test_sixteen_bit_png_uses_its_effective_bit_depth(tmp_path):
    values = np.array([[0, 1023, 512]], dtype=np.uint16)  # 10-bit data
    path = tmp_path / "ten_bit.png"
    Image.fromarray(values).save(path)
    image, _ = read_mosaic(path, target_mpp=1.0, fallback_mpp=1.0)
    np.testing.assert_allclose(image[0], values[0] * 255.0 / 1023, atol=1e-3)


def test_suffixes():
    assert set(MOSAIC_SUFFIXES) == {
        ".tif",
        ".tiff",
        ".svs",
        ".bmp",
        ".png",
        ".jpg",
        ".jpeg",
        ".nii",
        ".nii.gz",
    }
    assert mosaic_suffix("a/B.NII.GZ") == ".nii.gz"
    assert mosaic_suffix("x.TIF") == ".tif"


# ---------------------------------------------------------------------------------------------
# Bad input: one-line InputError naming the file


def _assert_one_line_error(path: Path, fragment: str, call=read_mosaic) -> None:
    with pytest.raises(InputError) as caught:
        call(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert fragment in message


def test_missing_file_and_directory(tmp_path):
    _assert_one_line_error(tmp_path / "absent.tif", "no such file", probe_mosaic)
    _assert_one_line_error(tmp_path, "is a directory")


@pytest.mark.parametrize("name", ["empty.tif", "empty.png", "empty.nii.gz"])
def test_an_empty_file_says_so(tmp_path, name):
    (tmp_path / name).touch()  # a copy that never finished
    _assert_one_line_error(tmp_path / name, "empty file (0 bytes)")
    _assert_one_line_error(tmp_path / name, "empty file (0 bytes)", probe_mosaic)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "mosaic.gif"
    Image.new("L", (8, 8)).save(path)
    _assert_one_line_error(path, "unsupported file type '.gif'")


@pytest.mark.parametrize("name", ["notes.tif", "notes.png", "notes.bmp", "notes.nii"])
def test_text_file_with_an_image_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are my notes, not an image\n" * 20)
    _assert_one_line_error(path, "cannot read as", probe_mosaic)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_tiff(tmp_path, grey, keep):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.tile(grey, (4, 4)), compression="zlib", tile=(32, 32))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _assert_one_line_error(path, "truncated")


def test_truncated_tiff_data_past_end_of_file(tmp_path, grey):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, grey, compression="zlib", rowsperstrip=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    _assert_one_line_error(path, "truncated", probe_mosaic)


def test_corrupt_tiff_tile(tmp_path, grey):
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, grey, compression="zlib", tile=(16, 16))
    with tifffile.TiffFile(path) as tiff:
        offset = tiff.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    assert probe_mosaic(path).width_px == WIDTH  # the header is intact
    _assert_one_line_error(path, "cannot decode pixel data")


def test_truncated_bmp_and_png(tmp_path, grey):
    bmp = tmp_path / "cut.bmp"
    Image.fromarray(grey).save(bmp)
    bmp.write_bytes(bmp.read_bytes()[:-500])
    _assert_one_line_error(bmp, "truncated")
    png = tmp_path / "cut.png"
    Image.fromarray(grey).save(png)
    png.write_bytes(png.read_bytes()[:-500])
    _assert_one_line_error(png, "cannot decode pixel data")


def test_complex_samples_are_rejected(tmp_path):
    path = tmp_path / "complex.tif"
    tifffile.imwrite(path, np.ones((8, 8), np.complex64))
    _assert_one_line_error(path, "unsupported sample type complex64", probe_mosaic)


def test_stacks_and_volumes_are_rejected(tmp_path):
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 8, 8), np.uint8), photometric="minisblack")
    _assert_one_line_error(stack, "stack of images", probe_mosaic)
    _assert_one_line_error(stack, "save each plane as its own file", probe_mosaic)
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)), volume)
    _assert_one_line_error(volume, "3-D volume", probe_mosaic)


def test_too_small_for_one_working_pixel(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("L", (3, 40)).save(path)
    info = probe_mosaic(path)
    assert (info.width_px, info.height_px) == (3, 40)
    assert info.working_shape() == (10, 0)
    _assert_one_line_error(path, "smaller than one 2 µm pixel")


def test_mosaics_in_linked_folders_are_found_once_and_hidden_folders_left_out(tmp_path: Path):
    """A lab links each patient's folder from a share into one tree: those mosaics (and their
    manifest) are found, a link loop ends, and a trash or checkpoint folder is not searched."""
    image = np.full((16, 16), 128, dtype=np.uint8)
    share = tmp_path / "share" / "patient01"
    share.mkdir(parents=True)
    Image.fromarray(image).save(share / "a.png")
    (share / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic,mosaic_mpp\na.png,,P1,L1,,1\n"
    )
    tree = tmp_path / "tree"
    (tree / ".Trash-1000" / "files").mkdir(parents=True)
    Image.fromarray(image).save(tree / ".Trash-1000" / "files" / "old.png")
    Image.fromarray(image).save(tree / "b.png")
    (tree / "patient01").symlink_to(share, target_is_directory=True)
    (tree / "again").symlink_to(share, target_is_directory=True)  # the same folder twice
    (share / "loop").symlink_to(tmp_path / "share", target_is_directory=True)

    walked = walk_folder(tree)
    found = [path.relative_to(tree).as_posix() for path in walked.mosaics()]
    assert found == ["again/a.png", "b.png"]  # the first path to the folder, in sorted order
    assert [(case.patient, case.mosaic_mpp) for case in cases_near(walked)] == [("P1", 1.0)]
