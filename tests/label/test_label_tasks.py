"""Pieces of the MONAI Label app that need no server: split, model choice, regions, patterns."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="needs the rcmseg[label] extra (see .ci/label)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rcmseg.bundle import LoadedBundle  # noqa: E402
from rcmseg.classes import CLASS_NAMES  # noqa: E402
from rcmseg.errors import InputError  # noqa: E402
from rcmseg.inference import Preset  # noqa: E402
from rcmseg.io.geojson import polygon_strips  # noqa: E402
from rcmseg.io.mosaics import MosaicInfo  # noqa: E402
from rcmseg.label_app.infer import (  # noqa: E402
    Region,
    Runtime,
    class_polygons,
    engine_for,
    min_poly_area,
    segment_region,
    working_index,
)
from rcmseg.label_app.main import datastore_patterns  # noqa: E402
from rcmseg.label_app.pixel_sizes import StudyPixelSizes  # noqa: E402
from rcmseg.label_app.strategy import EntropyCache  # noqa: E402
from rcmseg.label_app.train import should_replace, split_ids  # noqa: E402

INFO = MosaicInfo(
    path=Path("m.tif"),
    width_px=1000,
    height_px=600,
    mosaic_mpp=0.5,
    mpp_source="file",
    dtype="uint8",
)


def test_split_holds_out_a_fifth_and_a_single_mosaic_serves_both():
    split = split_ids([f"m{i}" for i in range(10)], val_split=0.2, seed=0)
    assert len(split.val) == 2 and len(split.train) == 8
    assert sorted(split.train + split.val) == sorted(f"m{i}" for i in range(10))
    assert split == split_ids([f"m{i}" for i in range(10)], val_split=0.2, seed=0)
    assert split_ids(["a", "b"], 0.2, 0).train and split_ids(["a", "b"], 0.9, 0).train
    only = split_ids(["m0"], 0.2, 0)
    assert only.train == ["m0"] and only.val == ["m0"]


@pytest.mark.parametrize(
    ("trained", "served", "replace"),
    [
        (0.5, 0.4, True),
        (0.4, 0.4, True),
        (0.39, 0.4, False),
        (math.nan, 0.4, False),
        (0.1, math.nan, True),
    ],
)
def test_fine_tuned_weights_replace_the_served_ones_unless_worse(trained, served, replace):
    assert should_replace(trained, served) is replace


def test_regions_are_clipped_and_whole_when_no_size_is_given():
    assert Region.from_request({}, INFO) == Region(0, 0, 1000, 600)
    assert Region.from_request({"size": [0, 0]}, INFO).is_whole(INFO)
    assert Region.from_request({"location": [900, -10], "size": [300, 100]}, INFO) == Region(
        900, 0, 100, 90
    )
    with pytest.raises(InputError, match="outside"):
        Region.from_request({"location": [2000, 0], "size": [10, 10]}, INFO)
    with pytest.raises(InputError, match="level 0"):
        Region.from_request({"level": 1, "size": [10, 10]}, INFO)


def test_mosaic_pixels_take_the_working_pixel_their_centre_falls_in():
    # 0.5 -> 2 µm/px: four mosaic pixels per working pixel, edge pixels clipped to the grid.
    np.testing.assert_array_equal(working_index(0, 9, 0.25, 2), [0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(working_index(6, 3, 0.25, 10), [1, 1, 2])


def test_datastore_takes_tiff_and_every_mosaic_format():
    patterns = datastore_patterns()
    for pattern in ("*.tif", "*.tiff", "*.png", "*.bmp", "*.jpg", "*.nii.gz", "*.xml"):
        assert pattern in patterns
    assert len(patterns) == len(set(patterns))


def test_datastore_lists_the_mosaics_not_what_rcmseg_batch_wrote_beside_them(tmp_path):
    """`rcmseg batch STUDIES --out STUDIES` before `rcmseg label serve --studies STUDIES`: the
    label maps and overlays beside the mosaics are not images to annotate."""
    from rcmseg.label_app.main import MosaicDatastore

    for name in ("a.tif", "a.labels.tif", "a.uncertainty.tif", "a.overlay.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    store = MosaicDatastore(str(tmp_path), extensions=datastore_patterns())
    assert sorted(store.list_images()) == ["a", "b"]


def test_datastore_leaves_out_a_file_name_that_is_not_utf8_and_says_so(tmp_path, caplog):
    """A Latin-1 name (bytes that are not UTF-8) cannot travel in MONAI Label's JSON replies
    (every /datastore request would fail): it is left out with one warning; the rest is served."""
    import json
    import os

    from rcmseg.label_app.main import MosaicDatastore

    for name in ("a.tif", os.fsdecode(b"caf\xe9.tif")):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        store = MosaicDatastore(str(tmp_path), extensions=datastore_patterns())
    assert store.list_images() == ["a"]
    json.dumps(store.json(), ensure_ascii=False).encode("utf-8")  # what a reply sends
    assert "file name is not UTF-8" in caplog.text


def test_datastore_keeps_one_of_two_mosaics_named_alike_and_says_which_it_left_out(
    tmp_path, caplog
):
    """`a.tif` and `a.png` in one studies folder: MONAI Label names both `a`, so one would vanish
    without a word. The first in sorted order is served, the other is named in a warning."""
    from rcmseg.label_app.main import MosaicDatastore

    for name in ("a.tif", "a.png", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level("WARNING"):
        store = MosaicDatastore(str(tmp_path), extensions=datastore_patterns())
    assert sorted(store.list_images()) == ["a", "b"]
    assert store.get_image_uri("a") == str(tmp_path / "a.png")
    assert "left out 'a.tif': 'a.png' has the same name without its ending" in caplog.text


class WindowPositionNet(torch.nn.Module):
    """A small conv net plus a fixed random offset per position inside the 64 px window: its
    labels depend on which windows cover a pixel and where, so a wrong context span shows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.register_buffer("offsets", 0.5 * torch.randn(1, 6, 64, 64))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.conv(windows) + self.offsets


