"""`rcmseg cv` and `rcmseg study` end to end on a tiny synthetic dataset (2 folds, one training
step per model), resuming, and the ~6 M parameter budget of every variant."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rcmseg.cli.main import app
from rcmseg.evaluation.study import STUDIES, Variant, parameter_count
from rcmseg.io.dataset import load_case, read_manifest
from rcmseg.synth import write_dataset

# One optimiser step of two 64 px crops per model, and the `paper` preset (256 px windows): a
# 128 px test image is then one window, 16x cheaper than `fast`'s 512 px window on CPU.
QUICK = ["--epochs", "1", "--iterations-per-epoch", "1", "--batch-size", "2", "--patch-size",
         "64", "--device", "cpu", "--preset", "paper", "--threads", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic mosaics of 512 px at 0.5 µm/px (128 px at 2 µm/px), four patients."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=4, size=512, seed=3, patients=4, clinics=2)
    return root


def labelled_pixels(root: Path) -> int:
    return sum(int((load_case(c)[1] != 255).sum()) for c in read_manifest(root) if c.labels)


def test_cv_trains_each_fold_evaluates_every_case_once_and_resumes(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    command = ["cv", str(dataset), "--out", str(out), "--folds", "2", "--network", "mednet1"]
    result = CliRunner().invoke(app, command + QUICK)
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # the result; how each fold went is on stderr
    assert line.startswith("2 fold(s): mean Dice")
    for i in (0, 1):
        assert re.search(
            rf"mednet1-mdsc_tv, fold {i} \(of 2\): mean Dice 0\.\d{{3}} on 2 test ", result.stderr
        )
    assert result.stderr.count("training mednet1 (") == 2

    folds = json.loads((out / "folds.json").read_text())
    assert folds["settings"]["folds"] == 2 and len(folds["folds"]) == 2
    tested = []
    for fold in folds["folds"]:
        parts = fold["patients"]
        assert not set(parts["train"]) & set(parts["test"])
        assert not set(parts["validation"]) & (set(parts["train"]) | set(parts["test"]))
        tested += fold["test"]
    assert sorted(tested) == sorted(f"mosaics/{c.mosaic.name}" for c in read_manifest(dataset))

    # every labelled pixel of the dataset is scored exactly once over the folds
    pooled = [json.loads((out / f"fold_{i}/evaluation/metrics.json").read_text()) for i in (0, 1)]
    assert sum(np.sum(p["pooled_confusion"]) for p in pooled) == labelled_pixels(dataset)
    for i in (0, 1):
        assert (out / f"fold_{i}/evaluation/report.md").is_file()
        assert (out / f"fold_{i}/evaluation/confusion_matrix.png").is_file()
        assert (out / f"fold_{i}/train/model.pt").is_file()
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows][-1] == "mean" and len(rows) == 7
    fold_dice = [p["pooled"]["dice"][-1] for p in pooled]
    assert float(rows[-1]["dice"]) == pytest.approx(np.mean(fold_dice), abs=1e-4)
    assert float(rows[-1]["dice_std"]) == pytest.approx(np.std(fold_dice, ddof=1), abs=1e-4)
    assert "±" in (out / "report.md").read_text()

    # resume: nothing is retrained; a fold without its evaluation is evaluated again only
    weights = [(out / f"fold_{i}/train/model.pt").stat().st_mtime_ns for i in (0, 1)]
    (out / "fold_1/evaluation/metrics.json").unlink()
    again = CliRunner().invoke(app, command + QUICK)
    assert again.exit_code == 0, again.output
    assert "fold 0 (of 2): kept from an earlier run" in again.stderr
    assert [(out / f"fold_{i}/train/model.pt").stat().st_mtime_ns for i in (0, 1)] == weights
    redone = json.loads((out / "fold_1/evaluation/metrics.json").read_text())
    assert redone["pooled_confusion"] == pooled[1]["pooled_confusion"]

    # other split settings on the same folder would mix two experiments: one-line error
    other = CliRunner().invoke(app, command + QUICK + ["--seed", "5"])
    assert other.exit_code == 2
    assert "folds.json: was written with other split settings" in other.output


def test_study_compares_variants_on_shared_folds(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    command = ["study", str(dataset), "--out", str(out), "--folds", "2", "--variant", "mednet1",
               "--variant", "mednet1:ce"]  # fmt: skip
    result = CliRunner().invoke(app, command + QUICK)
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert "| mednet1-mdsc_tv | 6." in table and "| mednet1-ce | 6." in table
    with open(out / "comparison.csv", newline="") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"mednet1-mdsc_tv", "mednet1-ce"}
    for name in rows:  # each variant's table entry is its own cross-validation summary
        summary = json.loads((out / name / "summary.json").read_text())
        assert float(rows[name]["mean Dice"]) == pytest.approx(summary["mean"]["dice"][-1],
                                                               abs=1e-4)  # fmt: skip
        assert summary["folds"] == 2
    # both variants were tested on the same mosaics in each fold
    for i in (0, 1):
        cases = [
            [c["case_id"] for c in json.loads(
                (out / name / f"fold_{i}/evaluation/metrics.json").read_text())["cases"]]
            for name in rows
        ]  # fmt: skip
        assert cases[0] == cases[1]


def test_cv_trains_with_the_bundles_recipe_under_the_command_line(
    dataset: Path, tmp_path: Path
) -> None:
    import shutil

    import torch

    from rcmseg.bundle import default_bundle_dir

    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir(), bundle, ignore=shutil.ignore_patterns("models", "runs"))
    train_json = bundle / "configs" / "train.json"
    config = json.loads(train_json.read_text())
    config["network_def"].update(name="mednet1", widths=[8, 16, 32, 64, 128])
    config["loss"]["name"] = "dice"
    config["optimizer"] = {"_target_": "torch.optim.RMSprop", "_mode_": "callable", "alpha": 0.9}
    config.update(learning_rate=5e-4, final_learning_rate=5e-5)
    config["patch"]["window_overlap"] = 0.25
    train_json.write_text(json.dumps(config))

    out = tmp_path / "cv"
    command = ["cv", str(dataset), "--out", str(out), "--folds", "2", "--bundle", str(bundle)]
    result = CliRunner().invoke(app, command + QUICK + ["--epochs", "2"])
    assert result.exit_code == 0, result.output
    for fold in (0, 1):
        checkpoint = torch.load(out / f"fold_{fold}/train/checkpoints/last.pt", weights_only=True)
        used = checkpoint["config"]
        # from train.json
        assert (used["network"], used["loss"]) == ("mednet1", "dice")
        assert used["network_kwargs"] == {"widths": [8, 16, 32, 64, 128]}
        assert used["optimizer"] == {"_target_": "torch.optim.rmsprop.RMSprop", "alpha": 0.9}
        assert checkpoint["optimizer"]["param_groups"][0]["alpha"] == 0.9  # a real RMSprop ran
        assert (used["learning_rate"], used["final_learning_rate"]) == (5e-4, 5e-5)
        assert used["lr_scheduler"] is None  # --epochs replaced the recipe's schedule
        assert used["window_overlap"] == 0.25 and used["tv_weight"] == 1e-6
        # from the command line, over train.json
        assert (used["max_epochs"], used["batch_size"], used["patch_size"]) == (2, 2, 64)
        assert used["seed"] == fold and used["val_preset"] == "paper"

    # an ablation loss from the command line does not inherit the recipe loss's TV weight
    result = CliRunner().invoke(
        app, command[:3] + [str(tmp_path / "ce")] + command[4:] + QUICK + ["--loss", "ce"]
    )
    assert result.exit_code == 0, result.output
    used = torch.load(tmp_path / "ce/fold_0/train/checkpoints/last.pt", weights_only=True)
    assert used["config"]["loss"] == "ce" and used["config"]["tv_weight"] is None


def test_group_scenario_tests_the_held_out_clinic(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "groups"
    clinic_of = {f"mosaics/{c.mosaic.name}": c.clinic for c in read_manifest(dataset)}
    held_out = sorted(set(clinic_of.values()))[-1]
    command = ["cv", str(dataset), "--out", str(out), "--scenario", "groups", "--test-group",
               held_out, "--network", "mednet1"]  # fmt: skip
    result = CliRunner().invoke(app, command + QUICK)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "fold_0/evaluation/metrics.json").read_text())
    tested = {c["case_id"] for c in metrics["cases"]}
    assert tested == {case for case, clinic in clinic_of.items() if clinic == held_out}
    folds = json.loads((out / "folds.json").read_text())["folds"][0]
    assert {clinic_of[c] for c in folds["train"] + folds["validation"]} == set(
        clinic_of.values()
    ) - {held_out}


def test_bad_study_requests_are_one_line_errors(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for extra, message in ((["--variant", "resnet"], "unknown network 'resnet'"),
                           (["--study", "everything"], "unknown study 'everything'"),
                           ([], "give --study or at least one --variant")):  # fmt: skip
        result = runner.invoke(app, ["study", str(dataset), "--out", str(tmp_path)] + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["cv", str(dataset), "--out", str(tmp_path), "--scenario",
                                 "groups", "--test-group", "mars"])  # fmt: skip
    assert result.exit_code == 2 and "mars not in the manifest" in result.output


def test_a_study_checks_every_variants_crops_before_training_any(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "study"
    command = ["study", str(dataset), "--out", str(out), "--folds", "2", "--variant", "mednet1",
               "--variant", "mednet"]  # fmt: skip
    result = CliRunner().invoke(app, command + QUICK)  # 64 px crops: too small for mednet
    assert result.exit_code == 2, result.output
    assert "network mednet needs crops of a multiple of 128 px" in result.output
    assert not (out / "mednet1-mdsc_tv").exists()  # the first variant did not train first


def test_every_variant_has_about_six_million_parameters() -> None:
    """The paper compares networks at ~6 M parameters: every variant within 10 % of MED-Net."""
    reference = parameter_count(Variant("mednet"))
    assert 5.4e6 <= reference <= 6.6e6
    for variant in STUDIES["paper"]:
        count = parameter_count(variant)
        assert abs(count - reference) <= 0.1 * reference, (variant.name, count, reference)


def test_a_fold_whose_metrics_file_was_cut_short_is_evaluated_again(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    command = ["cv", str(dataset), "--out", str(out), "--folds", "2", *QUICK]
    assert CliRunner().invoke(app, command).exit_code == 0
    metrics = out / "fold_1" / "evaluation" / "metrics.json"
    whole = metrics.read_text()
    metrics.write_text(whole[: len(whole) // 2])  # a run killed while writing it
    (out / "fold_1" / "train" / "model.pt").unlink()  # ... and its weights are gone too
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert json.loads(metrics.read_text()) == json.loads(whole)  # retrained the same, re-evaluated
    assert not list(out.rglob("*.partial-*"))


def test_fold_k_of_train_model_validates_on_the_test_patients_of_cv_fold_k(dataset: Path) -> None:
    from rcmseg.io.dataset import case_id
    from rcmseg.splits import patient_kfold, split_cases_of
    from rcmseg.training.data import split_cases

    cases = split_cases_of(dataset, read_manifest(dataset))
    for folds in (2, 3):
        cv_folds = patient_kfold(cases, folds, validation_fraction=0.1, seed=5)
        for fold in range(folds):
            train, val = split_cases(dataset, None, None, fold, folds, seed=5)
            assert tuple(sorted(case_id(c, dataset) for c in val)) == cv_folds[fold].test
            assert not {c.patient for c in train} & {c.patient for c in val}
