"""Data set layout: manifest.csv, Case, loading a case at the working resolution."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcmseg.classes import UNLABELLED
from rcmseg.errors import InputError
from rcmseg.io.dataset import Case, load_case, pixel_size_note, read_manifest, write_manifest
from rcmseg.io.labels import downsample_labels
from rcmseg.synth import write_mosaic_tiff

HEADER = "mosaic,labels,patient,lesion,clinic\n"


def make_case_files(root: Path, name: str, shape: tuple[int, int], label_shape=None) -> None:
    """A mosaic TIFF (0.5 µm/px) and a label PNG whose classes follow the mosaic's intensity."""
    (root / "mosaics").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    labels = ((rows // 16 + cols // 24) % 6).astype(np.uint8)
    labels[:, : shape[1] // 5] = UNLABELLED
    image = (30 + 35 * (labels % 6)).astype(np.uint8)
    write_mosaic_tiff(root / "mosaics" / f"{name}.tif", image)
    if label_shape is not None:
        labels = np.zeros(label_shape, dtype=np.uint8)
    Image.fromarray(labels).save(root / "labels" / f"{name}.png")


def test_read_manifest_resolves_paths_and_keeps_metadata(tmp_path: Path) -> None:
    make_case_files(tmp_path, "a", (64, 64))
    make_case_files(tmp_path, "b", (64, 64))
    (tmp_path / "manifest.csv").write_text(
        HEADER + "mosaics/a.tif,labels/a.png,P1,P1-L1,Milan\nmosaics/b.tif,,P2,P2-L1,NYC\n"
    )
    cases = read_manifest(tmp_path)
    assert cases[0] == Case(
        tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P1", "P1-L1", "Milan"
    )
    assert cases[1].labels is None and cases[1].clinic == "NYC"
    assert read_manifest(tmp_path / "manifest.csv") == cases


def test_write_manifest_round_trips(tmp_path: Path) -> None:
    make_case_files(tmp_path, "a", (32, 32))
    case = Case(tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P9", "L", "C")
    write_manifest(tmp_path, [case])
    assert (tmp_path / "manifest.csv").read_text().splitlines()[1].startswith("mosaics/a.tif,")
    assert read_manifest(tmp_path) == [case]


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_a_manifest_saved_by_a_spreadsheet_on_windows_is_read(tmp_path: Path, delimiter) -> None:
    """Excel where the decimal mark is a comma saves CSV with ';', with a byte-order mark, CRLF,
    capitalised headers as typed, and the backslashes of Windows paths."""
    make_case_files(tmp_path, "a", (32, 32))
    rows = [
        ["Mosaic", "Labels", "Patient", "Lesion", "Clinic"],
        ["mosaics\\a.tif", "labels\\a.png", "P1", "L1", "Modena"],
    ]
    text = "\r\n".join(delimiter.join(row) for row in rows) + "\r\n"
    (tmp_path / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_manifest(tmp_path) == [
        Case(tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P1", "L1", "Modena")
    ]


def test_a_manifest_saved_as_excels_plain_csv_on_windows_is_read(tmp_path: Path) -> None:
    """Excel's plain "CSV" on Western European Windows is Windows-1252, not UTF-8: a lesion or
    file name with ü, é or ø must still be read as written."""
    make_case_files(tmp_path, "Müller", (32, 32))
    rows = [
        ["mosaic", "labels", "patient", "lesion", "clinic"],
        ["mosaics\\Müller.tif", "labels\\Müller.png", "P1", "Nævus é", "Køge"],
    ]
    text = "\r\n".join(";".join(row) for row in rows) + "\r\n"
    (tmp_path / "manifest.csv").write_bytes(text.encode("cp1252"))
    assert read_manifest(tmp_path) == [
        Case(
            tmp_path / "mosaics/Müller.tif", tmp_path / "labels/Müller.png", "P1", "Nævus é", "Køge"
        )
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("mosaic,labels,patient\nmosaics/a.tif,,P1\n", "lacks the column(s) lesion, clinic"),
        (HEADER, "no mosaics"),
        (HEADER + "mosaics/missing.tif,,P1,L1,C1\n", "line 2: mosaic mosaics/missing.tif"),
        (HEADER + "mosaics/a.tif,labels/none.png,P1,L1,C1\n", "line 2: label map labels/none"),
        (HEADER + ",,P1,L1,C1\n", "line 2: the mosaic column is empty"),
        (
            "mosaic,labels,patient,lesion,clinic,mosaic_mpp\nmosaics/a.tif,,P1,L1,C1,0.5um\n",
            "line 2: mosaic_mpp '0.5um' is not a pixel size in µm above 0",
        ),
        (
            "mosaic,labels,patient,lesion,clinic,mosaic_mpp\nmosaics/a.tif,,P1,L1,C1,0\n",
            "line 2: mosaic_mpp '0' is not a pixel size in µm above 0",
        ),
    ],
)
def test_bad_manifests_give_one_line_errors(tmp_path: Path, content: str, problem: str) -> None:
    make_case_files(tmp_path, "a", (32, 32))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    with pytest.raises(InputError) as error:
        read_manifest(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{manifest}: ") and problem in message and "\n" not in message


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest does not exist"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("shape", [(256, 384), (258, 391)])
def test_load_case_gives_aligned_image_and_labels_at_2_um(tmp_path: Path, shape) -> None:
    make_case_files(tmp_path, "a", shape)
    case = Case(tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P", "L", "C")
    image, labels = load_case(case)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert image.shape == labels.shape == (shape[0] // 4, shape[1] // 4)
    full_labels = np.asarray(Image.open(case.labels))
    expected = downsample_labels(full_labels, 4)[: shape[0] // 4, : shape[1] // 4]
    np.testing.assert_array_equal(labels, expected)
    # Where a whole 4x4 block has one class, the averaged image shows that class's intensity.
    labelled = labels != UNLABELLED
    agree = np.abs(image[labelled] - (30 + 35 * labels[labelled])) < 0.5
    assert agree.mean() > 0.6


def test_load_case_without_labels_is_all_unlabelled(tmp_path: Path) -> None:
    make_case_files(tmp_path, "a", (64, 96))
    image, labels = load_case(Case(tmp_path / "mosaics/a.tif", None, "P", "L", "C"))
    assert labels.shape == image.shape == (16, 24) and np.all(labels == UNLABELLED)


def test_load_case_with_a_remapping_table(tmp_path: Path) -> None:
    make_case_files(tmp_path, "a", (64, 64))
    case = Case(tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P", "L", "C")
    _, plain = load_case(case)
    _, remapped = load_case(case, remap={2: UNLABELLED})
    assert np.any(plain == 2) and not np.any(remapped == 2)


def test_label_map_of_another_size_names_the_file_and_both_sizes(tmp_path: Path) -> None:
    make_case_files(tmp_path, "a", (64, 96), label_shape=(16, 24))
    case = Case(tmp_path / "mosaics/a.tif", tmp_path / "labels/a.png", "P", "L", "C")
    with pytest.raises(InputError) as error:
        load_case(case)
    message = str(error.value)
    assert message.startswith(str(case.labels)) and "24x16" in message and "96x64" in message


def test_a_manifest_gives_the_pixel_size_of_mosaics_whose_files_carry_none(tmp_path: Path) -> None:
    """A PNG export at 1 µm/px carries no pixel size: without `mosaic_mpp` it would be read at
    0.5 µm/px (the scale the network sees halved); with it, at its own size. A pixel size in
    the file wins over the column; the column round-trips, and is written only when used."""
    (tmp_path / "mosaics").mkdir()
    (tmp_path / "labels").mkdir()
    grey = (np.arange(400 * 480) % 251).astype(np.uint8).reshape(400, 480)
    Image.fromarray(grey).save(tmp_path / "mosaics" / "png.png")
    Image.fromarray(np.full((400, 480), 2, np.uint8)).save(tmp_path / "labels" / "png.png")
    write_mosaic_tiff(tmp_path / "mosaics" / "tif.tif", grey)  # carries 0.5 µm/px
    (tmp_path / "manifest.csv").write_text(
        "mosaic;labels;patient;lesion;clinic;Mosaic_MPP\n"  # as a European spreadsheet saves it
        "mosaics/png.png;labels/png.png;P1;L1;C;1,0\nmosaics/tif.tif;;P2;L2;C;1.0\n"
    )
    cases = read_manifest(tmp_path)
    assert [case.mosaic_mpp for case in cases] == [1.0, 1.0]
    image, labels = load_case(cases[0])
    assert image.shape == labels.shape == (200, 240)  # 1 µm/px → 2 µm/px, not (100, 120)
    assert load_case(cases[1])[0].shape == (100, 120)  # the file's own 0.5 µm/px
    assert pixel_size_note(cases) is None
    plain = [replace(case, mosaic_mpp=None) for case in cases]
    assert load_case(plain[0])[0].shape == (100, 120)
    note = pixel_size_note(plain)
    assert note is not None and note.startswith("1 mosaic(s) carry no pixel size (png.png)")
    assert "mosaic_mpp column" in note
    write_manifest(tmp_path, cases)
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0].endswith(",clinic,mosaic_mpp")
    assert read_manifest(tmp_path) == cases
    write_manifest(tmp_path, plain)
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0].endswith(",clinic")


def test_the_label_app_sizes_studies_from_their_manifest_and_rereads_it(tmp_path: Path) -> None:
    """`rcmseg label serve`: STUDIES/manifest.csv sizes the mosaics it lists, --mpp the rest;
    an edited manifest applies to the next request, a header-only one sizes nothing."""
    from rcmseg.label_app.pixel_sizes import StudyPixelSizes

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    sizes = StudyPixelSizes(tmp_path, 0.8)
    assert sizes.fallback_mpp(tmp_path / "a.png") == 0.8  # no manifest yet
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("mosaic;labels;patient;lesion;clinic;mosaic_mpp\na.png;;p;l;;1,25\n")
    assert sizes.fallback_mpp(tmp_path / "a.png") == 1.25
    assert sizes.fallback_mpp(tmp_path / "b.png") == 0.8
    manifest.write_text("mosaic,labels,patient,lesion,clinic,mosaic_mpp\na.png,,p,l,,2\n")
    assert sizes.fallback_mpp(tmp_path / "a.png") == 2.0
    manifest.write_text("mosaic,labels,patient,lesion,clinic\n")
    assert sizes.fallback_mpp(tmp_path / "a.png") == 0.8
    manifest.write_text("mosaic,labels,patient,lesion,clinic,mosaic_mpp\nc.png,,p,l,,2\n")
    with pytest.raises(InputError, match="c.png"):  # a listed file that is not there
        sizes.fallback_mpp(tmp_path / "a.png")
    with pytest.raises(InputError, match="--mpp inf"):
        StudyPixelSizes(tmp_path, float("inf"))
