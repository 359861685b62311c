"""Patient-wise data splits: the one place where rcmseg decides which mosaics train and which
are held out, for ``rcmseg train`` (``--fold``), ``rcmseg cv``/``study`` and the MONAI Label app.

The patients are shared between ``K`` class-stratified groups by :func:`stratified_partition`;
group ``k`` is the held-out group of fold ``k`` everywhere: the validation mosaics of
``rcmseg train model --fold k --num-folds K`` are the test mosaics of fold ``k`` of
``rcmseg cv --folds K`` with the same seed.

The paper's two evaluation scenarios:

Scenario 1 (``patients``): patient-wise, class-stratified K-fold cross-validation; each fold holds
out one K-th of the patients for testing and about ``validation_fraction`` of all patients for
validation (5 folds and 0.1 give the paper's ~70/10/20 % train/validation/test).
Scenario 2 (``groups``): train and validate on some manifest groups (e.g. clinics in Italy), test
on the others (e.g. US clinics).

Stratification works on labelled-pixel counts per class, so that every part of a fold sees about
the dataset's class distribution. Patients are never split: all mosaics of a patient go to the
same part. Everything is reproducible from the seed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rcmseg.classes import NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.io.dataset import Case, case_id
from rcmseg.io.labels import read_label_map

SCENARIOS = ("patients", "groups")


@dataclass(frozen=True)
class SplitCase:
    """What a split needs to know about one labelled mosaic.

    ``case_id`` is the mosaic path relative to the dataset root; ``class_pixels`` (K,) int64 counts
    labelled pixels per class (any resolution, used only as proportions).
    """

    case_id: str
    patient: str
    group: str
    class_pixels: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Fold:
    """One fold: case ids for training, validation (model selection) and testing."""

    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def parts(self) -> dict[str, tuple[str, ...]]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def _patient_pixels(cases: Sequence[SplitCase]) -> dict[str, np.ndarray]:
    totals: dict[str, np.ndarray] = {}
    for case in cases:
        counts = np.asarray(case.class_pixels, dtype=np.float64)
        totals[case.patient] = totals.get(case.patient, np.zeros(NUM_CLASSES)) + counts
    return totals


def stratified_partition(
    patient_pixels: dict[str, np.ndarray],
    weights: Sequence[float],
    seed: int,
    max_sweeps: int = 100,
) -> list[list[str]]:
    """Share patients between parts so each part gets ``weights[p]`` of every class's pixels.

    Patients are dealt in a seeded random order, each to the part that most lacks its classes;
    then a local search moves single patients or swaps pairs between parts while that lowers
    the squared deviation from the targets, each class measured relative to its total (so rare
    classes count as much as common ones). No move empties a part. Different seeds give
    different, equally stratified, assignments.
    """
    rng = np.random.default_rng(seed)
    names = sorted(patient_pixels)
    pixels = np.array([np.asarray(patient_pixels[p], dtype=np.float64) for p in names])
    pixels = pixels.reshape(len(names), -1)
    parts = len(weights)
    weight = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    total = pixels.sum(axis=0)
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    target = weight[:, None] * total[None, :]
    load = np.zeros_like(target)
    assign = np.full(len(names), -1)
    for i in rng.permutation(len(names)):
        lack = ((target - load) * scale).sum(axis=1) + (
            np.bincount(assign[assign >= 0], minlength=parts) == 0
        )  # empty parts first
        assign[i] = int(np.argmax(lack))
        load[assign[i]] += pixels[i]

    def part_cost(loads: np.ndarray, part: np.ndarray) -> np.ndarray:
        return (((loads - target[part]) * scale) ** 2).sum(axis=-1)

    for _ in range(max_sweeps):
        improved = False
        for i in rng.permutation(len(names)):
            a = assign[i]
            count_a = int(np.sum(assign == a))
            # moves of i to every other part b
            others = np.array([b for b in range(parts) if b != a])
            move = (
                part_cost(load[a] - pixels[i], np.array(a))
                + part_cost(load[others] + pixels[i], others)
                - part_cost(load[a], np.array(a))
                - part_cost(load[others], others)
            )
            if count_a == 1:
                move[:] = np.inf
            # swaps of i with every patient j of another part
            diff = pixels - pixels[i]
            swap = (
                part_cost(load[a] + diff, np.full(len(names), a))
                + part_cost(load[assign] - diff, assign)
                - part_cost(load[a], np.array(a))
                - part_cost(load[assign], assign)
            )
            swap[assign == a] = np.inf
            if min(move.min(initial=np.inf), swap.min()) >= -1e-12:
                continue
            improved = True
            if move.min(initial=np.inf) <= swap.min():
                b = int(others[np.argmin(move)])
                load[a] -= pixels[i]
                load[b] += pixels[i]
                assign[i] = b
            else:
                j = int(np.argmin(swap))
                b = assign[j]
                load[a] += diff[j]
                load[b] -= diff[j]
                assign[i], assign[j] = b, a
        if not improved:
            break
    return [[names[i] for i in np.flatnonzero(assign == part)] for part in range(parts)]


def _cases_of(cases: Sequence[SplitCase], patients: Sequence[str]) -> tuple[str, ...]:
    chosen = set(patients)
    return tuple(sorted(c.case_id for c in cases if c.patient in chosen))


def _split_validation(
    cases: Sequence[SplitCase], patients: Sequence[str], fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split ``patients`` into (train, validation) with ``fraction`` of the pixels in validation.

    Keeps at least one patient on each side when there are two or more.
    """
    pixels = _patient_pixels([c for c in cases if c.patient in set(patients)])
    validation, train = stratified_partition(pixels, [fraction, 1.0 - fraction], seed)
    if not validation and len(train) > 1:  # tiny data sets: the smallest patient validates
        smallest = min(train, key=lambda p: (pixels[p].sum(), p))
        train.remove(smallest)
        validation.append(smallest)
    if not train and len(validation) > 1:
        largest = max(validation, key=lambda p: (pixels[p].sum(), p))
        validation.remove(largest)
        train.append(largest)
    return train, validation


