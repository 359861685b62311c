"""`rcmseg labels import`: batch GeoJSON round trip, QuPath labelled images, re-runs, training."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from rich.console import Console
from shapely.geometry import shape as to_shape
from typer.testing import CliRunner

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED
from rcmseg.cli.labels import import_table
from rcmseg.cli.main import app
from rcmseg.errors import InputError
from rcmseg.io.atomic import PARTIAL_MARKER
from rcmseg.io.dataset import load_case, read_manifest
from rcmseg.labels_import import MosaicImport, import_labels, read_label_image, upsample_labels
from rcmseg.synth.mosaic import make_mosaic

torch.set_num_threads(2)

# Mosaics at 0.5 µm/px: relative path -> full-resolution (H, W); a.tif is not a multiple of 4.
MOSAICS = {"a.tif": (389, 483), "sub/b.tif": (256, 320), "c.tif": (256, 256)}
FACTOR = 4  # mosaic pixels per working pixel (2 µm/px / 0.5 µm/px)


def write_mosaic(path: Path, shape: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _labels = make_mosaic(shape, seed=seed)
    tifffile.imwrite(path, image, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")


def rcmseg(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def on_mosaic_grid(working: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The batch label map brought to the mosaic grid: nearest, factor 4; the rows/columns the
    working grid does not cover (size not a multiple of 4) are unlabelled."""
    expected = np.full(shape, UNLABELLED, np.uint8)
    blown_up = np.repeat(np.repeat(working, FACTOR, axis=0), FACTOR, axis=1)
    expected[: blown_up.shape[0], : blown_up.shape[1]] = blown_up
    return expected


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory) -> tuple[Path, Path]:
    """Mosaics (with a manifest for a.tif) and `rcmseg batch --geojson` outputs."""
    root = tmp_path_factory.mktemp("loop")
    for seed, (relative, shape) in enumerate(MOSAICS.items()):
        write_mosaic(root / "mosaics" / relative, shape, seed)
    (root / "mosaics" / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic\na.tif,,P7,L3,C2\n", encoding="utf-8"
    )
    pre = root / "pre"
    result = rcmseg("batch", root / "mosaics", "--out", pre, "--geojson", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return root / "mosaics", pre


@pytest.fixture(scope="module")
def imported(batch_run, tmp_path_factory) -> tuple[Path, Path, object]:
    """The batch GeoJSON of a.tif and sub/b.tif as "QuPath exports" (c.tif has none)."""
    mosaics, pre = batch_run
    exported = tmp_path_factory.mktemp("exported")
    shutil.copy(pre / "a.geojson", exported / "a.geojson")
    (exported / "sub").mkdir()
    shutil.copy(pre / "sub" / "b.geojson", exported / "sub" / "b.geojson")
    dataset = tmp_path_factory.mktemp("dataset")
    result = rcmseg("labels", "import", mosaics, "--annotations", exported, "--out", dataset)
    return exported, dataset, result


def test_batch_geojson_is_valid_for_qupath(batch_run):
    _mosaics, pre = batch_run
    for path in (pre / "a.geojson", pre / "sub" / "b.geojson"):
        collection = json.loads(path.read_text(encoding="utf-8"))
        assert collection["type"] == "FeatureCollection" and collection["features"]
        for feature in collection["features"]:
            assert feature["geometry"]["type"] == "Polygon"
            assert to_shape(feature["geometry"]).is_valid
            assert feature["properties"]["objectType"] == "annotation"
            assert isinstance(feature["properties"]["measurements"], dict)
            assert set(feature["properties"]["classification"]) == {"name", "color"}


def test_round_trip_equals_the_batch_labels_on_every_mosaic_pixel(batch_run, imported):
    _mosaics, pre = batch_run
    _exported, dataset, result = imported
    assert result.exit_code == 0, result.output
    for relative, shape in MOSAICS.items():
        stem = relative[: -len(".tif")]
        if relative == "c.tif":
            assert not (dataset / "labels" / f"{stem}.png").exists()
            continue
        labels = np.asarray(Image.open(dataset / "labels" / f"{stem}.png"))
        working = tifffile.imread(pre / f"{stem}.labels.tif")
        assert labels.shape == shape and labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, on_mosaic_grid(working, shape))


