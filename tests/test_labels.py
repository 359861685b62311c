"""Label maps: round trips through PNG/TIFF/NIfTI/NRRD, remapping, validation, 4x vote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
from PIL import Image

from rcmseg.classes import UNLABELLED
from rcmseg.errors import InputError
from rcmseg.io.labels import downsample_labels, load_remap_table, read_label_map, read_remap
from rcmseg.io.mosaics import read_mosaic


def asymmetric_labels(height: int = 40, width: int = 56) -> np.ndarray:
    """A map whose transpose or mirror differs from it: every class plus unlabelled."""
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 2, 3, 4, 5, 255], dtype=np.uint8), size=(height, width))
    labels[:5, :9] = 3  # a block in the top-left corner only
    return labels


def test_png_grayscale_and_palette_round_trip(tmp_path: Path) -> None:
    labels = asymmetric_labels()
    Image.fromarray(labels).save(tmp_path / "grey.png")
    palette = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    palette.putpalette([value for i in range(256) for value in (i, 255 - i, 0)])
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_label_map(tmp_path / "grey.png"), labels)
    np.testing.assert_array_equal(read_label_map(tmp_path / "palette.png"), labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_round_trip(tmp_path: Path, dtype: type) -> None:
    labels = asymmetric_labels()
    tifffile.imwrite(tmp_path / "labels.tif", labels.astype(dtype), compression="zlib")
    result = read_label_map(tmp_path / "labels.tif")
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, labels)


def test_nifti_label_map_lines_up_with_a_nifti_mosaic(tmp_path: Path) -> None:
    """NIfTI voxel (i, j) is (column, row), as ITK/Seg3D write it: map and mosaic agree."""
    labels = asymmetric_labels()
    mosaic = np.where(labels == UNLABELLED, 250, labels.astype(np.int32) * 40).astype(np.uint8)
    # ITK-style header: x and y flipped (LPS), 0.5 µm voxels in mm; data indexed (x, y, z).
    affine = np.diag([-0.0005, -0.0005, 0.001, 1.0])
    nibabel.save(nibabel.Nifti1Image(labels.T[:, :, None], affine), tmp_path / "labels.nii.gz")
    nibabel.save(nibabel.Nifti1Image(mosaic.T[:, :, None], affine), tmp_path / "mosaic.nii")
    read_labels = read_label_map(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(read_labels, labels)
    image, info = read_mosaic(tmp_path / "mosaic.nii", target_mpp=0.5)
    assert image.shape == read_labels.shape
    np.testing.assert_array_equal(image.astype(np.uint8), mosaic)


def test_nifti_volume_with_several_slices_is_refused(tmp_path: Path) -> None:
    volume = np.zeros((8, 6, 3), dtype=np.uint8)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "stack.nii")
    with pytest.raises(InputError, match="3 slices"):
        read_label_map(tmp_path / "stack.nii")


def test_nrrd_from_seg3d_round_trip(tmp_path: Path) -> None:
    import nrrd  # pynrrd: a test dependency (optional for users)

    labels = asymmetric_labels()
    header = {"space dimension": 2, "space directions": [[0.5, 0.0], [0.0, 0.5]]}
    nrrd.write(str(tmp_path / "labels.nrrd"), labels.T.copy(), header, index_order="F")
    np.testing.assert_array_equal(read_label_map(tmp_path / "labels.nrrd"), labels)


def test_nrrd_without_pynrrd_names_the_package(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "labels.nrrd"
    path.write_bytes(b"NRRD0004\n")
    monkeypatch.setitem(sys.modules, "nrrd", None)  # as if pynrrd were not installed
    with pytest.raises(InputError, match="pynrrd") as error:
        read_label_map(path)
    assert str(error.value).startswith(str(path))


def test_values_outside_the_table_give_one_line_naming_the_file(tmp_path: Path) -> None:
    labels = asymmetric_labels()
    labels[0, 0] = 7
    labels[1, 1] = 9
    path = tmp_path / "seven.png"
    Image.fromarray(labels).save(path)
    with pytest.raises(InputError) as error:
        read_label_map(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "7, 9" in message and "remapping" in message


def test_remap_table_from_json_and_csv(tmp_path: Path) -> None:
    # An encoding with other class indices and 7 = unlabelled.
    source = np.array([[0, 1, 2], [3, 4, 5], [7, 7, 0]], dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "other.png")
    table = {
        "0": "ring",
        "1": "nested",
        "2": 2,
        "3": "aspecific",
        "4": 0,
        "5": 1,
        "7": "unlabelled",
    }
    (tmp_path / "table.json").write_text(json.dumps(table))
    (tmp_path / "table.csv").write_text(
        "source,target\n" + "\n".join(f"{k},{v}" for k, v in table.items())
    )
    # As a spreadsheet in a decimal-comma locale saves it: byte-order mark, ';', CRLF.
    rows = ["Source;Target", *(f"{k};{v}" for k, v in table.items())]
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    expected = np.array([[4, 3, 2], [5, 0, 1], [255, 255, 4]], dtype=np.uint8)
    for name in ("table.json", "table.csv", "excel.csv"):
        remap = load_remap_table(tmp_path / name)
        assert remap[7] == UNLABELLED and remap[0] == 4
        np.testing.assert_array_equal(read_label_map(tmp_path / "other.png", remap), expected)
    # Excel's plain "CSV" on Western European Windows: Windows-1252, a class name with an accent.
    (tmp_path / "ansi.csv").write_bytes(
        "source;target\r\nNævus junctional;nested\r\n".encode("cp1252")
    )
    assert read_remap(tmp_path / "ansi.csv").names == {"nævus junctional": 3}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"7": "tumour"}', "unknown"),
        ('{"7": 6}', "not a class"),
        ('{"x": 1}', "0..255"),
        ("[1, 2]", "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_remap_tables(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(InputError, match=problem):
        load_remap_table(path)


def test_unreadable_and_unsuitable_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="cannot read label map"):
        read_label_map(corrupt)
    with pytest.raises(InputError, match="does not exist"):
        read_label_map(tmp_path / "missing.tif")
    with pytest.raises(InputError, match="unknown label map format"):
        read_label_map(tmp_path / "labels.jpg")
    colour = tmp_path / "colour.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(colour)
    with pytest.raises(InputError, match="mode RGB"):
        read_label_map(colour)
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, np.full((4, 4), 1.5, dtype=np.float32))
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(floats)


def test_downsample_vote_on_a_crafted_example() -> None:
    labels = np.full((8, 10), UNLABELLED, dtype=np.uint8)
    # Block (0, 0): 9 unlabelled, 7 labelled -> unlabelled (most fine pixels unlabelled).
    labels[0, :4] = 2
    labels[1, :3] = 2
    # Block (0, 1): 8 unlabelled, 5 of class 4, 3 of class 1 -> labelled (not most), class 4.
    labels[0:2, 4:8] = 4
    labels[1, 5:8] = 1
    # Block (1, 0): 8 of class 3 and 8 of class 5: tie goes to the lower index.
    labels[4:6, 0:4] = 3
    labels[6:8, 0:4] = 5
    # Block (1, 1): all 1 except one unlabelled pixel.
    labels[4:8, 4:8] = 1
    labels[7, 7] = UNLABELLED
    # Partial blocks at the right edge (2 columns): (0, 2) one class-0 pixel of 8 -> unlabelled;
    # (1, 2) five class-0 pixels of 8 -> class 0.
    labels[0, 8] = 0
    labels[4:6, 8:10] = 0
    labels[6, 8] = 0
    expected = np.array([[255, 4, 255], [3, 1, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample_labels(labels, 4), expected)


def _reference_vote(labels: np.ndarray, factor: int) -> np.ndarray:
    """Straightforward loop version of the documented rule."""
    rows, cols = -(-labels.shape[0] // factor), -(-labels.shape[1] // factor)
    out = np.empty((rows, cols), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            block = labels[r * factor : (r + 1) * factor, c * factor : (c + 1) * factor].ravel()
            counts = np.bincount(block[block != UNLABELLED], minlength=6)
            unlabelled = np.sum(block == UNLABELLED)
            out[r, c] = UNLABELLED if unlabelled > counts.sum() else np.argmax(counts)
    return out


@pytest.mark.parametrize("factor", [2, 4, 5])
def test_downsample_matches_the_rule_on_random_maps(factor: int, monkeypatch) -> None:
    import rcmseg.io.labels as labels_module

    monkeypatch.setattr(labels_module, "_DOWNSAMPLE_STRIP_ROWS", 12)  # several strips
    rng = np.random.default_rng(factor)
    labels = rng.choice(np.array([0, 1, 2, 3, 4, 5, 255], dtype=np.uint8), size=(61, 47))
    labels[rng.random(labels.shape) < 0.3] = UNLABELLED
    np.testing.assert_array_equal(
        downsample_labels(labels, factor), _reference_vote(labels, factor)
    )