def tiny_bundle() -> LoadedBundle:
    """A LoadedBundle around :class:`WindowPositionNet` with 64 px windows at a 32 px stride."""
    torch.manual_seed(0)
    return LoadedBundle(
        root=Path("."),
        network=WindowPositionNet().eval(),
        device=torch.device("cpu"),
        name="tiny",
        version="0",
        model="tiny",
        class_names=CLASS_NAMES,
        working_mpp=2.0,
        presets={"small": Preset(window_px=64, overlap=0.5, sw_batch_size=4)},
        intended_use="tests",
    )


def test_the_server_log_says_once_per_preset_how_it_segments(caplog):
    bundle = tiny_bundle()
    with caplog.at_level(logging.INFO, logger="rcmseg.label_app.infer"):
        for _ in range(2):
            engine_for(bundle, "small", Runtime(precision="fp32"))
    (line,) = [r.getMessage() for r in caplog.records if "segmenting with" in r.getMessage()]
    threads = torch.get_num_threads()
    plural = "s" if threads != 1 else ""
    assert line == (
        "tiny 0: segmenting with small (64 px windows, stride 32 px), fp32, cpu, "
        f"{threads} CPU thread{plural}"
    )


def test_the_app_runs_torch_on_the_threads_serve_was_given(tmp_path: Path):
    from rcmseg.label_app.configs import MEDNetTaskConfig
    from rcmseg.label_app.workspace import Workspace

    before = torch.get_num_threads()
    try:
        for threads, expected in (("1", 1), ("", len(os.sched_getaffinity(0)))):
            studies = tmp_path / f"studies{threads}"
            studies.mkdir()
            config = MEDNetTaskConfig()
            conf = {"threads": threads, "device": "cpu"}
            config.init(
                "mednet",
                str(tmp_path / "model"),
                conf,
                None,
                workspace=Workspace.for_studies(str(studies)),
            )
            assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_regions_come_out_exactly_as_in_the_whole_mosaic():
    rng = np.random.default_rng(0)
    image = (rng.random((150, 210)) * 255).astype(np.float32)  # working grid, 2 µm/px
    info = MosaicInfo(
        path=Path("m.tif"),
        width_px=840,
        height_px=600,
        mosaic_mpp=0.5,
        mpp_source="file",
        dtype="uint8",
    )
    bundle = tiny_bundle()
    whole = segment_region(image, info, Region(0, 0, 840, 600), bundle, "small")
    assert whole.labels.shape == (600, 840)
    regions = (
        Region(301, 157, 250, 190),
        Region(0, 420, 840, 180),
        Region(700, 0, 5, 7),
        Region(200, 100, 60, 60),
    )
    for region in regions:
        part = segment_region(image, info, region, bundle, "small")
        np.testing.assert_array_equal(
            part.labels,
            whole.labels[region.y : region.y + region.height, region.x : region.x + region.width],
        )


def painted(elements: list, region: Region) -> np.ndarray:
    """The region's pixels painted by each element's contour in turn, later over earlier, by
    the pixel-centre rule (as a submitted label is read back); 255 where none reaches."""
    labels = np.full((region.height, region.width), 255, dtype=np.uint8)
    for element in elements:
        (contour,) = element["contours"]
        ring = np.asarray(contour, dtype=float) - [region.x, region.y]
        for rows, cols, inside in polygon_strips([ring], labels.shape):
            labels[rows, cols][inside] = CLASS_NAMES.index(element["label"])
    return labels


