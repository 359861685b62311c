"""Patient-wise, class-stratified splits (Scenario 1) and group splits (Scenario 2)."""

from __future__ import annotations

import numpy as np
import pytest

from rcmseg.classes import NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.splits import (
    SplitCase,
    class_fractions,
    group_split,
    patient_kfold,
    read_folds,
    write_folds,
)

# Label distribution of the paper's data set (labelled pixels per class).
PAPER_DISTRIBUTION = np.array([0.17, 0.19, 0.20, 0.05, 0.28, 0.10])


def population(patients: int = 40, seed: int = 0) -> list[SplitCase]:
    """Patients with 1-3 mosaics of uneven size; each mosaic shows a random subset of classes."""
    rng = np.random.default_rng(seed)
    cases = []
    for p in range(patients):
        clinic = f"clinic{p % 4}"
        for m in range(int(rng.integers(1, 4))):
            present = rng.random(NUM_CLASSES) < 0.6
            present[rng.integers(NUM_CLASSES)] = True
            weights = rng.dirichlet(np.ones(NUM_CLASSES)) * PAPER_DISTRIBUTION * present
            total = rng.integers(20_000, 200_000)
            counts = np.round(total * weights / weights.sum()).astype(np.int64)
            cases.append(SplitCase(f"mosaics/p{p:02d}_m{m}.tif", f"p{p:02d}", clinic, counts))
    return cases


def pixel_share(cases: list[SplitCase], ids: tuple[str, ...]) -> float:
    chosen = set(ids)
    part = sum(c.class_pixels.sum() for c in cases if c.case_id in chosen)
    return part / sum(c.class_pixels.sum() for c in cases)


def test_folds_keep_patients_apart_and_test_each_case_once() -> None:
    cases = population()
    folds = patient_kfold(cases, folds=5, validation_fraction=0.1, seed=7)
    patient_of = {c.case_id: c.patient for c in cases}
    assert len(folds) == 5
    tested = [case for fold in folds for case in fold.test]
    assert sorted(tested) == sorted(patient_of)  # every case tested exactly once
    for fold in folds:
        parts = [{patient_of[i] for i in ids} for ids in (fold.train, fold.validation, fold.test)]
        assert parts[0] and parts[1] and parts[2]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sorted(fold.train + fold.validation + fold.test) == sorted(patient_of)


def test_folds_are_stratified_and_sized_like_the_paper() -> None:
    cases = population()
    everything = tuple(c.case_id for c in cases)
    overall = np.array(class_fractions(cases, everything))
    # Largest per-class deviation allowed (fraction points); validation holds only ~4 patients.
    tolerance = {"train": 0.03, "validation": 0.10, "test": 0.06}
    for seed in range(3):
        for fold in patient_kfold(cases, folds=5, validation_fraction=0.1, seed=seed):
            for part, ids, share in (
                ("train", fold.train, 0.7),
                ("validation", fold.validation, 0.1),
                ("test", fold.test, 0.2),
            ):
                assert abs(pixel_share(cases, ids) - share) < 0.03, part
                fractions = np.array(class_fractions(cases, ids))
                assert np.abs(fractions - overall).max() < tolerance[part], (part, fractions)


def test_stratified_test_parts_beat_random_patient_folds() -> None:
    """The stratification is doing work: random patient folds deviate more, on average."""
    cases = population()
    everything = tuple(c.case_id for c in cases)
    overall = np.array(class_fractions(cases, everything))

    def deviation(test_parts: list[tuple[str, ...]]) -> float:
        return float(
            np.mean(
                [
                    np.abs(np.array(class_fractions(cases, ids)) - overall).max()
                    for ids in test_parts
                ]
            )
        )

    ours = deviation([f.test for f in patient_kfold(cases, folds=5, seed=1)])
    patients = sorted({c.patient for c in cases})
    random_deviations = []
    for seed in range(10):
        order = np.random.default_rng(seed).permutation(patients)
        groups = [set(order[k::5]) for k in range(5)]
        random_deviations.append(
            deviation([tuple(c.case_id for c in cases if c.patient in g) for g in groups])
        )
    assert ours < 0.5 * float(np.mean(random_deviations))


def test_folds_are_reproducible_from_the_seed() -> None:
    cases = population()
    assert patient_kfold(cases, seed=3) == patient_kfold(cases, seed=3)
    assert patient_kfold(cases, seed=3) != patient_kfold(cases, seed=4)


def test_too_few_patients_is_an_input_error() -> None:
    cases = population(patients=4)
    with pytest.raises(InputError, match="too few for 5 folds"):
        patient_kfold(cases, folds=5)


def test_tiny_data_sets_still_get_a_validation_patient() -> None:
    cases = population(patients=5, seed=2)
    for fold in patient_kfold(cases, folds=2, validation_fraction=0.1, seed=0):
        assert fold.validation and fold.train and fold.test


def test_group_split_tests_only_the_test_groups() -> None:
    cases = population()
    fold = group_split(cases, test_groups=["clinic3"], validation_fraction=0.125, seed=0)
    group_of = {c.case_id: c.group for c in cases}
    patient_of = {c.case_id: c.patient for c in cases}
    assert {group_of[i] for i in fold.test} == {"clinic3"}
    assert {group_of[i] for i in fold.train + fold.validation} == {"clinic0", "clinic1", "clinic2"}
    assert not {patient_of[i] for i in fold.train} & {patient_of[i] for i in fold.validation}
    trainval = fold.train + fold.validation
    assert 0.05 < pixel_share(cases, fold.validation) / pixel_share(cases, trainval) < 0.2


def test_group_split_rejects_unknown_groups_and_shared_patients() -> None:
    cases = population()
    with pytest.raises(InputError, match="not in the manifest"):
        group_split(cases, test_groups=["mars"])
    moved = SplitCase("mosaics/extra.tif", cases[0].patient, "clinic3", cases[0].class_pixels)
    shared = [*cases, moved] if cases[0].group != "clinic3" else cases
    with pytest.raises(InputError, match="appear in training and test groups"):
        group_split(shared, test_groups=["clinic3"])


def test_fold_file_round_trip(tmp_path) -> None:
    cases = population(patients=12)
    folds = patient_kfold(cases, folds=3, seed=5)
    path = tmp_path / "folds.json"
    write_folds(path, folds, cases, {"seed": 5, "folds": 3})
    settings, again = read_folds(path)
    assert settings == {"seed": 5, "folds": 3}
    assert again == folds
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not a readable fold file"):
        read_folds(tmp_path / "bad.json")
