"""`rcmseg batch` end to end on a synthetic folder with good and bad mosaics."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tiffslide
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from rcmseg.batch import BatchOptions, run_batch
from rcmseg.classes import CLASS_NAMES
from rcmseg.cli.main import app
from rcmseg.io.atomic import PARTIAL_MARKER
from rcmseg.io.writers import is_complete_label_tiff
from rcmseg.report import MosaicRecord, lesion_rows, summary_table
from rcmseg.synth.mosaic import make_mosaic

torch.set_num_threads(2)
PIXEL_MM2 = 2.0 * 2.0 * 1e-6  # one working pixel (2 µm/px) in mm²

# Good mosaics: relative path -> working-resolution (H, W) at 2 µm/px (all stored at 0.5 µm/px).
GOOD = {
    "mosaics/a1.tif": (256, 320),
    "mosaics/a2.tif": (200, 275),
    "mosaics/small.tif": (100, 150),  # smaller than a window of either preset: padded
    "mosaics/deep16.tif": (200, 200),  # 12-bit values stored as uint16
    "mosaics/sub/b.png": (175, 225),  # no pixel size in the file: --mpp fallback 0.5
    # a name outside ASCII: the label TIFF's description (which names the source) must stay
    # within TIFF's 7-bit ASCII tags, or the write fails
    "mosaics/sub/Müller 名前.tif": (96, 128),
}
BAD = {
    "mosaics/corrupt.tif": "",  # a text file
    "mosaics/truncated.tif": "",  # a TIFF cut in half
    "mosaics/tiny.tif": "too small",  # 25×25 px at 2 µm/px, below the 32 px minimum
}
LESIONS = {"mosaics/a1.tif": "L1", "mosaics/a2.tif": "L1", "mosaics/sub/b.png": "L2"}


def write_tiff(path: Path, image: np.ndarray, mpp: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")


def make_input_folder(root: Path) -> Path:
    """The synthetic input folder: good and bad mosaics, a manifest, a file to ignore."""
    for seed, (relative, (height, width)) in enumerate(GOOD.items()):
        image, _labels = make_mosaic((4 * height, 4 * width), seed=seed)
        path = root / relative
        if relative.endswith(".png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
        elif "deep16" in relative:
            write_tiff(path, image.astype(np.uint16) * 16)
        else:
            write_tiff(path, image)
    (root / "mosaics/corrupt.tif").write_text("this is not a TIFF\n")
    write_tiff(root / "mosaics/whole.tif", make_mosaic(400, seed=9)[0])
    data = (root / "mosaics/whole.tif").read_bytes()
    (root / "mosaics/truncated.tif").write_bytes(data[: len(data) // 2])
    (root / "mosaics/whole.tif").unlink()
    write_tiff(root / "mosaics/tiny.tif", make_mosaic(100, seed=10)[0])
    (root / "mosaics/notes.txt").write_text("not a mosaic")
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mosaic", "labels", "patient", "lesion", "clinic"])
        for relative, lesion in LESIONS.items():
            writer.writerow([relative, "", "P1", lesion, "C1"])
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def rcmseg(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [*args], env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory) -> Path:
    return make_input_folder(tmp_path_factory.mktemp("batch_in"))


@pytest.fixture(scope="module")
def first_run(input_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_out")
    result = rcmseg("batch", str(input_folder), "--out", str(out), "--device", "cpu")
    return result, out


def test_good_mosaics_get_label_tiffs_of_the_right_size_and_pixel_size(first_run):
    result, out = first_run
    assert result.exit_code == 1  # some mosaics failed
    for relative, shape in GOOD.items():
        labels_tif = out / relative.rsplit(".", 1)[0]
        labels_tif = labels_tif.with_name(labels_tif.name + ".labels.tif")
        labels = tifffile.imread(labels_tif)
        assert labels.shape == shape and labels.dtype == np.uint8
        assert labels.max() < len(CLASS_NAMES)
        with tiffslide.TiffSlide(labels_tif) as slide:
            assert slide.dimensions == (shape[1], shape[0])
            assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
            assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(2.0)
    assert "synthetic" in result.output  # the bundle's statement about its demo weights


def test_bad_mosaics_are_reported_and_nothing_else_is_lost(first_run):
    result, out = first_run
    rows = {row["mosaic"]: row for row in read_csv(out / "mosaics.csv")}
    assert set(rows) == set(GOOD) | set(BAD)  # notes.txt is not a mosaic
    for relative in GOOD:
        assert rows[relative]["status"] == "done"
        assert rows[relative]["error"] == ""
    for relative, problem in BAD.items():
        row = rows[relative]
        assert row["status"] == "failed"
        assert Path(relative).name in row["error"] and problem in row["error"]
        assert "\n" not in row["error"]
        assert Path(relative).name in result.output
        assert not list(out.rglob(Path(relative).stem + ".labels.tif"))
    assert rows["mosaics/sub/b.png"]["mpp_source"] == "fallback"
    assert rows["mosaics/a1.tif"]["mpp_source"] == "file"
    assert rows["mosaics/a1.tif"]["lesion"] == "L1"
    assert rows["mosaics/small.tif"]["lesion"] == "small"  # not in the manifest: its file name
    assert not list(out.rglob(f"*{PARTIAL_MARKER}*"))


def test_pattern_areas_add_up_and_match_a_count_on_the_label_images(first_run):
    _result, out = first_run
    header = next(csv.reader(open(out / "patterns.csv", encoding="utf-8")))
    assert "meshwork_pct_of_lesion_area" in header and "background_pct_of_lesion_area" not in header
    rows = {row["lesion"]: row for row in read_csv(out / "patterns.csv")}
    assert set(rows) == {
        "L1",
        "L2",
        "small",
        "deep16",
        "Müller 名前",
        "corrupt",
        "truncated",
        "tiny",
    }
    members = {"L1": ["mosaics/a1.tif", "mosaics/a2.tif"], "L2": ["mosaics/sub/b.png"]}
    for lesion, mosaics in members.items():
        row = rows[lesion]
        assert int(row["mosaics"]) == len(mosaics)
        counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
        for relative in mosaics:
            labels = tifffile.imread(out / relative.replace(Path(relative).suffix, ".labels.tif"))
            counts += np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))
        areas = [float(row[f"{name}_area_mm2"]) for name in CLASS_NAMES]
        analysed = float(row["analysed_area_mm2"])
        assert analysed == pytest.approx(sum(GOOD[m][0] * GOOD[m][1] for m in mosaics) * PIXEL_MM2)
        assert sum(areas) == pytest.approx(analysed, abs=1e-5)
        np.testing.assert_allclose(areas, counts * PIXEL_MM2, atol=1e-6)
        lesion_area = float(row["lesion_area_mm2"])
        assert lesion_area == pytest.approx(sum(areas[2:]), abs=1e-5)
        if lesion_area > 0:
            shares = [float(row[f"{name}_pct_of_lesion_area"]) for name in CLASS_NAMES[2:]]
            assert sum(shares) == pytest.approx(100.0, abs=0.01)
        for name, count in zip(CLASS_NAMES, counts, strict=True):
            confidence = row[f"{name}_mean_confidence"]
            assert (confidence == "") == (count == 0)
            if count:
                assert 1 / len(CLASS_NAMES) <= float(confidence) <= 1.0
        assert row["model"].startswith("DynUNet2D@") and row["bundle_version"]
    assert rows["corrupt"]["mosaics"] == "0" and rows["corrupt"]["mosaics_not_analysed"] == "1"


def test_continue_redoes_nothing_and_a_plain_rerun_is_refused(first_run, input_folder):
    _result, out = first_run
    labels_tif = out / "mosaics" / "a1.labels.tif"
    before = labels_tif.stat().st_mtime_ns
    refused = rcmseg("batch", str(input_folder), "--out", str(out), "--device", "cpu")
    assert refused.exit_code == 2
    assert "--continue" in refused.output and "Traceback" not in refused.output

    again = rcmseg("batch", str(input_folder), "--out", str(out), "--continue", "--device", "cpu")
    assert again.exit_code == 1  # the bad mosaics are tried again and fail again
    rows = {row["mosaic"]: row for row in read_csv(out / "mosaics.csv")}
    assert {rows[relative]["status"] for relative in GOOD} == {"skipped"}
    assert {rows[relative]["status"] for relative in BAD} == {"failed"}
    assert labels_tif.stat().st_mtime_ns == before


def test_overwrite_redoes_finished_mosaics(input_folder, tmp_path):
    one = tmp_path / "in"
    (one / "mosaics").mkdir(parents=True)
    shutil.copy(input_folder / "mosaics" / "small.tif", one / "mosaics" / "small.tif")
    out = one / "results"  # inside the input folder: its label TIFFs must not count as mosaics
    assert rcmseg("batch", str(one), "--out", str(out), "--device", "cpu").exit_code == 0
    labels_tif = out / "mosaics" / "small.labels.tif"
    first = tifffile.imread(labels_tif)
    before = labels_tif.stat().st_mtime_ns
    redo = rcmseg("batch", str(one), "--out", str(out), "--overwrite", "--device", "cpu")
    assert redo.exit_code == 0
    assert labels_tif.stat().st_mtime_ns != before
    np.testing.assert_array_equal(tifffile.imread(labels_tif), first)  # deterministic
    assert [row["status"] for row in read_csv(out / "mosaics.csv")] == ["done"]


def test_lesion_rows_sum_mosaics_and_weight_confidence_by_area():
    def record(mosaic, counts, confidence_sums, status="done"):
        return MosaicRecord(
            mosaic,
            "L",
            status,
            working_mpp=2.0,
            pixel_counts=counts,
            confidence_sums=confidence_sums,
        )

    records = [
        record("a.tif", (10, 0, 30, 0, 10, 0), (9.0, 0.0, 15.0, 0.0, 10.0, 0.0)),
        record("b.tif", (0, 20, 10, 0, 0, 0), (0.0, 10.0, 9.0, 0.0, 0.0, 0.0)),
        record("c.tif", (), (), status="failed"),
    ]
    (row,) = lesion_rows(records, CLASS_NAMES)
    assert (row["mosaics"], row["mosaics_not_analysed"]) == (2, 1)
    assert row["analysed_area_mm2"] == f"{80 * PIXEL_MM2:.6f}"
    assert row["lesion_area_mm2"] == f"{50 * PIXEL_MM2:.6f}"  # meshwork 40 + ring 10 px
    assert row["meshwork_pct_of_lesion_area"] == "80.000"
    assert row["ring_pct_of_lesion_area"] == "20.000"
    assert row["nested_pct_of_lesion_area"] == "0.000"
    assert row["meshwork_mean_confidence"] == "0.6000"  # (15 + 9) / 40
    assert row["artifact_mean_confidence"] == "0.5000"
    assert row["nested_mean_confidence"] == ""  # no pixel: no mean


def test_summary_table_fits_80_columns_with_whole_names_even_when_a_mosaic_failed():
    # why a mosaic failed is printed in full above the table, not folded into a column
    counts = (100, 0, 30, 0, 70, 0)
    records = [
        MosaicRecord(
            f"synth_{i:04d}.tif",
            f"synth_{i:04d}",
            "done",
            seconds=3.0,
            working_mpp=2.0,
            pixel_counts=counts,
        )
        for i in range(3)
    ]
    records.append(
        MosaicRecord(
            "broken_scan.tif",
            "broken_scan",
            "failed",
            error="broken_scan.tif: cannot read as TIFF: not a TIFF file",
        )
    )
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary_table(records))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for record in records:  # one row each, the name and lesion unbroken
        (row,) = [line for line in lines if record.mosaic in line]
        assert record.lesion in row and record.status in row
    assert "ring 70%" in "\n".join(lines)
    assert "error" not in lines[1] + lines[2]


def test_two_parts_cover_every_mosaic_exactly_once(input_folder, tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    chosen = ["mosaics/a1.tif", "mosaics/small.tif", "mosaics/corrupt.tif", "mosaics/tiny.tif"]
    for relative in chosen:
        (in_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(input_folder / relative, in_dir / relative)
    part0 = run_batch(
        in_dir, out, options=BatchOptions(device="cpu", num_parts=2, part_id=0), show_progress=False
    )
    mine0 = {record.mosaic for record in part0.records}
    pending = {record.mosaic for record in part0.all_records if record.status == "pending"}
    assert len(mine0) == 2 and pending == set(chosen) - mine0
    # The second part takes its share from torchrun's environment variables.
    part1 = rcmseg(
        "batch",
        str(in_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        env={"WORLD_SIZE": "2", "RANK": "1"},
    )
    assert part1.exit_code == 1  # its share holds a failing mosaic or two
    rows = {row["mosaic"]: row for row in read_csv(out / "mosaics.csv")}
    assert set(rows) == set(chosen)
    assert rows["mosaics/a1.tif"]["status"] == rows["mosaics/small.tif"]["status"] == "done"
    assert rows["mosaics/corrupt.tif"]["status"] == rows["mosaics/tiny.tif"]["status"] == "failed"
    records = [r for r in (out / "mosaics").rglob("*.summary.json")]
    assert len(records) == len(chosen)  # each mosaic processed once, by one part


def test_a_run_killed_while_writing_leaves_no_finished_looking_file(tmp_path):
    in_dir, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (48, 32), dtype=np.uint8), np.ones((64, 64), np.uint8))
    write_tiff(in_dir / "big.tif", image)  # 3072×2048 px → 768×512 px at 2 µm/px
    command = [
        sys.executable,
        "-m",
        "rcmseg.cli.main",
        "batch",
        str(in_dir),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--probabilities",
        "--uncertainty",
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        found = list(out.glob(f"*{PARTIAL_MARKER}*")) if out.is_dir() else []
        if found:
            os.kill(process.pid, signal.SIGKILL)
            partial = found[0]
            break
        time.sleep(0.002)
    process.wait(timeout=60)
    assert partial is not None, "the run finished before a partial file was seen"
    assert not (out / "big.summary.json").exists()  # the mosaic does not read as finished
    for kind in ("labels.tif", "probabilities.tif", "uncertainty.tif"):
        finished = out / f"big.{kind}"
        if finished.exists() and kind == "labels.tif":
            assert is_complete_label_tiff(finished, (768, 512))
        elif finished.exists():
            assert tifffile.imread(finished).shape[-2:] == (768, 512)
    resumed = rcmseg("batch", str(in_dir), "--out", str(out), "--continue", "--device", "cpu")
    assert resumed.exit_code == 0
    assert read_csv(out / "mosaics.csv")[0]["status"] == "done"
    assert is_complete_label_tiff(out / "big.labels.tif", (768, 512))
    assert not list(out.glob(f"*{PARTIAL_MARKER}*"))  # the killed run's leftovers are gone


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_keeps_finished_mosaics_reports_the_rest_pending_and_says_how_to_go_on(
    tmp_path, stop, signal_when
):
    """Ctrl-C (SIGINT) mid-batch, or SIGTERM (a cluster scheduler's time limit, `kill`): exit
    130 or 143 with one line naming what is kept, reports that say ``done`` only for finished
    mosaics, and a ``--continue`` that does the rest."""
    in_dir, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(1)
    for index in range(8):
        image = rng.integers(0, 256, (2048, 2048), dtype=np.uint8)
        write_tiff(in_dir / f"m{index}.tif", image)
    command = [sys.executable, "-m", "rcmseg.cli.main", "batch", str(in_dir), "--out", str(out)]
    command += ["--device", "cpu", "--no-progress"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as at a terminal, even when the tests run in a background job, which ignores SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    output = signal_when(process, lambda: any(out.glob("*.summary.json")), stop)
    assert process.returncode == 128 + stop, output
    assert "Traceback" not in output
    assert "interrupted:" in output and "--continue" in output
    rows = read_csv(out / "mosaics.csv")
    done = [row["mosaic"] for row in rows if row["status"] == "done"]
    assert 1 <= len(done) < 8 and {row["status"] for row in rows} == {"done", "pending"}
    for name in done:
        assert is_complete_label_tiff(out / f"{Path(name).stem}.labels.tif", (512, 512))
    resumed = rcmseg("batch", str(in_dir), "--out", str(out), "--continue", "--device", "cpu")
    assert resumed.exit_code == 0
    statuses = {row["mosaic"]: row["status"] for row in read_csv(out / "mosaics.csv")}
    assert all(statuses[name] == "skipped" for name in done)
    assert sorted(statuses.values()).count("done") == 8 - len(done)
