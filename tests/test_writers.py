"""Writers: label TIFF read by tifffile, tiffslide and OpenSlide; atomic writes; maps."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
from PIL import Image

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED
from rcmseg.io.atomic import PARTIAL_MARKER, atomic_path
from rcmseg.io.labels import downsample_labels
from rcmseg.io.overlay import write_overlay_png
from rcmseg.io.writers import (
    is_complete_label_tiff,
    write_label_tiff,
    write_probability_tiff,
    write_uncertainty_tiff,
)


def blocky_labels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Class indices in 25 px blocks, with some UNLABELLED blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 7, (height // 25 + 1, width // 25 + 1)).astype(np.uint8)
    blocks[blocks == 6] = UNLABELLED
    return np.kron(blocks, np.ones((25, 25), np.uint8))[:height, :width]


@pytest.fixture(scope="module")
def label_tiff(tmp_path_factory):
    labels = blocky_labels(1100, 900)
    path = tmp_path_factory.mktemp("labels") / "mosaic.labels.tif"
    write_label_tiff(path, labels, 2.0, tile_px=256, extra_metadata={"mosaic": "m1.bmp"})
    return path, labels


def test_label_tiff_with_tifffile(label_tiff):
    path, labels = label_tiff
    with tifffile.TiffFile(path) as tiff:
        levels = tiff.series[0].levels
        # halved until the largest side fits in one 256 px tile
        shapes = [(1100, 900), (550, 450), (275, 225), (138, 113)]
        assert [level.shape for level in levels] == shapes
        page = tiff.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        colormap = page.colormap
        for index, colour in enumerate(CLASS_COLOURS):
            assert tuple(colormap[:, index] // 257) == colour
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        numerator, denominator = page.tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(2.0)
        numerator, denominator = tiff.pages[1].tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(4.0)
        assert tiff.pages[1].subfiletype == 1
        record = json.loads(page.description)
        assert [c["name"] for c in record["classes"]] == list(CLASS_NAMES)
        assert [tuple(c["color"]) for c in record["classes"]] == list(CLASS_COLOURS)
        assert record["mosaic"] == "m1.bmp" and record["unlabelled"] == UNLABELLED
        np.testing.assert_array_equal(levels[0].asarray(), labels)
        np.testing.assert_array_equal(levels[1].asarray(), downsample_labels(labels, 2))


def test_label_tiff_with_tiffslide(label_tiff):
    path, labels = label_tiff
    with tiffslide.TiffSlide(path) as slide:
        assert slide.dimensions == (900, 1100)
        assert slide.level_count == 4
        assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
        region = slide.read_region((300, 700), 0, (200, 150), as_array=True)
    assert region.dtype == np.uint8
    np.testing.assert_array_equal(region.reshape(150, 200), labels[700:850, 300:500])


def test_label_tiff_with_openslide(label_tiff):
    path, labels = label_tiff
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.dimensions == (900, 1100)
        assert slide.level_count == 4
        assert slide.level_dimensions[1:] == ((450, 550), (225, 275), (113, 138))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(2.0)
        rgba = np.asarray(slide.read_region((0, 0), 0, (900, 1100)))
    finally:
        slide.close()
    for index, colour in enumerate(CLASS_COLOURS):
        rows, cols = np.nonzero(labels == index)
        assert tuple(rgba[rows[0], cols[0], :3]) == colour


def test_pyramid_downsample_takes_a_block_value_never_an_average():
    labels = np.array(
        [
            [0, 0, 1, 2, 4],
            [5, 1, 3, 3, 4],
            [2, 2, 5, 5, 0],
        ],
        dtype=np.uint8,
    )
    # blocks: {0,0,5,1} → 0; {1,2,3,3} → 3; {4,4} padded → 4; {2,2} → 2; {5,5} → 5; {0} → 0
    expected = np.array([[0, 3, 4], [2, 5, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample_labels(labels, 2), expected)
    tie = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    assert downsample_labels(tie, 2)[0, 0] == 1


def test_is_complete_label_tiff(tmp_path, label_tiff):
    path, _labels = label_tiff
    assert is_complete_label_tiff(path, (1100, 900))
    assert not is_complete_label_tiff(path, (1100, 901))
    assert not is_complete_label_tiff(tmp_path / "absent.tif", (1100, 900))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not is_complete_label_tiff(truncated, (1100, 900))
    foreign = tmp_path / "foreign.tif"
    tifffile.imwrite(foreign, np.zeros((1100, 900), np.uint8))
    assert not is_complete_label_tiff(foreign, (1100, 900))


def test_label_tiff_rejects_non_label_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_label_tiff(tmp_path / "x.tif", np.zeros((4, 4), np.float32), 2.0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Atomic writing


def test_atomic_path_moves_into_place_only_on_success(tmp_path):
    target = tmp_path / "out" / "result.csv"
    with atomic_path(target) as partial:
        assert partial.parent == target.parent and PARTIAL_MARKER in partial.name
        partial.write_text("complete")
        assert not target.exists()
    assert target.read_text() == "complete"
    assert list(target.parent.iterdir()) == [target]


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "result.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as partial:
        partial.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_failing_tiff_writer_leaves_no_output(tmp_path):
    target = tmp_path / "labels.tif"
    # tifffile opens the file, then refuses tiles that are not a multiple of 16 px
    with pytest.raises(ValueError, match="tile"):
        write_label_tiff(target, np.zeros((8, 8), np.uint8), 2.0, tile_px=100)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Probability, uncertainty and overlay


def test_probability_tiff_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(6), (70, 90)).transpose(2, 0, 1).astype(np.float32)
    path = tmp_path / "p.ome.tif"
    write_probability_tiff(path, probabilities, 2.0)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome
        series = tiff.series[0]
        assert series.axes == "CYX" and series.shape == (6, 70, 90)
        stored = series.asarray()
        assert stored.dtype == np.uint8
        assert all(f'Name="{name}"' in tiff.ome_metadata for name in CLASS_NAMES)
        assert 'PhysicalSizeX="2.0"' in tiff.ome_metadata
        numerator, denominator = tiff.pages[0].tags["XResolution"].value
        assert 1e4 * denominator / numerator == pytest.approx(2.0)
    assert np.abs(stored / 255.0 - probabilities).max() <= 0.5 / 255 + 1e-6


def test_uncertainty_tiff_round_trip(tmp_path):
    entropy = np.random.default_rng(2).uniform(0, np.log(6), (70, 90)).astype(np.float32)
    path = tmp_path / "u.tif"
    write_uncertainty_tiff(path, entropy, 2.0)
    np.testing.assert_array_equal(tifffile.imread(path), entropy)
    with tiffslide.TiffSlide(path) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
    with tifffile.TiffFile(path) as tiff:
        assert json.loads(tiff.pages[0].description)["unit"] == "nats"


def test_overlay_png(tmp_path):
    labels = np.full((400, 600), UNLABELLED, np.uint8)
    labels[:, :300] = 4  # ring, blue
    image = np.full(labels.shape, 100.0, np.float32)
    path = tmp_path / "overlay.png"
    write_overlay_png(path, image, labels, max_side=300)
    overlay = np.asarray(Image.open(path).convert("RGB"))
    assert overlay.shape[1] == 300 and overlay.shape[0] > 200  # 300×200 picture + legend
    blue_blend = np.rint(100 * 0.6 + np.array(CLASS_COLOURS[4]) * 0.4)
    np.testing.assert_array_equal(overlay[100, 50], blue_blend)
    np.testing.assert_array_equal(overlay[100, 250], [100, 100, 100])  # unlabelled: grey
    legend = overlay[200:].reshape(-1, 3)
    for colour in CLASS_COLOURS:
        assert (legend == colour).all(axis=1).any(), f"no swatch of colour {colour}"
