"""`rcmseg evaluate`: metrics on a crafted prediction against hand-computed values, the report
files, the CLI and the bundle's evaluate.json."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from rcmseg.classes import INTENSITY_MAX, UNLABELLED
from rcmseg.cli.main import app
from rcmseg.evaluation.evaluate import Evaluation, evaluate_cases
from rcmseg.io.dataset import Case, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "rcm_mednet"
# Intensity (0-255) that the crafted network maps to class k: nearest centre wins.
CENTRES = (20.0, 60.0, 100.0, 140.0, 180.0, 220.0)


class IntensityBands(nn.Module):
    """A per-pixel classifier: class k where the intensity is nearest ``CENTRES[k]``.

    It has no spatial extent, so padding and window blending cannot change its answer: what the
    evaluation reports is exactly what the test designed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor(CENTRES).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x * INTENSITY_MAX - self.centres) ** 2) / 100.0


def write_case(
    root: Path, name: str, intensity: np.ndarray, labels: np.ndarray, patient: str
) -> Case:
    """Write a mosaic at 0.5 µm/px and its labels, each working pixel as a 4x4 block."""
    block = np.ones((4, 4), dtype=np.uint8)
    mosaic = root / "mosaics" / f"{name}.tif"
    label_path = root / "labels" / f"{name}.png"
    mosaic.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        mosaic,
        np.kron(intensity.astype(np.uint8), block),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    Image.fromarray(np.kron(labels.astype(np.uint8), block)).save(label_path)
    return Case(mosaic, label_path, patient, f"lesion_{patient}", "clinicA")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 (working resolution) mosaics whose confusion matrices are known by design.

    a: quadrants of 32x32 = 1024 px: truth 0 predicted 0; truth 0 predicted 1; truth 2 predicted
       2; predicted 3 but unlabelled.  b: predicted 5 everywhere; truth 5 left, 4 right half.
    """
    root = tmp_path_factory.mktemp("crafted")
    image_a = np.zeros((64, 64))
    labels_a = np.full((64, 64), UNLABELLED)
    for (rows, cols), centre, truth in (
        ((slice(0, 32), slice(0, 32)), 20, 0),
        ((slice(0, 32), slice(32, 64)), 60, 0),
        ((slice(32, 64), slice(0, 32)), 100, 2),
        ((slice(32, 64), slice(32, 64)), 140, UNLABELLED),
    ):
        image_a[rows, cols], labels_a[rows, cols] = centre, truth
    labels_b = np.full((64, 64), 5)
    labels_b[:, 32:] = 4
    cases = [
        write_case(root, "a", image_a, labels_a, "p1"),
        write_case(root, "b", np.full((64, 64), 220), labels_b, "p2"),
    ]
    write_manifest(root, cases)
    return root


def read_table(path: Path) -> dict[str, dict[str, float]]:
    with open(path, newline="") as handle:
        return {
            row["class"]: {k: float(v) if v else math.nan for k, v in row.items() if k != "class"}
            for row in csv.DictReader(handle)
        }


def test_metrics_match_hand_computed_values(crafted: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    evaluation = evaluate_cases(
        IntensityBands(),
        read_manifest(crafted),
        crafted,
        out,
        preset="fast",
        device="cpu",
        overlays=1,
        progress=False,
    )
    unit = 1024  # pixels in a quadrant at the working resolution
    expected_cm = np.zeros((6, 6), dtype=np.int64)
    expected_cm[0, 0] = expected_cm[0, 1] = expected_cm[2, 2] = unit
    np.testing.assert_array_equal(evaluation.cases[0].confusion, expected_cm)
    expected_cm[5, 5] = expected_cm[4, 5] = 2 * unit
    np.testing.assert_array_equal(evaluation.pooled_confusion, expected_cm)

    # Pooled, by hand (units of 1024 px, 7 labelled): TP/FN/FP/TN per class.
    nan = math.nan
    hand = {
        "background": (0.5, 1.0, 2 / 3),  # TP1 FN1 FP0 TN5
        "artifact": (nan, 6 / 7, 0.0),  # TP0 FN0 FP1 TN6
        "meshwork": (1.0, 1.0, 1.0),  # TP1 FN0 FP0 TN6
        "nested": (nan, 1.0, nan),  # never true, never predicted
        "ring": (0.0, 1.0, 0.0),  # TP0 FN2 FP0 TN5
        "aspecific": (1.0, 3 / 5, 2 / 3),  # TP2 FN0 FP2 TN3
    }
    hand["mean"] = (
        np.mean([0.5, 1.0, 0.0, 1.0]),
        np.mean([1.0, 6 / 7, 1.0, 1.0, 1.0, 3 / 5]),
        np.mean([2 / 3, 0.0, 1.0, 0.0, 2 / 3]),
    )
    table = read_table(out / "metrics_pooled.csv")
    for name, values in hand.items():
        got = [table[name][m] for m in ("sensitivity", "specificity", "dice")]
        np.testing.assert_allclose(got, values, atol=1e-4, equal_nan=True, err_msg=name)

    # Mosaic a alone: sensitivity of background 1/2, Dice of artifact 0, mean Dice 5/9.
    with open(out / "metrics_per_mosaic.csv", newline="") as handle:
        rows = {row["mosaic"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"mosaics/a.tif", "mosaics/b.tif"}
    assert int(rows["mosaics/a.tif"]["labelled_px"]) == 3 * unit
    assert float(rows["mosaics/a.tif"]["background_sensitivity"]) == pytest.approx(0.5)
    assert float(rows["mosaics/a.tif"]["artifact_dice"]) == 0.0
    assert float(rows["mosaics/a.tif"]["mean_dice"]) == pytest.approx(5 / 9, abs=1e-4)


def test_report_files(crafted: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    evaluate_cases(
        IntensityBands(), read_manifest(crafted), crafted, out, overlays=1, progress=False
    )
    with open(out / "confusion_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["background", "artifact", "meshwork", "nested", "ring", "aspecific"]
    assert rows[5][0] == "ring" and rows[5][6] == "2048"  # truth ring, predicted aspecific
    with Image.open(out / "confusion_matrix.png") as heatmap:
        assert heatmap.mode == "RGB" and min(heatmap.size) > 300
    overlay = out / "overlays" / "mosaics__a.png"
    with Image.open(overlay) as sheet:
        pixels = np.asarray(sheet.convert("RGB"))
    # the ground-truth panel shows the unlabelled quadrant in grey (128, 128, 128)
    assert (np.all(pixels == 128, axis=-1)).sum() > 500
    assert not (out / "overlays" / "mosaics__b.png").exists()  # only one overlay asked for
    text = (out / "report.md").read_text()
    assert "| ring | 0.00 | 1.00 | 0.00 |" in text  # pooled table, paper layout
    assert "| nested | n/a | 1.00 | n/a |" in text
    assert "![mosaics__a](overlays/mosaics__a.png)" in text
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["pooled_confusion"][4][5] == 2048


def test_the_report_shows_this_runs_overlays_not_an_earlier_runs(
    crafted: Path, tmp_path: Path
) -> None:
    """Evaluating again into the same folder (another model, another data set): the examples in
    report.md are the overlays this run wrote, not what an earlier run left in overlays/."""
    out = tmp_path / "eval"
    (out / "overlays").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "overlays" / "old_lesion.png")
    evaluation = evaluate_cases(
        IntensityBands(), read_manifest(crafted), crafted, out, overlays=1, progress=False
    )
    text = (out / "report.md").read_text()
    assert "![mosaics__a](overlays/mosaics__a.png)" in text and "old_lesion" not in text
    assert (
        Evaluation.from_json(json.loads((out / "metrics.json").read_text())).overlays
        == ["mosaics__a.png"]
        == evaluation.overlays
    )


def test_unlabelled_dataset_is_a_one_line_error(crafted: Path, tmp_path: Path) -> None:
    root = tmp_path / "unlabelled"
    shutil.copytree(crafted, root)
    cases = [Case(c.mosaic, None, c.patient, c.lesion, c.clinic) for c in read_manifest(root)]
    write_manifest(root, cases)
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(root),
            "--out",
            str(tmp_path / "o"),
            "--bundle",
            str(BUNDLE),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2
    assert "no labelled mosaics to evaluate" in result.output
    assert "Traceback" not in result.output


def test_cli_evaluates_with_the_bundle(crafted: Path, tmp_path: Path) -> None:
    """The real command with the bundle's MED-Net: every labelled pixel is scored once."""
    out = tmp_path / "cli"
    threads_before = torch.get_num_threads()
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(crafted),
            "--out",
            str(out),
            "--bundle",
            str(BUNDLE),
            "--device",
            "cpu",
            "--overlays",
            "2",
            "--threads",
            "1",
        ],
    )
    torch.set_num_threads(threads_before)  # --threads set it for this whole process
    assert result.exit_code == 0, result.output
    # results on stdout alone (one line); what runs, and how, on stderr once at the start
    (line,) = result.stdout.splitlines()
    assert line.startswith("2 mosaics: mean sensitivity")
    assert "segmenting with fast (256 px windows, stride 128 px)" in result.stderr
    assert ", cpu, 1 CPU thread\n" in result.stderr
    saved = json.loads((out / "metrics.json").read_text())
    assert np.sum(saved["pooled_confusion"]) == 3 * 1024 + 4096
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        "mosaics__a.png",
        "mosaics__b.png",
    ]