def test_manifest_and_summary(batch_run, imported):
    mosaics, _pre = batch_run
    _exported, dataset, result = imported
    rows = {Path(row["mosaic"]).name: row for row in read_csv(dataset / "manifest.csv")}
    assert set(rows) == {"a.tif", "b.tif", "c.tif"}
    assert rows["a.tif"]["mosaic"] == str((mosaics / "a.tif").resolve())  # outside: absolute
    assert rows["a.tif"]["labels"] == "labels/a.png"  # inside the data set: relative
    assert (rows["a.tif"]["patient"], rows["a.tif"]["lesion"], rows["a.tif"]["clinic"]) == (
        "P7",
        "L3",
        "C2",
    )
    assert (rows["b.tif"]["patient"], rows["b.tif"]["lesion"]) == ("b", "b")
    assert rows["c.tif"]["labels"] == ""
    summary = {row["mosaic"]: row for row in read_csv(dataset / "import_summary.csv")}
    assert summary["c.tif"]["status"] == "no annotations"
    b = summary["sub/b.tif"]
    assert b["status"] == "imported" and float(b["labelled_pct"]) == 100.0
    labels = np.asarray(Image.open(dataset / "labels" / "sub" / "b.png"))
    assert (
        sum(int(b[f"px_{n}"]) for n in ("background", "artifact", "meshwork"))
        + sum(int(b[f"px_{n}"]) for n in ("nested", "ring", "aspecific"))
        == (labels != UNLABELLED).sum()
    )
    assert "no annotations" in result.output and "sub/b.tif" in result.output
    assert not list(dataset.rglob(f"*{PARTIAL_MARKER}*"))
    cases = read_manifest(dataset)
    image, labels = load_case(next(c for c in cases if c.mosaic.name == "a.tif"))
    assert image.shape == labels.shape == (97, 120)


def test_rerun_updates_its_rows_keeps_the_others_and_a_bad_file_fails_alone(
    batch_run, imported, tmp_path
):
    mosaics, _pre = batch_run
    _exported, first, _result = imported
    dataset = tmp_path / "dataset"
    shutil.copytree(first, dataset)
    again = tmp_path / "again"
    again.mkdir()
    square = [[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [square]},
        "properties": {"objectType": "annotation", "classification": "Nested"},
    }
    (again / "c.geojson").write_text(json.dumps([feature]))
    (again / "a.geojson").write_text('{"type": "FeatureCollection", "features": [')  # broken
    result = rcmseg("labels", "import", mosaics, "--annotations", again, "--out", dataset)
    assert result.exit_code == 1
    assert "a.geojson" in result.output and "not valid JSON" in result.output
    summary = {row["mosaic"]: row for row in read_csv(dataset / "import_summary.csv")}
    assert summary["a.tif"]["status"] == "failed" and "\n" not in summary["a.tif"]["error"]
    assert summary["sub/b.tif"]["status"] == "no annotations"
    assert summary["c.tif"]["status"] == "imported"
    rows = {Path(row["mosaic"]).name: row for row in read_csv(dataset / "manifest.csv")}
    assert rows["a.tif"]["labels"] == "labels/a.png"  # failed: kept as it was
    assert rows["b.tif"]["labels"] == "labels/sub/b.png"  # no annotations now: kept
    assert rows["c.tif"]["labels"] == "labels/c.png"  # updated
    c = np.asarray(Image.open(dataset / "labels" / "c.png"))
    assert (c[:50, :100] == 3).all() and (c[50:] == UNLABELLED).all()
    assert (c[:, 100:] == UNLABELLED).all()


