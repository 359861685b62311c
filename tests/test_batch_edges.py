"""`rcmseg batch` at the edges a new user hits first, and `--continue` that checks provenance."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from rcmseg.bundle import build_network, default_bundle_dir
from rcmseg.cli.main import app
from rcmseg.synth.mosaic import make_mosaic

torch.set_num_threads(2)


def rcmseg(*args: str):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert len(lines) <= 2, result.output  # one message (rich may fold it once)
    return " ".join(lines)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edge_in")
    image, _ = make_mosaic((800, 960), seed=3)
    tifffile.imwrite(root / "a.tif", image, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    Image.fromarray(make_mosaic((600, 640), seed=4)[0]).save(root / "b.png")  # no pixel size
    return root


@pytest.mark.parametrize(
    "options, message",
    [
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--mpp", "0"], "--mpp 0.0: a pixel size must be above 0"),
        (["--mpp", "-1"], "--mpp -1.0: a pixel size must be above 0"),
        (["--mpp", "inf"], "--mpp inf: a pixel size must be above 0"),
        (["--num-parts", "0"], "--num-parts 0: at least 1 part is needed"),
        (["--num-parts", "2", "--part-id", "2"], "--part-id 2: must be in 0..1"),
        (["--preset", "bogus"], "unknown preset 'bogus'; choose one of paper, fast"),
        (["--precision", "fp8"], "unknown precision 'fp8'"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'; choose torch, openvino"),
    ],
)
def test_bad_options_give_one_line_and_exit_2_before_any_work(mosaics, tmp_path, options, message):
    out = tmp_path / "out"
    result = rcmseg("batch", str(mosaics), "--out", str(out), *options)
    assert result.exit_code == 2
    assert message in one_error_line(result)
    assert not list(out.rglob("*.labels.tif")) if out.exists() else True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_one_is_one_line(mosaics, tmp_path):
    result = rcmseg("batch", str(mosaics), "--out", str(tmp_path / "o"), "--device", "cuda")
    assert result.exit_code == 2
    assert "no CUDA GPU" in one_error_line(result)


def test_out_naming_a_file_is_one_line(mosaics, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = rcmseg("batch", str(mosaics), "--out", str(target))
    assert result.exit_code == 2
    assert "is a file, not a folder for outputs" in one_error_line(result)
    assert target.read_text() == "keep me"


def test_missing_input_and_non_mosaic_file_are_one_line(tmp_path):
    result = rcmseg("batch", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no such mosaic file or folder" in one_error_line(result)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = rcmseg("batch", str(text), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a mosaic file" in one_error_line(result)


def test_a_tiff_header_with_nothing_behind_it_is_one_line(tmp_path):
    """An 8-byte TIFF (a writer that crashed after its header): rcmseg's one line, not a
    second line of tifffile's own logging."""
    import subprocess
    import sys

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "stub.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")
    command = [sys.executable, "-m", "rcmseg.cli.main", "batch", str(tmp_path / "in")]
    command += ["--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr  # a process, as a user runs it: logging unconfigured
    assert result.returncode == 1, output
    assert "stub.tif: cannot read as TIFF" in output
    assert "invalid offset" not in output


def test_a_link_to_a_missing_mosaic_fails_in_the_report_and_the_rest_goes_on(mosaics, tmp_path):
    """A link to a mosaic on a drive that is not mounted is a mosaic the user expects: it gets a
    failed row naming the missing target, not silence."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(mosaics / "b.png", folder / "b.png")
    (folder / "nas.tif").symlink_to(tmp_path / "unmounted" / "nas.tif")
    out = tmp_path / "out"
    result = rcmseg("batch", str(folder), "--out", str(out), "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    rows = {row["mosaic"]: row for row in csv.DictReader((out / "mosaics.csv").open())}
    assert (rows["b.png"]["status"], rows["nas.tif"]["status"]) == ("done", "failed")
    assert "broken link: its target" in rows["nas.tif"]["error"]
    assert str(tmp_path / "unmounted" / "nas.tif") in rows["nas.tif"]["error"]
    assert not (out / "nas.labels.tif").exists()


def test_file_names_with_brackets_are_shown_as_they_are_not_read_as_markup(mosaics, tmp_path):
    # rich reads "[b]" as bold: "scan[b].tif" showed as "scan.tif" in the failure line and table
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(mosaics / "b.png", folder / "good[i].png")
    (folder / "scan[b].tif").write_bytes(b"junk")
    out = tmp_path / "out"
    result = rcmseg("batch", str(folder), "--out", str(out), "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"failed {folder / 'scan[b].tif'}: cannot read as TIFF" in result.stderr
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert any("good[i].png" in row and "done" in row for row in rows), result.stdout
    assert any("scan[b].tif" in row and "failed" in row for row in rows), result.stdout


def test_continue_with_a_finished_mosaic_gone_missing_keeps_its_outputs(mosaics, tmp_path):
    """`--continue` while a finished mosaic's drive is unmounted: its row fails, naming the
    missing file; its labels and record stay finished, and once the drive is back the next
    `--continue` keeps them instead of segmenting again."""
    drive, folder, out = tmp_path / "nas", tmp_path / "in", tmp_path / "out"
    drive.mkdir()
    folder.mkdir()
    shutil.copy(mosaics / "b.png", drive / "b.png")
    (folder / "b.png").symlink_to(drive / "b.png")
    options = ("--out", str(out), "--device", "cpu", "--no-progress")
    assert rcmseg("batch", str(folder), *options).exit_code == 0
    labels = (out / "b.labels.tif").read_bytes()
    (drive / "b.png").rename(tmp_path / "b.png")  # unmounted
    result = rcmseg("batch", str(folder), *options, "--continue")
    assert result.exit_code == 1, result.output
    row = next(csv.DictReader((out / "mosaics.csv").open()))
    assert row["status"] == "failed" and "broken link: its target" in row["error"]
    assert (out / "b.labels.tif").read_bytes() == labels
    assert json.loads((out / "b.summary.json").read_text())["status"] == "done"
    (tmp_path / "b.png").rename(drive / "b.png")  # mounted again
    result = rcmseg("batch", str(folder), *options, "--continue")
    assert result.exit_code == 0, result.output
    assert next(csv.DictReader((out / "mosaics.csv").open()))["status"] == "skipped"


def test_a_file_name_that_is_not_utf8_is_segmented_reported_and_resumed(mosaics, tmp_path):
    """A Latin-1 name from an old share (bytes that are not UTF-8): segmented, its bytes kept in
    the reports as the file system holds them, resumed by `--continue`; printing it on a strict
    UTF-8 terminal does not end the run."""
    import os
    import subprocess
    import sys

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    shutil.copy(mosaics / "b.png", folder / os.fsdecode(b"caf\xe9.png"))
    command = [sys.executable, "-m", "rcmseg.cli.main", "batch", str(folder), "--out", str(out)]
    command += ["--device", "cpu", "--no-progress"]
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for extra in ([], ["--continue"]):
        result = subprocess.run(
            command + extra, capture_output=True, env=strict, timeout=600, check=False
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert b"Traceback" not in result.stderr
    report = (out / "mosaics.csv").read_bytes().splitlines()[1]
    assert report.startswith(b"caf\xe9.png,caf\xe9,skipped,")
    assert (out / os.fsdecode(b"caf\xe9.labels.tif")).is_file()
    assert b"caf\xe9" in (out / "patterns.csv").read_bytes()


def test_a_link_to_a_missing_folder_is_named_and_the_rest_goes_on(mosaics, tmp_path):
    """A patient's folder linked from a share that is not mounted: its mosaics cannot be found,
    so the batch says which link leads nowhere (emacs's `.#` lock links are passed over)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(mosaics / "b.png", folder / "b.png")
    (folder / "patient02").symlink_to(tmp_path / "unmounted" / "patient02")
    (folder / ".#notes.txt").symlink_to("root@host.1234:1700000000")
    out = tmp_path / "out"
    result = rcmseg("batch", str(folder), "--out", str(out), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "1 link(s) lead nowhere" in output and "patient02 → " in output
    assert "mosaics there are not searched" in output
    rows = list(csv.DictReader((out / "mosaics.csv").open()))
    assert [(row["mosaic"], row["status"]) for row in rows] == [("b.png", "done")]


def test_batch_and_import_walk_the_input_folder_once(mosaics, tmp_path, monkeypatch):
    """On a share every walk of a lab's tree costs a listing per folder: the plan, the manifest
    search and the note on what could not be searched share one walk, in `batch` and in
    `labels import`."""
    import os

    folder = tmp_path / "in"
    (folder / "p1").mkdir(parents=True)
    shutil.copy(mosaics / "b.png", folder / "p1" / "b.png")
    (folder / "manifest.csv").write_text("mosaic,labels,patient,lesion,clinic\np1/b.png,,P1,L7,\n")
    (folder / "p2").symlink_to(tmp_path / "unmounted" / "p2")
    walked: list[Path] = []
    walk = os.walk

    def counted_walk(top, *args, **kwargs):
        walked.append(Path(top))
        return walk(top, *args, **kwargs)

    monkeypatch.setattr(os, "walk", counted_walk)
    out = tmp_path / "out"
    result = rcmseg("batch", str(folder), "--out", str(out), "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "1 link(s) lead nowhere" in " ".join(result.output.split())
    rows = list(csv.DictReader((out / "mosaics.csv").open()))
    assert [(row["mosaic"], row["lesion"], row["status"]) for row in rows] == [
        ("p1/b.png", "L7", "done")
    ]
    assert walked.count(folder) == 1

    walked.clear()
    exports = tmp_path / "exports"
    exports.mkdir()
    dataset = tmp_path / "dataset"
    result = rcmseg(
        "labels", "import", str(folder), "--annotations", str(exports), "--out", str(dataset)
    )
    assert result.exit_code == 0, result.output
    assert "1 link(s) lead nowhere" in " ".join(result.output.split())
    manifest = list(csv.DictReader((dataset / "manifest.csv").open()))
    assert [(row["patient"], row["lesion"]) for row in manifest] == [("P1", "L7")]
    assert walked.count(folder) == 1


def test_a_windows_drive_gives_its_mosaics_not_its_recycle_bin_or_restore_points(tmp_path):
    """`rcmseg batch /media/usb` on a drive a Windows PC used: deleted mosaics in `$RECYCLE.BIN`
    (and the `$I…` records named like them) and `System Volume Information` are not the lab's
    mosaics, so they are not segmented."""
    from rcmseg.batch import plan_jobs

    mosaic = np.zeros((300, 300), np.uint8)
    Image.fromarray(mosaic).save(tmp_path / "m.png")
    recycled = tmp_path / "$RECYCLE.BIN" / "S-1-5-21-1004336348-1177238915-682003330-1001"
    recycled.mkdir(parents=True)
    Image.fromarray(mosaic).save(recycled / "$RAB12CD.png")
    (recycled / "$IAB12CD.png").write_bytes(b"\x02" + bytes(40))
    (tmp_path / "System Volume Information").mkdir()
    Image.fromarray(mosaic).save(tmp_path / "System Volume Information" / "tracking.png")
    (tmp_path / "patients" / "$recycle.bin").mkdir(parents=True)  # any case, at any depth
    Image.fromarray(mosaic).save(tmp_path / "patients" / "$recycle.bin" / "$R1.png")
    Image.fromarray(mosaic).save(tmp_path / "patients" / "p.png")
    jobs = plan_jobs(tmp_path, tmp_path / "out")
    assert [job.relative for job in jobs] == ["m.png", "patients/p.png"]


@pytest.fixture
def unprivileged(mosaics):
    """A folder any user may write (pytest's tmp_path is private to root) holding `in/b.png`,
    and a function that runs `rcmseg ARGS` there as an unprivileged user (root reads and writes
    every folder, so permissions are tried as `nobody`), returning (exit status, output on one
    line)."""
    import os
    import subprocess
    import sys
    import tempfile

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no user here is refused a folder")
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o777)
    (shared / "in").mkdir(mode=0o777)
    (shared / "in").chmod(0o777)
    shutil.copy(mosaics / "b.png", shared / "in" / "b.png")

    def run(*args: str) -> tuple[int, str]:
        command = [sys.executable, "-m", "rcmseg.cli.main", *args]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        environment = {**os.environ, "HOME": str(shared), "COLUMNS": "200"}
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=environment, cwd=shared
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, " ".join((result.stdout + result.stderr).split())

    yield shared, run
    for folder, _, _ in os.walk(shared):
        os.chmod(folder, 0o755)
    shutil.rmtree(shared)


def test_a_folder_that_cannot_be_read_is_named_and_the_rest_goes_on(unprivileged):
    """A patient's folder on a share that this user may not read: its mosaics cannot be found,
    so the batch names it and segments the rest."""
    shared, run = unprivileged
    folder = shared / "in"
    (folder / "patient03").mkdir()
    shutil.copy(folder / "b.png", folder / "patient03" / "c.png")
    (folder / "patient03").chmod(0o000)
    status, output = run("batch", "in", "--out", "out", "--device", "cpu", "--no-progress")
    assert status == 0, output
    assert "1 folder(s) cannot be read, e.g. in/patient03 (Permission denied)" in output
    assert "mosaics there are not searched" in output
    rows = list(csv.DictReader((shared / "out" / "mosaics.csv").open()))
    assert [(row["mosaic"], row["status"]) for row in rows] == [("b.png", "done")]


def test_a_mosaic_that_cannot_be_read_fails_as_such_not_as_a_corrupt_file(unprivileged):
    """A mosaic this user may not read fails in the report saying so; it is not called corrupt
    (a lab would delete a good file as broken)."""
    shared, run = unprivileged
    shutil.copy(shared / "in" / "b.png", shared / "in" / "locked.png")
    (shared / "in" / "locked.png").chmod(0o000)
    status, output = run("batch", "in", "--out", "out", "--device", "cpu", "--no-progress")
    assert status == 1, output
    rows = {row["mosaic"]: row for row in csv.DictReader((shared / "out" / "mosaics.csv").open())}
    assert (rows["b.png"]["status"], rows["locked.png"]["status"]) == ("done", "failed")
    assert rows["locked.png"]["error"] == "in/locked.png: cannot be read (Permission denied)"


@pytest.mark.parametrize(
    "command",
    [
        ["batch", "in", "--device", "cpu", "--no-progress"],
        ["evaluate", "data", "--device", "cpu"],
        ["labels", "import", "in", "--annotations", "in"],
        ["train", "model", "data", "--epochs", "1"],
        ["cv", "data"],
        ["study", "data", "--study", "levels"],
        ["synth"],
    ],
)
@pytest.mark.parametrize("out", ["locked", "locked/new"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    unprivileged, command, out
):
    """`--out` on a folder this user may not write (a colleague's results, a share mounted
    read-only): one line naming the folder and why, exit 2, before any work, instead of a
    traceback, or a batch whose every mosaic fails."""
    shared, run = unprivileged
    (shared / "locked").mkdir(mode=0o555)
    (shared / "locked").chmod(0o555)
    args = [*command, out] if command == ["synth"] else [*command, "--out", out]
    status, output = run(*args)
    assert status == 2, output
    option = "OUT" if command == ["synth"] else "--out"
    assert (
        f"error: locked: cannot be written to (Permission denied); choose another {option}"
        in output
    )
    assert list((shared / "locked").iterdir()) == []


def test_a_bundle_that_cannot_be_written_is_refused_before_training(unprivileged):
    """`rcmseg train bundle` writes the weights and the run into the bundle: one installed where
    this user may not write (a lab's shared install) is refused in one line before an epoch is
    spent, saying to train a copy."""
    shared, run = unprivileged
    bundle = shared / "installed_bundle"
    shutil.copytree(default_bundle_dir(), bundle, ignore=shutil.ignore_patterns("runs"))
    for folder in (bundle / "models", bundle):
        folder.chmod(0o555)
    status, output = run("train", "bundle", str(bundle), "--data", "data")
    assert status == 2, output
    assert f"error: {bundle / 'models'}: cannot be written to (Permission denied)" in output
    assert "choose another bundle (train a copy of it)" in output
    assert not (bundle / "runs").exists()


def test_a_full_drive_stops_the_batch_keeps_what_is_finished_and_continue_does_the_rest(
    mosaics, tmp_path
):
    """The output drive fills up: the mosaic being written fails naming the output folder and
    why, keeps no outputs, and the batch stops instead of segmenting mosaics it cannot keep (the
    rest stay pending in the reports). With room made, `--continue` does the rest. A small
    tmpfs in a private mount namespace plays the drive."""
    import subprocess
    import sys

    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("no private mount namespace here (needs root and unshare)")
    folder, measured = tmp_path / "in", tmp_path / "measured"
    folder.mkdir()
    for name in ("m0.png", "m1.png", "m2.png", "m3.png"):
        shutil.copy(mosaics / "b.png", folder / name)
    options = ["--device", "cpu", "--no-progress", "--probabilities"]
    measure = rcmseg("batch", str(folder / "m0.png"), "--out", str(measured), *options)
    assert measure.exit_code == 0, measure.output
    pages = sum(-(-path.stat().st_size // 4096) for path in measured.glob("m0.*"))
    assert pages >= 16  # room for the reports once the failed mosaic's outputs are gone
    drive, kept = tmp_path / "drive", tmp_path / "kept"
    drive.mkdir()
    batch = [sys.executable, "-m", "rcmseg.cli.main", "batch", str(folder), "--out", str(drive)]
    script = f"""
        mount -t tmpfs -o size={pages * 3 // 2 * 4}k tmpfs {drive}
        {" ".join(batch + options)} > {tmp_path}/first.txt 2>&1; echo $? > {tmp_path}/first.rc
        cp -r {drive} {tmp_path}/full
        mount -o remount,size={pages * 8 * 4}k {drive}
        {" ".join(batch + options)} --continue > {tmp_path}/then.txt 2>&1
        echo $? > {tmp_path}/then.rc
        cp -r {drive} {kept}
    """
    subprocess.run(["unshare", "--mount", "sh", "-c", script], check=True, timeout=900)
    first = " ".join((tmp_path / "first.txt").read_text().split())
    assert (tmp_path / "first.rc").read_text().strip() == "1", first
    assert "Traceback" not in first
    failed = f"{drive}: the outputs of m1.png cannot be written (No space left on device)"
    assert f"stopped: {failed}; 1 of 4 mosaic(s) finished and kept" in first
    assert "--continue" in first
    full = tmp_path / "full"
    rows = {row["mosaic"]: row for row in csv.DictReader((full / "mosaics.csv").open())}
    statuses = [rows[name]["status"] for name in ("m0.png", "m1.png", "m2.png", "m3.png")]
    assert statuses == ["done", "failed", "pending", "pending"]
    assert rows["m1.png"]["error"] == failed
    assert sorted(path.name for path in full.glob("m1.*")) == ["m1.summary.json"]  # no outputs
    assert not list(full.glob("*.partial-*"))
    then = (tmp_path / "then.txt").read_text()
    assert (tmp_path / "then.rc").read_text().strip() == "0", then
    rows = {row["mosaic"]: row["status"] for row in csv.DictReader((kept / "mosaics.csv").open())}
    assert rows == {"m0.png": "skipped", "m1.png": "done", "m2.png": "done", "m3.png": "done"}
    first_labels = tifffile.imread(kept / "m0.labels.tif")
    assert all(
        np.array_equal(tifffile.imread(kept / f"m{i}.labels.tif"), first_labels) for i in (1, 2, 3)
    )


def test_a_data_set_folder_gives_its_mosaics_not_its_label_maps(tmp_path):
    """`rcmseg batch DATA` on a data set folder (rcmseg synth, labels import): the files its
    manifest lists as label maps are not segmented as mosaics; named on purpose, one is."""
    from rcmseg.batch import plan_jobs

    (tmp_path / "mosaics").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "mosaics" / "m.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "labels" / "m.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "loose.png")
    (tmp_path / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic\nmosaics/m.png,labels/m.png,P1,L7,C\n"
    )
    jobs = plan_jobs(tmp_path, tmp_path / "out")
    assert [(job.relative, job.lesion) for job in jobs] == [
        ("loose.png", "loose"),
        ("mosaics/m.png", "L7"),
    ]
    named = plan_jobs(tmp_path / "labels" / "m.png", tmp_path / "out")
    assert [job.relative for job in named] == ["m.png"]


def test_a_studies_folder_gives_its_mosaics_not_the_labels_annotators_submitted(tmp_path):
    """`rcmseg batch STUDIES` after annotating with `rcmseg label serve`: MONAI Label keeps the
    submitted label maps in STUDIES/labels/{final,original}; they are not segmented."""
    from rcmseg.batch import plan_jobs

    for name in ("m.png", "labels/final/m.png", "labels/original/m.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / name)
    relatives = ["labels/final/m.png", "labels/original/m.png", "m.png"]
    assert [job.relative for job in plan_jobs(tmp_path, tmp_path / "out")] == relatives
    (tmp_path / "datastore_v2.json").write_text('{"name": "new-dataset", "objects": {}}')
    assert [job.relative for job in plan_jobs(tmp_path, tmp_path / "out")] == ["m.png"]


def test_a_single_mosaic_file_is_segmented(mosaics, tmp_path):
    out = tmp_path / "one"
    result = rcmseg("batch", str(mosaics / "a.tif"), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(out / "a.labels.tif").shape == (200, 240)
    assert not (out / "b.labels.tif").exists()


def test_fallback_pixel_size_is_announced_and_overlay_says_what_its_shares_are(mosaics, tmp_path):
    out = tmp_path / "both"
    result = rcmseg("batch", str(mosaics), "--out", str(out), "--device", "cpu", "--overlay")
    assert result.exit_code == 0, result.output
    assert "1 mosaic(s) carry no pixel size; 0.5 µm/px assumed" in " ".join(result.output.split())
    from rcmseg.classes import CLASS_NAMES
    from rcmseg.io.overlay import area_legend

    labels = tifffile.imread(out / "a.labels.tif")
    entries, note = area_legend(labels, CLASS_NAMES)
    lesion = np.isin(labels, [2, 3, 4, 5])
    meshwork_share = 100 * (labels == 2).sum() / max(1, lesion.sum())
    assert entries[2] == f"meshwork {meshwork_share:.0f}%"  # share of the lesion, as patterns.csv
    assert "% of lesion area" in note and "% of analysed area" in note


def test_out_may_be_the_mosaic_folder_or_hold_it_and_outputs_are_never_mosaics(tmp_path):
    """`--out` equal to the input folder, or a folder above it, still finds the mosaics; a
    results folder inside the input folder is not searched; files a batch wrote are never
    segmented as mosaics wherever they lie."""
    from rcmseg.batch import plan_jobs

    folder = tmp_path / "study" / "mosaics"
    (folder / "run1").mkdir(parents=True)
    outputs = ("run1/m.labels.tif", "m.labels.tif", "m.overlay.png", "m.uncertainty.tif")
    for name in ("m.png", *outputs):
        Image.fromarray(np.zeros((300, 300), np.uint8)).save(folder / name)
    for out in (folder, tmp_path / "study", folder / "run2", tmp_path / "elsewhere"):
        assert [job.relative for job in plan_jobs(folder, out)] == ["m.png"], out
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(folder / "run1" / "n.png")
    assert [job.relative for job in plan_jobs(folder, folder / "run1")] == ["m.png"]
    assert [job.relative for job in plan_jobs(folder, folder)] == ["m.png", "run1/n.png"]


def test_outputs_written_beside_the_mosaics_are_resumed_not_resegmented(mosaics, tmp_path):
    here = tmp_path / "here"
    shutil.copytree(mosaics, here)
    first = rcmseg("batch", str(here), "--out", str(here), "--device", "cpu", "--overlay")
    assert first.exit_code == 0, first.output
    assert sorted(path.name for path in here.glob("*.labels.tif")) == [
        "a.labels.tif",
        "b.labels.tif",
    ]
    again = rcmseg("batch", str(here), "--out", str(here), "--device", "cpu", "--overlay")
    assert again.exit_code == 2 and "finished outputs for 2 mosaic(s)" in one_error_line(again)
    kept = rcmseg(
        "batch", str(here), "--out", str(here), "--device", "cpu", "--overlay", "--continue"
    )
    rows = (here / "mosaics.csv").read_text().splitlines()
    assert kept.exit_code == 0 and len(rows) == 3
    assert all(",skipped," in row for row in rows[1:])


def test_a_lab_geojson_beside_its_mosaic_is_never_replaced_or_deleted(mosaics, tmp_path):
    """QuPath saves annotations as <image>.geojson, the name `--geojson` writes: with the
    outputs beside the mosaics, a file rcmseg did not write fails its mosaic in one line and
    stays as it was; the other mosaics are segmented; `--overwrite` leaves it too."""
    from rcmseg.io.geojson import is_rcmseg_geojson

    here = tmp_path / "here"
    shutil.copytree(mosaics, here)
    annotation = here / "a.geojson"
    square = [[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}}
    feature["properties"] = {"objectType": "annotation", "classification": {"name": "Ring"}}
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    drawn = annotation.read_bytes()

    result = rcmseg("batch", str(here), "--out", str(here), "--device", "cpu", "--geojson")
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "a.geojson: is not an rcmseg output (an annotation?)" in output
    assert annotation.read_bytes() == drawn and not is_rcmseg_geojson(annotation)
    assert is_rcmseg_geojson(here / "b.geojson") and (here / "b.labels.tif").is_file()
    assert not (here / "a.labels.tif").exists()

    labels_only = rcmseg("batch", str(here), "--out", str(here), "--device", "cpu", "--overwrite")
    assert labels_only.exit_code == 0, labels_only.output
    assert annotation.read_bytes() == drawn
    assert not (here / "b.geojson").exists()  # rcmseg's own, from the run it redid


def _bundle_with_other_weights(tmp_path: Path) -> Path:
    bundle = tmp_path / "retrained"
    shutil.copytree(default_bundle_dir(), bundle, ignore=shutil.ignore_patterns("runs"))
    torch.manual_seed(7)
    torch.save(build_network(bundle).state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_continue_redoes_mosaics_made_another_way_and_says_why(mosaics, tmp_path):
    out = tmp_path / "out"
    first = rcmseg("batch", str(mosaics), "--out", str(out), "--device", "cpu")
    assert first.exit_code == 0, first.output
    seconds = json.loads((out / "a.summary.json").read_text())["seconds"]

    same = rcmseg("batch", str(mosaics), "--out", str(out), "--device", "cpu", "--continue")
    assert same.exit_code == 0
    rows = (out / "mosaics.csv").read_text().splitlines()
    assert all(",skipped," in row for row in rows[1:])
    assert f"{seconds:.2f}" in rows[1]  # skipped rows keep their original seconds

    retrained = _bundle_with_other_weights(tmp_path)
    again = rcmseg(
        "batch", str(mosaics), "--out", str(out), "--device", "cpu", "--continue",
        "--bundle", str(retrained),
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "made with other weights" in " ".join(again.output.split())
    record = json.loads((out / "a.summary.json").read_text())
    assert record["status"] == "done" and record["note"].startswith("redone: made with other")

    preset = rcmseg(
        "batch", str(mosaics), "--out", str(out), "--device", "cpu", "--continue",
        "--bundle", str(retrained), "--preset", "paper",
    )  # fmt: skip
    assert preset.exit_code == 0
    assert "settings 'fast" in " ".join(preset.output.split())


def test_reads_and_writes_overlap_inference_with_at_most_one_mosaic_ahead(tmp_path):
    from rcmseg.batch import BatchOptions, Segmenter, plan_jobs
    from rcmseg.batch.progress import MosaicProgress
    from rcmseg.bundle import load_bundle

    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(4):
        image, _ = make_mosaic((512, 512), seed=index)
        tifffile.imwrite(folder / f"m{index}.tif", image, resolution=(2e4, 2e4),
                         resolutionunit="CENTIMETER")  # fmt: skip
    (folder / "m1.tif").write_text("not a TIFF")  # a failure in the middle of the pipeline
    events: list[tuple[str, str]] = []

    class Recording(Segmenter):
        def read(self, job):
            events.append(("read", job.relative))
            return super().read(job)

        def infer(self, job, mosaic, progress):
            events.append(("infer", job.relative))
            result = super().infer(job, mosaic, progress)
            events.append(("inferred", job.relative))
            return result

    bundle = load_bundle(device="cpu")
    options = BatchOptions(device="cpu")
    segmenter = Recording(bundle, bundle.engine("fast"), options)
    jobs = plan_jobs(folder, tmp_path / "out")
    records = segmenter.segment_all(jobs, MosaicProgress())
    assert [r.mosaic for r in records] == ["m0.tif", "m1.tif", "m2.tif", "m3.tif"]
    assert [r.status for r in records] == ["done", "failed", "done", "done"]
    assert all((tmp_path / "out" / f"m{i}.labels.tif").is_file() for i in (0, 2, 3))
    # the read of mosaic k+2 starts only once mosaic k is segmented (one mosaic read ahead)
    assert events.index(("inferred", "m0.tif")) < events.index(("read", "m2.tif"))
    assert events.index(("inferred", "m2.tif")) > events.index(("read", "m3.tif"))  # overlap


def test_mosaics_that_differ_only_by_ending_get_outputs_of_their_own(tmp_path):
    """`a.tif`, `a.png` and `a.TIF` in one folder (a case-sensitive file system): three output
    stems, none overwriting another's; a lone mosaic keeps its plain stem."""
    from rcmseg.batch import plan_jobs

    for name in ("a.tif", "a.png", "a.TIF", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    jobs = plan_jobs(tmp_path, tmp_path / "out")
    stems = {job.relative: job.out_stem.name for job in jobs}
    assert stems == {"a.TIF": "a_TIF", "a.png": "a_png", "a.tif": "a_tif", "b.nii.gz": "b"}
    lesions = [job.lesion for job in jobs]
    assert lesions == ["a_TIF", "a_png", "a_tif", "b"]


def test_a_manifests_pixel_size_is_used_recorded_and_checked_by_continue(tmp_path):
    """`rcmseg batch DATA` on a data set whose manifest gives `mosaic_mpp` for a PNG export (no
    pixel size in the file): segmented at that size, as training and evaluation read it, recorded
    as the manifest's; a changed value makes `--continue` redo the mosaic and say why."""
    data = tmp_path / "data"
    (data / "mosaics").mkdir(parents=True)
    Image.fromarray(make_mosaic((600, 640), seed=5)[0]).save(data / "mosaics" / "m.png")
    manifest = "mosaic,labels,patient,lesion,clinic,mosaic_mpp\nmosaics/m.png,,P1,L1,C,{}\n"
    (data / "manifest.csv").write_text(manifest.format("1.0"))
    out = tmp_path / "out"
    first = rcmseg("batch", str(data), "--out", str(out), "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert "carry no pixel size" not in first.output  # the manifest gave it
    assert tifffile.imread(out / "mosaics" / "m.labels.tif").shape == (300, 320)  # 1 → 2 µm/px
    with open(out / "mosaics.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert (row["mosaic_mpp"], row["mpp_source"], row["lesion"]) == ("1.0", "manifest", "L1")

    (data / "manifest.csv").write_text(manifest.format("2.0"))
    again = rcmseg("batch", str(data), "--out", str(out), "--device", "cpu", "--continue")
    assert again.exit_code == 0, again.output
    assert "pixel size 1.0 µm/px → 2.0 µm/px (manifest)" in " ".join(again.output.split())
    assert tifffile.imread(out / "mosaics" / "m.labels.tif").shape == (600, 640)


def test_a_manifest_that_lists_nothing_yet_does_not_stop_a_batch(tmp_path):
    """A `manifest.csv` with its header alone (a data set being put together) beside the
    mosaics: the batch segments them under their file names instead of refusing to start."""
    from rcmseg.batch import plan_jobs

    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "manifest.csv").write_text("mosaic,labels,patient,lesion,clinic\n")
    assert [(job.relative, job.lesion) for job in plan_jobs(tmp_path, tmp_path / "out")] == [
        ("m.png", "m")
    ]