def test_a_bad_mosaic_is_left_out_in_one_line_and_the_rest_evaluated(
    crafted: Path, tmp_path: Path
) -> None:
    """A mosaic that cannot be read (a copy that broke off) fails alone: one line naming it, the
    report says it was left out, the others are scored, and the exit status is 1."""
    root = tmp_path / "broken"
    shutil.copytree(crafted, root)
    broken = root / "mosaics" / "a.tif"
    broken.write_bytes(broken.read_bytes()[:300])
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app, ["evaluate", str(root), "--out", str(out), "--bundle", str(BUNDLE), "--device", "cpu"]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"failed {broken}: file is truncated" in " ".join(result.output.split())
    assert "1 mosaics: mean sensitivity" in result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert np.sum(saved["pooled_confusion"]) == 4096  # b alone
    assert len(saved["failed"]) == 1 and str(broken) in saved["failed"][0]
    assert "Not evaluated: 1 mosaic(s)" in (out / "report.md").read_text()
    (root / "mosaics" / "b.tif").write_bytes(b"")  # none left: a one-line error, status 2
    result = CliRunner().invoke(
        app, ["evaluate", str(root), "--out", str(out), "--bundle", str(BUNDLE), "--device", "cpu"]
    )
    assert result.exit_code == 2 and "no labelled mosaic could be evaluated" in result.output