def test_training_runs_on_an_imported_dataset(imported, tmp_path):
    _exported, dataset, _result = imported
    run = tmp_path / "run"
    result = rcmseg(
        "train", "model", dataset, "--out", run, "--epochs", "1", "--batch-size", "2",
        "--patch-size", "64", "--iterations", "2", "--folds", "2", "--device", "cpu",
        "--no-progress", "--threads", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (run / "model.pt").is_file() and "1 epochs" in result.output


# ---------------------------------------------------------------------------------------------
# QuPath labelled-image exports


@pytest.fixture
def small_labels() -> np.ndarray:
    """A downsampled (by 4) label image: classes 0..5 in bands, an unlabelled band."""
    small = np.full((20, 30), UNLABELLED, np.uint8)
    for index in range(6):
        small[:, index * 4 : index * 4 + 4] = index
    small[15:, :] = 2
    return small


def palette_png(path: Path, values: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> None:
    picture = Image.fromarray(values, mode="P")
    palette = [255] * 768
    for index, colour in colours.items():
        palette[3 * index : 3 * index + 3] = colour
    picture.putpalette(palette)
    picture.save(path)


def test_indexed_png_export_is_read_by_index_and_upsampled(tmp_path, small_labels):
    path = tmp_path / "m.png"
    palette_png(path, small_labels, dict(enumerate(CLASS_COLOURS)))
    labels = read_label_image(path, (81, 122))  # 4x with one extra row and two columns
    expected = np.full((81, 122), UNLABELLED, np.uint8)
    expected[:80, :120] = np.repeat(np.repeat(small_labels, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(labels, expected)
    by_colour = read_label_image(path, (80, 120), colours="colour")  # palette colours
    np.testing.assert_array_equal(by_colour, expected[:80, :120])


def test_rgb_and_palette_tiff_exports(tmp_path, small_labels):
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(CLASS_COLOURS)] = CLASS_COLOURS
    lut[UNLABELLED] = (255, 255, 255)
    Image.fromarray(lut[small_labels]).save(tmp_path / "rgb.png")
    upsampled = upsample_labels(small_labels, 2, (40, 60))
    np.testing.assert_array_equal(read_label_image(tmp_path / "rgb.png", (40, 60)), upsampled)
    colormap = (lut.T.astype(np.uint16) * 257)[:, :256]
    tifffile.imwrite(tmp_path / "m.tif", small_labels, photometric="palette", colormap=colormap)
    np.testing.assert_array_equal(read_label_image(tmp_path / "m.tif", (40, 60)), upsampled)
    by_colour = read_label_image(tmp_path / "m.tif", (40, 60), colours="colour")
    np.testing.assert_array_equal(by_colour, upsampled)


def test_qupath_default_background_zero_is_remapped(tmp_path, small_labels):
    shifted = np.where(small_labels == UNLABELLED, 0, small_labels + 1).astype(np.uint8)
    Image.fromarray(shifted).save(tmp_path / "m.png")  # grayscale, 0 = unannotated
    values = {0: UNLABELLED} | {index + 1: index for index in range(6)}
    labels = read_label_image(tmp_path / "m.png", (20, 30), values)
    np.testing.assert_array_equal(labels, small_labels)
    with pytest.raises(InputError, match="6"):  # value 6 is no class without the table
        read_label_image(tmp_path / "m.png", (20, 30))


@pytest.mark.parametrize(
    ("shape", "problem"), [((50, 75), "2.5 x 2.5 is not one integer"), ((40, 90), "not one")]
)
def test_non_integer_downsample_is_a_one_line_error(tmp_path, small_labels, shape, problem):
    Image.fromarray(small_labels).save(tmp_path / "m.png")
    with pytest.raises(InputError, match=problem) as caught:
        read_label_image(tmp_path / "m.png", shape)
    assert "\n" not in str(caught.value) and "30x20" in str(caught.value)


def test_unknown_colour_is_an_error_naming_it(tmp_path):
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[2, 3] = (12, 34, 56)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    with pytest.raises(InputError, match=r"\(12, 34, 56\).*not class colours"):
        read_label_image(tmp_path / "m.png", (10, 10))


def test_import_picks_geojson_first_and_images_with_format_image(tmp_path, small_labels):
    write_mosaic(tmp_path / "mosaics" / "m.tif", (80, 120), seed=3)
    exports = tmp_path / "exports"
    exports.mkdir()
    palette_png(exports / "m.png", small_labels, dict(enumerate(CLASS_COLOURS)))
    square = [[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}
    feature["properties"] = {"classification": {"name": "ring", "color": [0, 0, 255]}}
    (exports / "m.geojson").write_text(json.dumps(feature))
    auto = import_labels(tmp_path / "mosaics", exports, tmp_path / "d1")
    assert auto[0].annotations.endswith("m.geojson") and auto[0].class_px["ring"] == 64
    image = import_labels(tmp_path / "mosaics", exports, tmp_path / "d2", fmt="image")
    assert image[0].annotations.endswith("m.png")
    labels = np.asarray(Image.open(tmp_path / "d2" / "labels" / "m.png"))
    np.testing.assert_array_equal(labels, upsample_labels(small_labels, 4, (80, 120)))


def test_mosaics_inside_the_dataset_get_relative_paths(tmp_path):
    dataset = tmp_path / "dataset"
    write_mosaic(dataset / "mosaics" / "m.tif", (64, 64), seed=4)
    exports = tmp_path / "exports"
    exports.mkdir()
    square = [[0, 0], [64, 0], [64, 32], [0, 32], [0, 0]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}
    feature["properties"] = {"classification": "meshwork"}
    (exports / "m.geojson").write_text(json.dumps(feature))
    import_labels(dataset / "mosaics", exports, dataset)
    import_labels(dataset / "mosaics", exports, dataset)  # again: the same single row
    assert read_csv(dataset / "manifest.csv") == [
        {
            "mosaic": "mosaics/m.tif",
            "labels": "labels/m.png",
            "patient": "m",
            "lesion": "m",
            "clinic": "",
        }
    ]
    # a pixel size the lab added to the manifest by hand survives the next import
    text = (dataset / "manifest.csv").read_text().splitlines()
    (dataset / "manifest.csv").write_text(f"{text[0]},mosaic_mpp\n{text[1]},0.8\n")
    import_labels(dataset / "mosaics", exports, dataset)
    assert read_csv(dataset / "manifest.csv")[0]["mosaic_mpp"] == "0.8"


def test_annotations_kept_beside_the_mosaics(tmp_path, small_labels):
    """QuPath exports saved in the mosaic folder itself: a GeoJSON, and a labelled image beside
    a TIFF mosaic, are each paired with their mosaic, and the labelled image is not a mosaic."""
    folder = tmp_path / "mosaics"
    write_mosaic(folder / "m.tif", (80, 120), seed=3)
    write_mosaic(folder / "n.tif", (80, 120), seed=5)
    write_mosaic(folder / "bare.tif", (64, 64), seed=6)
    square = [[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}
    feature["properties"] = {"classification": {"name": "ring", "color": [0, 0, 255]}}
    (folder / "m.geojson").write_text(json.dumps(feature))
    palette_png(folder / "n.png", small_labels, dict(enumerate(CLASS_COLOURS)))
    (folder / "old.labels.tif").write_bytes((folder / "m.tif").read_bytes())  # a batch output

    (folder / "n.geojson").write_text(json.dumps(feature))  # both kinds of export beside n.tif
    geojson_only = import_labels(folder, folder, tmp_path / "geojson", fmt="geojson")
    assert [result.mosaic for result in geojson_only] == ["bare.tif", "m.tif", "n.tif"]
    (folder / "n.geojson").unlink()

    results = import_labels(folder, folder, tmp_path / "dataset")
    found = [(result.mosaic, Path(result.annotations).name, result.status) for result in results]
    assert found == [
        ("bare.tif", "", "no annotations"),
        ("m.tif", "m.geojson", "imported"),
        ("n.tif", "n.png", "imported"),
    ]
    assert results[1].class_px["ring"] == 64
    labels = np.asarray(Image.open(tmp_path / "dataset" / "labels" / "n.png"))
    np.testing.assert_array_equal(labels, upsample_labels(small_labels, 4, (80, 120)))


def test_qupath_docs_labelled_image_name_is_found(tmp_path, small_labels):
    """QuPath's documentation exports "<image name>-labels.png" (background 0, downsampled)."""
    write_mosaic(tmp_path / "mosaics" / "m.tif", (80, 120), seed=3)
    exports = tmp_path / "export"
    exports.mkdir()
    palette_png(exports / "m-labels.png", small_labels, dict(enumerate(CLASS_COLOURS)))
    results = import_labels(tmp_path / "mosaics", exports, tmp_path / "dataset")
    assert [(r.status, Path(r.annotations).name) for r in results] == [("imported", "m-labels.png")]
    labels = np.asarray(Image.open(tmp_path / "dataset" / "labels" / "m.png"))
    np.testing.assert_array_equal(labels, upsample_labels(small_labels, 4, (80, 120)))


def test_a_file_name_that_is_not_utf8_fails_alone_and_the_manifest_stays_utf8(
    tmp_path, small_labels
):
    """A Latin-1 name from an old share (bytes that are not UTF-8) cannot be written into a UTF-8
    manifest that reads back to the same file: that mosaic fails in one line naming it, the
    others are imported, and manifest.csv stays valid UTF-8."""
    mosaics, exports = tmp_path / "mosaics", tmp_path / "export"
    latin1 = os.fsdecode(b"caf\xe9")
    for name in ("ok", latin1):
        write_mosaic(mosaics / f"{name}.tif", (80, 120), seed=3)
        exports.mkdir(exist_ok=True)
        palette_png(exports / f"{name}.png", small_labels, dict(enumerate(CLASS_COLOURS)))
    results = {r.mosaic: r for r in import_labels(mosaics, exports, tmp_path / "dataset")}
    assert results["ok.tif"].status == "imported"
    assert results[f"{latin1}.tif"].status == "failed"
    assert "file name is not UTF-8" in results[f"{latin1}.tif"].error
    manifest = (tmp_path / "dataset" / "manifest.csv").read_bytes().decode("utf-8")
    assert "ok.tif" in manifest and "caf" not in manifest
    assert b"caf\xe9" in (tmp_path / "dataset" / "import_summary.csv").read_bytes()


def test_mosaics_that_differ_only_by_ending_get_label_maps_of_their_own(tmp_path):
    """`a.tif` and `a.TIF` beside each other (a case-sensitive file system), each with its own
    QuPath export named after the image: two label maps, neither overwriting the other."""
    for name, seed in (("a.tif", 1), ("a.TIF", 2)):
        write_mosaic(tmp_path / "mosaics" / name, (32, 32), seed=seed)
    exports = tmp_path / "exports"
    exports.mkdir()
    square = [[0, 0], [16, 0], [16, 16], [0, 16], [0, 0]]
    for name, pattern in (("a.tif", "meshwork"), ("a.TIF", "ring")):
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}
        feature["properties"] = {"classification": pattern}
        (exports / f"{name}.geojson").write_text(json.dumps(feature))
    import_labels(tmp_path / "mosaics", exports, tmp_path / "d")
    rows = {row["mosaic"]: row["labels"] for row in read_csv(tmp_path / "d" / "manifest.csv")}
    assert sorted(rows.values()) == ["labels/a_TIF.png", "labels/a_tif.png"]
    for name, pattern in (("a.tif", "meshwork"), ("a.TIF", "ring")):
        labels = np.asarray(Image.open(tmp_path / "d" / rows[str(tmp_path / "mosaics" / name)]))
        assert labels[0, 0] == CLASS_NAMES.index(pattern), name


def test_import_names_a_linked_folder_that_leads_nowhere(batch_run, imported, tmp_path):
    """A patient's folder linked from a share that is not mounted: its mosaics cannot be paired
    with their annotations, so the import says which link leads nowhere."""
    mosaics, _pre = batch_run
    exported, _dataset, _result = imported
    linked = tmp_path / "mosaics"
    shutil.copytree(mosaics, linked)
    (linked / "patient02").symlink_to(tmp_path / "unmounted" / "patient02")
    result = rcmseg("labels", "import", linked, "--annotations", exported, "--out", tmp_path / "d")
    output = " ".join(result.output.split())
    assert "note: under" in output and "1 link(s) lead nowhere" in output
    assert (tmp_path / "d" / "manifest.csv").is_file()  # the rest is imported


def test_import_table_fits_80_columns_and_names_only_what_is_there():
    # it used to be 12 columns printed 200 wide: every row wrapped on a terminal
    imported = MosaicImport("P001_L2.tif", status="imported", labelled_pct=15.3)
    imported.class_px.update(ring=640000, meshwork=1200)
    imported.ignored_objects, imported.clipped = 2, 1
    untouched = MosaicImport("P002_L1[b].tif")  # text, not rich markup

    def rendered(width: int) -> list[str]:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(import_table([imported, untouched]))
        return console.export_text().splitlines()

    assert max(len(line) for line in rendered(80)) <= 80
    lines = rendered(200)
    (row,) = [line for line in lines if imported.mosaic in line]
    assert "imported" in row and "15.3" in row and "meshwork 1200, ring 640000" in row
    assert "2 ignored, 1 clipped" in row and "nested" not in row and "overlapping" not in row
    (row,) = [line for line in lines if untouched.mosaic in line]
    assert "no annotations" in row