def patient_kfold(
    cases: Sequence[SplitCase], folds: int = 5, validation_fraction: float = 0.1, seed: int = 0
) -> list[Fold]:
    """Scenario 1: patient-wise, class-stratified K-fold cross-validation.

    Each patient is tested in exactly one fold; within a fold a patient is in one part only.
    ``validation_fraction`` is a fraction of all patients' pixels (0.1 with 5 folds gives the
    paper's ~70/10/20 %).
    """
    if folds < 2:
        raise InputError(None, f"cross-validation needs at least 2 folds, got {folds}")
    patient_pixels = _patient_pixels(cases)
    if len(patient_pixels) < folds + 1:
        raise InputError(
            None,
            f"{len(patient_pixels)} patients with labelled mosaics are too "
            f"few for {folds} folds (need at least {folds + 1})",
        )
    if not 0.0 < validation_fraction < 1.0 - 1.0 / folds:
        raise InputError(
            None,
            f"validation fraction {validation_fraction} must lie in "
            f"(0, {1.0 - 1.0 / folds:.2f}) with {folds} folds",
        )
    test_parts = stratified_partition(patient_pixels, [1.0] * folds, seed)
    # validation takes validation_fraction of all data out of the (1 - 1/K) left for training
    inner_fraction = validation_fraction / (1.0 - 1.0 / folds)
    result = []
    for index, test_patients in enumerate(test_parts):
        rest = [p for p in patient_pixels if p not in set(test_patients)]
        train, validation = _split_validation(cases, rest, inner_fraction, seed + 1 + index)
        result.append(
            Fold(
                index,
                _cases_of(cases, train),
                _cases_of(cases, validation),
                _cases_of(cases, test_patients),
            )
        )
    return result


def group_split(
    cases: Sequence[SplitCase],
    test_groups: Sequence[str],
    train_groups: Sequence[str] | None = None,
    validation_fraction: float = 0.125,
    seed: int = 0,
) -> Fold:
    """Scenario 2: train/validate on ``train_groups`` (default: the others), test on the rest.

    ``validation_fraction`` is the share of the training groups' pixels used for validation,
    split patient-wise and stratified. A patient seen in both a training and a test group is an
    error: the scenario promises unseen patients.
    """
    groups = sorted({c.group for c in cases})
    unknown = sorted((set(test_groups) | set(train_groups or ())) - set(groups))
    if unknown:
        raise InputError(
            None, f"group(s) {', '.join(unknown)} not in the manifest (groups: {', '.join(groups)})"
        )
    train_set = set(train_groups) if train_groups else set(groups) - set(test_groups)
    if train_set & set(test_groups):
        raise InputError(
            None, f"groups {sorted(train_set & set(test_groups))} are both training and test groups"
        )
    test_cases = [c for c in cases if c.group in set(test_groups)]
    train_cases = [c for c in cases if c.group in train_set]
    shared = {c.patient for c in test_cases} & {c.patient for c in train_cases}
    if shared:
        raise InputError(
            None, f"patient(s) {', '.join(sorted(shared))} appear in training and test groups"
        )
    if not test_cases or not train_cases:
        raise InputError(
            None,
            "the group split leaves no labelled mosaics to "
            + ("test" if not test_cases else "train"),
        )
    patients = sorted({c.patient for c in train_cases})
    train, validation = _split_validation(train_cases, patients, validation_fraction, seed)
    return Fold(
        0,
        _cases_of(train_cases, train),
        _cases_of(train_cases, validation),
        tuple(sorted(c.case_id for c in test_cases)),
    )