def test_cli_evaluates_with_openvino_as_with_torch(crafted: Path, tmp_path: Path) -> None:
    """`rcmseg evaluate --backend openvino`: the same engine, the same scores as torch."""
    pytest.importorskip("openvino")
    pooled = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        arguments = ["evaluate", str(crafted), "--out", str(out), "--bundle", str(BUNDLE)]
        arguments += ["--device", "cpu", "--precision", "fp32", "--backend", backend]
        result = CliRunner().invoke(app, [*arguments, "--overlays", "0"])
        assert result.exit_code == 0, result.output
        pooled[backend] = np.array(
            json.loads((out / "metrics.json").read_text())["pooled_confusion"]
        )
    assert pooled["openvino"].sum() == pooled["torch"].sum() == 3 * 1024 + 4096
    assert np.abs(pooled["openvino"] - pooled["torch"]).sum() <= 0.002 * pooled["torch"].sum()


def test_bundle_evaluate_config_runs_through_monai(crafted: Path, tmp_path: Path) -> None:
    """``evaluate.json`` layered on ``inference.json`` (MONAI's list of config files) writes the
    same report, segmenting with inference.json's inferer (an override of it counts)."""
    out = tmp_path / "bundle_eval"
    configs = [str(BUNDLE / "configs" / name) for name in ("inference.json", "evaluate.json")]
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(configs),
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(crafted),
        "--output_dir",
        str(out),
        "--device",
        "$torch.device('cpu')",
        "--inferer#overlap",
        "0.25",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "metrics.json").read_text())
    assert np.sum(saved["pooled_confusion"]) == 3 * 1024 + 4096
    assert (out / "confusion_matrix.png").is_file()
    assert "256 px windows, stride 192 px" in (out / "report.md").read_text()