def ring_area(contour: list) -> float:
    x, y = np.asarray(contour, dtype=float).T
    return abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2


@pytest.mark.parametrize("mosaic_mpp", [0.5, 0.47, 2.0, 3.0])
def test_region_polygons_paint_back_exactly_the_region_labels(mosaic_mpp: float):
    """Traced on the coarser grid, the outlines (one per region, no holes, largest first), painted
    in reply order, give back the region's labels pixel for pixel; every vertex lies inside the
    region; outlines under the minimum area are dropped."""
    rng = np.random.default_rng(2)
    image = (rng.random((150, 210)) * 255).astype(np.float32)
    scale = mosaic_mpp / 2.0  # working pixels per mosaic pixel
    width, height = round(210 / scale), round(150 / scale)
    info = MosaicInfo(Path("m.tif"), width, height, mosaic_mpp, "file", "uint8")
    bundle = tiny_bundle()
    for region in (
        Region(0, 0, width, height),
        Region(width // 3 + 1, height // 4 + 3, width // 3, height // 2),
    ):
        part = segment_region(image, info, region, bundle, "small")
        assert len(np.unique(part.labels)) > 1
        annotation = class_polygons(part, region, min_poly_area=0)
        assert annotation["location"] == [region.x, region.y]
        elements = annotation["elements"]
        assert {e["label"] for e in elements} == {CLASS_NAMES[k] for k in np.unique(part.labels)}
        assert set(annotation["labels"]) == {e["label"] for e in elements}
        areas = [ring_area(e["contours"][0]) for e in elements]
        assert areas == sorted(areas, reverse=True)
        np.testing.assert_array_equal(painted(elements, region), part.labels)
        points = np.array([p for e in elements for c in e["contours"] for p in c])
        assert points[:, 0].min() >= region.x and points[:, 0].max() <= region.x + region.width
        assert points[:, 1].min() >= region.y and points[:, 1].max() <= region.y + region.height
        kept = class_polygons(part, region, min_poly_area=200)["elements"]
        assert 0 < len(kept) < len(elements)
        assert min(ring_area(e["contours"][0]) for e in kept) >= 200


def test_min_poly_area_defaults_to_monai_labels_and_refuses_words():
    assert min_poly_area(None, Path("m.tif")) == 80
    assert min_poly_area(0, Path("m.tif")) == 0.0  # 0 keeps every outline
    with pytest.raises(InputError, match="m.tif.*min_poly_area must be a number"):
        min_poly_area("large", Path("m.tif"))


def test_regions_with_openvino_give_the_torch_labels(tmp_path: Path):
    """`rcmseg label serve --backend openvino`: the app's runtime reaches the one engine; a
    region is segmented as torch segments it, and the conversion is kept where asked."""
    pytest.importorskip("openvino")
    rng = np.random.default_rng(1)
    image = (rng.random((150, 210)) * 255).astype(np.float32)
    info = MosaicInfo(Path("m.tif"), 840, 600, 0.5, "file", "uint8")
    bundle = tiny_bundle()
    region = Region(301, 157, 250, 190)
    torch_labels = segment_region(image, info, region, bundle, "small", Runtime("fp32")).labels
    runtime = Runtime("fp32", "openvino", str(tmp_path / "ov"))
    labels = segment_region(image, info, region, bundle, "small", runtime).labels
    assert (labels == torch_labels).mean() > 0.999
    assert sorted(path.suffix for path in (tmp_path / "ov").iterdir()) == [".bin", ".xml"]


def test_entropy_cache_is_per_model_and_per_file_version(tmp_path: Path):
    mosaic = tmp_path / "m.png"
    mosaic.write_bytes(b"first version")
    cache = EntropyCache(tmp_path / "cache" / "entropy.json")
    assert cache.get(mosaic, "MEDNet@a") is None
    cache.put(mosaic, "MEDNet@a", 0.25)
    assert EntropyCache(cache.path).get(mosaic, "MEDNet@a") == 0.25  # on disk
    assert cache.get(mosaic, "MEDNet@b") is None  # fine-tuned model: score again
    os.utime(mosaic, ns=(1, 1))
    assert cache.get(mosaic, "MEDNet@a") is None  # the file changed


def test_entropy_cache_scores_again_when_the_manifest_changes_a_pixel_size(tmp_path: Path):
    mosaic = tmp_path / "m.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mosaic)
    cache = EntropyCache(tmp_path / ".rcmseg" / "entropy.json", StudyPixelSizes(tmp_path))
    cache.put(mosaic, "MEDNet@a", 0.25)
    assert cache.get(mosaic, "MEDNet@a") == 0.25
    (tmp_path / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic,mosaic_mpp\nm.png,,p,l,,1\n"
    )
    assert cache.get(mosaic, "MEDNet@a") is None  # read at 1 µm/px now, not 0.5