def class_fractions(cases: Sequence[SplitCase], case_ids: Sequence[str]) -> list[float]:
    """Per-class share of the labelled pixels of ``case_ids`` (sums to 1; zeros if none)."""
    chosen = set(case_ids)
    total = np.zeros(NUM_CLASSES)
    for case in cases:
        if case.case_id in chosen:
            total += np.asarray(case.class_pixels, dtype=np.float64)
    return (total / total.sum()).tolist() if total.sum() > 0 else total.tolist()


def write_folds(
    path: Path, folds: Sequence[Fold], cases: Sequence[SplitCase], settings: dict
) -> None:
    """Write the fold assignment (case ids, patients and class fractions per part) as JSON."""
    patient_of = {c.case_id: c.patient for c in cases}
    records = []
    for fold in folds:
        record = asdict(fold)
        record["patients"] = {
            name: sorted({patient_of[i] for i in ids}) for name, ids in fold.parts().items()
        }
        record["class_fractions"] = {
            name: [round(v, 4) for v in class_fractions(cases, ids)]
            for name, ids in fold.parts().items()
        }
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "folds": records}, indent=1) + "\n")


def read_folds(path: Path) -> tuple[dict, list[Fold]]:
    """Read a fold file written by :func:`write_folds`: (settings, folds)."""
    try:
        data = json.loads(Path(path).read_text())
        folds = [
            Fold(int(r["index"]), tuple(r["train"]), tuple(r["validation"]), tuple(r["test"]))
            for r in data["folds"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"not a readable fold file ({error})") from None
    return data.get("settings", {}), folds


def split_cases_of(
    root: Path,
    cases: Sequence[Case],
    group_column: str = "clinic",
    remap: dict[int, int] | None = None,
) -> list[SplitCase]:
    """Labelled cases with their labelled-pixel count per class (label maps read once)."""
    result = []
    for case in cases:
        if case.labels is None:
            continue
        labels = read_label_map(case.labels, remap=remap)
        counts = np.bincount(labels.reshape(-1), minlength=256)[:NUM_CLASSES].astype(np.int64)
        result.append(
            SplitCase(
                case_id(case, root), str(case.patient), str(getattr(case, group_column)), counts
            )
        )
    if not result:
        raise InputError(root, "no labelled mosaics (the manifest's labels column is empty)")
    return result


def holdout_fold(
    cases: Sequence[SplitCase], fold: int, num_folds: int, seed: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train, held_out)`` case ids: group ``fold`` of the ``num_folds`` stratified patient
    groups is held out, the rest trains; the held-out group is the test part of fold ``fold`` of
    :func:`patient_kfold` with the same seed. With fewer patients than folds some groups are
    empty (their fold validates on nothing).
    """
    patient_pixels = _patient_pixels(cases)
    if num_folds < 2:
        return _cases_of(cases, list(patient_pixels)), ()
    groups = stratified_partition(patient_pixels, [1.0] * num_folds, seed)
    held_out = groups[fold]
    rest = [p for p in patient_pixels if p not in set(held_out)]
    return _cases_of(cases, rest), _cases_of(cases, held_out)


def holdout_fraction(
    cases: Sequence[SplitCase], fraction: float, seed: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train, held_out)`` case ids with about ``fraction`` of the labelled pixels held out
    (at least one patient on each side when there are two or more)."""
    patients = sorted(_patient_pixels(cases))
    train, held_out = _split_validation(cases, patients, fraction, seed)
    return _cases_of(cases, train), _cases_of(cases, held_out)