def test_a_bug_is_not_reported_as_bad_input(crafted: Path) -> None:
    """InputError is not a ValueError: a ValueError from a bug propagates as itself."""
    from rcmseg.errors import InputError
    from rcmseg.evaluation.evaluate import evaluate_cases

    assert not issubclass(InputError, ValueError)

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("a bug in the network")

    with pytest.raises(ValueError, match="a bug in the network"):
        evaluate_cases(Broken(), read_manifest(crafted), crafted, progress=False)


def test_mosaics_without_a_pixel_size_get_one_note_until_the_manifest_gives_it(
    crafted: Path, tmp_path: Path
) -> None:
    """A PNG mosaic carries no pixel size: evaluate says once that 0.5 µm/px was assumed and how
    to give the real one; with a `mosaic_mpp` column the note is gone."""
    root = tmp_path / "png"
    shutil.copytree(crafted, root)
    tif = root / "mosaics" / "b.tif"
    Image.fromarray(tifffile.imread(tif)).save(root / "mosaics" / "b.png")
    tif.unlink()
    manifest = (root / "manifest.csv").read_text().replace("mosaics/b.tif", "mosaics/b.png")
    (root / "manifest.csv").write_text(manifest)
    args = ["evaluate", str(root), "--out", str(tmp_path / "o"), "--bundle", str(BUNDLE)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "note: 1 mosaic(s) carry no pixel size (b.png); 0.5 µm/px assumed" in text
    lines = manifest.splitlines()
    rows = [f"{lines[0]},mosaic_mpp", *(f"{line},0.5" for line in lines[1:])]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0 and "carry no pixel size" not in result.output


class StopsOnMosaicB(IntensityBands):
    """The crafted classifier, stopped by SIGTERM when it reaches mosaic b (intensity 220)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from rcmseg.errors import Terminated

        if (x * INTENSITY_MAX > 200).any():
            raise Terminated
        return super().forward(x)


def test_an_interrupted_evaluation_says_what_it_scored_and_writes_no_report(
    crafted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM (or Ctrl-C) on the second mosaic: the bundle's evaluate.json route (`or_exit`)
    and `rcmseg evaluate` (`user_errors`) each end with status 143 and one line saying what was
    scored and that no report was written, and no report looks finished."""
    import typer

    from rcmseg.cli.common import user_errors
    from rcmseg.errors import or_exit

    cases = read_manifest(crafted)
    out = tmp_path / "out"
    said = f"interrupted: 1 of 2 labelled mosaic(s) scored; no report written to {out}; "
    with pytest.raises(SystemExit) as ended:
        or_exit(evaluate_cases, StopsOnMosaicB(), cases, crafted, out, progress=False)
    assert ended.value.code == 143
    assert said in capsys.readouterr().err
    with pytest.raises(typer.Exit) as ended, user_errors():
        evaluate_cases(StopsOnMosaicB(), cases, crafted, out, progress=False)
    assert ended.value.exit_code == 143
    assert said in " ".join(capsys.readouterr().err.split())
    assert not (out / "metrics.json").exists() and not (out / "report.md").exists()
