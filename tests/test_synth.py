"""Synthetic RCM data: determinism, partial labels, six patterns, files readable by real readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
from typer.testing import CliRunner

from rcmseg.classes import NUM_CLASSES, UNLABELLED
from rcmseg.cli.main import app
from rcmseg.io.dataset import load_case, read_manifest
from rcmseg.io.labels import downsample_labels, read_label_map
from rcmseg.synth import make_mosaic, mosaic, write_dataset, write_mosaic_tiff


@pytest.fixture(scope="module")
def mosaic_1536() -> tuple[np.ndarray, np.ndarray]:
    return make_mosaic(1536, seed=11)


def test_same_seed_same_mosaic_other_seed_other_mosaic() -> None:
    image, labels = make_mosaic(512, seed=4)
    again_image, again_labels = make_mosaic(512, seed=4)
    other_image, _ = make_mosaic(512, seed=5)
    assert image.dtype == np.uint8 and labels.dtype == np.uint8 and image.shape == (512, 512)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(labels, again_labels)
    assert np.mean(image != other_image) > 0.5


def test_non_square_size() -> None:
    image, labels = make_mosaic((300, 700), seed=1)
    assert image.shape == labels.shape == (300, 700)


def test_about_57_percent_labelled_and_all_six_classes(mosaic_1536) -> None:
    _, labels = mosaic_1536
    assert set(np.unique(labels)) <= set(range(NUM_CLASSES)) | {UNLABELLED}
    labelled = labels != UNLABELLED
    assert labelled.mean() == pytest.approx(0.57, abs=0.04)
    counts = np.bincount(labels[labelled], minlength=NUM_CLASSES)
    assert np.all(counts / labelled.sum() > 0.01), counts


def test_unlabelled_pixels_include_borders_and_whole_regions(mosaic_1536) -> None:
    _, labels = mosaic_1536
    # Every boundary between two labelled classes is separated by unlabelled pixels...
    horizontal = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] != UNLABELLED)
    horizontal &= labels[:, :-1] != UNLABELLED
    assert horizontal.mean() < 0.002
    # ...and there are unlabelled areas far wider than a border band.
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(labels == UNLABELLED)
    assert depth.max() > 60


def test_brightness_alone_does_not_separate_lesion_patterns() -> None:
    """Mean intensity per class varies more between mosaics than between the texture classes."""
    means = []
    for seed in (1, 2, 3):
        image, labels = make_mosaic(1024, seed=seed)
        means.append([image[labels == k].mean() for k in (0, 2, 3, 4, 5)])
    means_array = np.array(means)
    # No class is consistently the brightest or darkest.
    assert (
        len(set(np.argmax(means_array, axis=1))) > 1 or len(set(np.argmin(means_array, axis=1))) > 1
    )
    assert np.ptp(means_array, axis=1).mean() < 45.0


def test_patterns_survive_4x_downsampling(mosaic_1536) -> None:
    """At 2 µm/px the classes still differ in texture (local contrast), not just noise."""
    import torch
    import torch.nn.functional as F

    image, labels = mosaic_1536
    coarse = F.avg_pool2d(torch.from_numpy(image.astype(np.float32))[None, None], 4)[0, 0]
    coarse_labels = downsample_labels(labels, 4)
    # Local standard deviation in 9x9 windows, per class: textures keep distinct contrast.
    mean = F.avg_pool2d(coarse[None, None], 9, stride=1, padding=4)[0, 0]
    square = F.avg_pool2d((coarse**2)[None, None], 9, stride=1, padding=4)[0, 0]
    local_std = (square - mean**2).clamp(min=0).sqrt().numpy()
    per_class = [np.median(local_std[coarse_labels == k]) for k in (0, 2, 3, 4, 5)]
    assert min(per_class) > 3.0  # structure above the averaged-out speckle


def test_labels_are_seamless_across_strips(monkeypatch) -> None:
    _, labels = make_mosaic(900, seed=2)
    monkeypatch.setattr(mosaic, "STRIP_ROWS", 100)
    image_strips, labels_strips = make_mosaic(900, seed=2)
    np.testing.assert_array_equal(labels, labels_strips)
    # Row-to-row changes at strip joins are no larger than elsewhere.
    steps = np.abs(np.diff(image_strips.astype(np.float32), axis=0)).mean(axis=1)
    joins = steps[np.arange(199, 899, 200)]
    assert joins.mean() < 1.5 * np.median(steps)


def test_tiff_resolution_tags_read_back_as_half_micron(tmp_path: Path) -> None:
    image = make_mosaic(2304, seed=0)[0]
    path = write_mosaic_tiff(tmp_path / "mosaic.tif", image)
    with tiffslide.TiffSlide(path) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)
        assert slide.dimensions == (2304, 2304)
        region = slide.read_region((100, 200), 0, (64, 32), as_array=True)
        np.testing.assert_array_equal(np.squeeze(region), image[200:232, 100:164])
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tags["ResolutionUnit"].value == 3  # centimetre


def test_write_dataset_layout_round_trips(tmp_path: Path) -> None:
    cases = write_dataset(tmp_path / "ds", n=3, size=512, seed=9, patients=2, clinics=2)
    assert [c.patient for c in cases] == ["P000", "P001", "P000"]
    assert [c.clinic for c in cases] == ["C1", "C2", "C1"]
    listed = read_manifest(tmp_path / "ds")
    assert [c.mosaic for c in listed] == [c.mosaic for c in cases]
    expected_image, expected_labels = make_mosaic(512, seed=_seed_of(9, 1))
    assert cases[1].labels is not None
    np.testing.assert_array_equal(read_label_map(cases[1].labels), expected_labels)
    np.testing.assert_array_equal(tifffile.imread(cases[1].mosaic), expected_image)
    image, labels = load_case(listed[0])
    assert image.shape == labels.shape == (128, 128)


def _seed_of(seed: int, index: int) -> int:
    from rcmseg.synth.writer import _mosaic_seed

    return _mosaic_seed(seed, index)


def test_cli_writes_a_data_set_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "synthetic"
    result = runner.invoke(app, ["synth", str(out), "--n", "2", "--size", "384", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out)) == 2
    assert sorted(p.name for p in (out / "mosaics").iterdir()) == [
        "synth_0000.tif",
        "synth_0001.tif",
    ]
    assert f"wrote 2 mosaics of 384x384 px to {out} (1 patient, 1 clinic)" in result.output
    again = runner.invoke(app, ["synth", str(out), "--n", "1", "--size", "384"])
    assert again.exit_code == 2
    assert "manifest.csv" in again.output and "Traceback" not in again.output
    one = runner.invoke(app, ["synth", str(tmp_path / "one"), "--n", "1", "--size", "384"])
    assert "wrote 1 mosaic of 384x384 px" in one.output


def test_lesion_regions_are_patchworks_of_foci() -> None:
    """A region's texture is, focus by focus, the base texture FOCUS_TEXTURES picks for its class:
    a ring region shows meshwork in some foci, an aspecific region rings in others."""
    from rcmseg.synth.patterns import (
        ASPECIFIC,
        BASE_TEXTURES,
        FOCUS_TEXTURES,
        MESHWORK,
        NESTED,
        RING,
        Canvas,
        Style,
        Window,
        aspecific,
        ring,
    )

    style = Style.create(np.random.default_rng(7), 600, 600)
    canvas = Canvas(style, Window(0, (600, 600)))
    for class_index, region in ((RING, ring(canvas)), (ASPECIFIC, aspecific(canvas))):
        picks = FOCUS_TEXTURES[class_index]
        assert len(picks) == 10
        for base_index, base in enumerate(BASE_TEXTURES):
            deciles = [d for d, b in enumerate(picks) if b == base_index]
            inside = canvas.focus_deciles[deciles].sum(axis=0) > 0.999
            assert inside.sum() > 500, (class_index, base.__name__)
            correlation = np.corrcoef(region[inside], canvas.texture(base)[inside])[0, 1]
            assert correlation > 0.99, (class_index, base.__name__, correlation)
    # Organised patterns are mostly their own texture; aspecific has no majority texture.
    for class_index in (MESHWORK, NESTED, RING):
        assert max(np.bincount(FOCUS_TEXTURES[class_index])) == 6
    assert max(np.bincount(FOCUS_TEXTURES[ASPECIFIC])) < 5


def test_sigterm_mid_synth_exits_143_with_one_line_and_no_manifest(
    tmp_path: Path, signal_when
) -> None:
    """A command without its own interruption handling still stops as the shell expects (SIGTERM:
    143), says so in one line, and leaves no manifest: the half-written set does not look
    finished."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "d"
    command = [sys.executable, "-m", "rcmseg.cli.main", "synth", str(out), "--n", "50"]
    process = subprocess.Popen(
        [*command, "--size", "2048"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = signal_when(process, lambda: any(out.glob("mosaics/*.tif")), signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "interrupted" in output
    assert not (out / "manifest.csv").exists()
