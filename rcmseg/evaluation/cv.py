"""Cross-validation as in the paper: one model per fold, evaluated on the fold's held-out part.

Layout of an output folder::

    OUT/folds.json                 fold assignment (case ids and patients per part, seed)
    OUT/fold_<i>/train/            the training run (rcmseg.training.train: checkpoints, log)
    OUT/fold_<i>/trained.json      written when the fold's training finished
    OUT/fold_<i>/evaluation/       metrics and report of the fold's test mosaics
    OUT/summary.csv, summary.json  per class: mean and standard deviation over folds
    OUT/per_fold.csv, report.md

Resumable: a fold whose evaluation exists is not touched, a fold whose training finished is only
evaluated, and an interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcmseg.errors import InputError
from rcmseg.evaluation import report
from rcmseg.evaluation.evaluate import Evaluation, evaluate_cases, read_finished_evaluation
from rcmseg.inference import resolve_device
from rcmseg.io.atomic import write_csv_atomic, write_text_atomic
from rcmseg.io.dataset import case_id, read_manifest
from rcmseg.splits import (
    SCENARIOS,
    Fold,
    SplitCase,
    group_split,
    patient_kfold,
    read_folds,
    split_cases_of,
    write_folds,
)
from rcmseg.training import TrainConfig, train

logger = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"


@dataclass
class SplitSettings:
    """How to split: Scenario 1 (``patients``, K folds) or Scenario 2 (``groups``).

    ``validation_fraction``: of all patients' pixels in Scenario 1 (default 0.1), of the training
    groups' pixels in Scenario 2 (default 0.125, the same 10/80 ratio). ``group_column`` is the
    manifest column naming groups (``clinic``; ``lesion`` and ``patient`` also work).
    """

    scenario: str = "patients"
    folds: int = 5
    validation_fraction: float | None = None
    test_groups: list[str] = field(default_factory=list)
    train_groups: list[str] = field(default_factory=list)
    group_column: str = "clinic"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise InputError(
                None, f"scenario must be one of {', '.join(SCENARIOS)}, not {self.scenario!r}"
            )
        if self.scenario == "groups" and not self.test_groups:
            raise InputError(None, "scenario 'groups' needs at least one test group")
        if self.group_column not in ("clinic", "lesion", "patient"):
            raise InputError(
                None, f"group column must be clinic, lesion or patient, not {self.group_column!r}"
            )

    def fraction(self) -> float:
        if self.validation_fraction is not None:
            return self.validation_fraction
        return 0.1 if self.scenario == "patients" else 0.125

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "folds": self.folds if self.scenario == "patients" else 1,
            "validation_fraction": self.fraction(),
            "test_groups": self.test_groups,
            "train_groups": self.train_groups,
            "group_column": self.group_column,
            "seed": self.seed,
        }


def make_folds(
    root: Path, settings: SplitSettings, remap: dict[int, int] | None = None
) -> tuple[list[Fold], list[SplitCase]]:
    """Fold assignment of a dataset under ``settings`` (deterministic for a seed)."""
    cases = split_cases_of(root, read_manifest(root), settings.group_column, remap)
    if settings.scenario == "patients":
        folds = patient_kfold(cases, settings.folds, settings.fraction(), settings.seed)
    else:
        folds = [
            group_split(
                cases,
                settings.test_groups,
                settings.train_groups or None,
                settings.fraction(),
                settings.seed,
            )
        ]
    return folds, cases


def prepare_folds(
    root: Path, out_dir: Path, settings: SplitSettings, remap: dict[int, int] | None = None
) -> list[Fold]:
    """Write ``OUT/folds.json`` or, when resuming, reuse it if it was made with ``settings``."""
    path = out_dir / FOLDS_FILE
    if path.is_file():
        saved, folds = read_folds(path)
        if saved != settings.to_json():
            raise InputError(
                path,
                "was written with other split settings "
                f"({saved}); use a new output folder or the same settings",
            )
        return folds
    folds, cases = make_folds(root, settings, remap)
    write_folds(path, folds, cases, settings.to_json())
    return folds


def load_trained_network(
    network: str, network_kwargs: dict[str, Any], weights: Path, device: torch.device
) -> torch.nn.Module:
    """The fold's best weights (weights-only file) in a fresh network, in eval mode."""
    from rcmseg.networks import get_network

    model = get_network(network, **network_kwargs)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def train_fold(
    root: Path,
    fold: Fold,
    fold_dir: Path,
    train_options: dict[str, Any],
    remap: dict[int, int] | None,
) -> Path:
    """Train the fold's model (or resume / reuse it); returns the best weights' path."""

    done = fold_dir / "trained.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        trained = Path(json.loads(done.read_text(encoding="utf-8"))["model_path"])
        if trained.is_file():
            return trained
    config = TrainConfig(
        data_dir=root,
        output_dir=fold_dir / "train",
        train_cases=list(fold.train),
        val_cases=list(fold.validation),
        label_remap=remap,
        resume=True,
        **train_options,
    )
    result = train(config)
    write_text_atomic(
        done,
        json.dumps(
            {
                "model_path": str(result.model_path),
                "best_epoch": result.best_epoch,
                "best_val_dice": result.best_val_dice,
                "epochs_completed": result.epochs_completed,
            },
            indent=1,
        )
        + "\n",
    )
    return Path(result.model_path)


@dataclass
class CVResult:
    """Each fold's evaluation on its test part and the mean ± sd over folds."""

    out_dir: Path
    evaluations: list[Evaluation]

    def fold_tables(self) -> list[dict[str, np.ndarray]]:
        return [e.pooled() for e in self.evaluations]

    def summary(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Mean and sample standard deviation over folds (NaN sd with a single fold)."""
        return fold_statistics(self.fold_tables())


def fold_statistics(
    tables: Sequence[dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and sample standard deviation (ddof 1) over folds of each metric, NaNs skipped."""
    means, stds = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for metric in report.METRICS:
            stacked = np.stack([t[metric] for t in tables])
            means[metric] = np.nanmean(stacked, axis=0)
            stds[metric] = (
                np.nanstd(stacked, axis=0, ddof=1)
                if len(tables) > 1
                else np.full(stacked.shape[1], np.nan)
            )
    return means, stds


def run_cv(
    data_dir: str | Path,
    out_dir: str | Path,
    split: SplitSettings | None = None,
    train_options: dict[str, Any] | None = None,
    preset: str = "fast",
    device: str = "auto",
    remap: dict[int, int] | None = None,
    overlays: int = 2,
    folds_file: Path | None = None,
    title: str = "Cross-validation",
    progress: bool = True,
) -> CVResult:
    """Train and evaluate one model per fold; write per-fold and summary reports.

    ``train_options`` are :class:`rcmseg.training.TrainConfig` fields (``network``, ``loss``,
    ``max_epochs``, ``batch_size``, ``iterations_per_epoch``, ...). ``folds_file`` reuses a fold
    assignment (a study shares one between its variants).
    """
    root, out = Path(data_dir), Path(out_dir)
    split = split or SplitSettings()
    out.mkdir(parents=True, exist_ok=True)
    if folds_file is not None:
        _settings, folds = read_folds(folds_file)
    else:
        folds = prepare_folds(root, out, split, remap)
    options = {"device": device, "progress": progress, **(train_options or {})}
    network = options.get("network", TrainConfig.network)
    network_kwargs = options.get("network_kwargs", {})
    cases = {case_id(c, root): c for c in read_manifest(root)}
    evaluations = []
    for fold in folds:
        fold_dir = out / f"fold_{fold.index}"
        finished = read_finished_evaluation(fold_dir / "evaluation")
        if finished is not None:  # finished earlier: not retrained, not re-evaluated
            evaluations.append(finished)
            logger.info(
                "%s, fold %d (of %d): kept from an earlier run", title, fold.index, len(folds)
            )
            continue
        missing = [i for i in fold.test if i not in cases]
        if missing:  # the manifest changed since folds.json was written
            raise InputError(
                root, f"fold {fold.index} tests {missing[0]}, which the manifest no longer lists"
            )
        # each fold trains from its own seed, derived from the run's seed
        fold_options = {**options, "seed": int(options.get("seed", split.seed)) + fold.index}
        weights = train_fold(root, fold, fold_dir, fold_options, remap)
        model = load_trained_network(network, network_kwargs, weights, resolve_device(device))
        notes = [
            f"Fold {fold.index}: {len(fold.train)} training, {len(fold.validation)} "
            f"validation and {len(fold.test)} test mosaics; network `{network}`, "
            f"loss `{options.get('loss', 'mdsc_tv')}`, preset `{preset}`."
        ]
        evaluations.append(
            evaluate_cases(
                model,
                [cases[i] for i in fold.test],
                root,
                fold_dir / "evaluation",
                preset=preset,
                device=resolve_device(device),
                remap=remap,
                overlays=overlays,
                title=f"{title}: fold {fold.index}",
                notes=notes,
                progress=progress,
            )
        )
        logger.info(
            "%s, fold %d (of %d): mean Dice %.3f on %d test mosaics",
            title,
            fold.index,
            len(folds),
            evaluations[-1].pooled()["dice"][-1],
            len(fold.test),
        )
    result = CVResult(out, evaluations)
    write_cv_report(result, title, options, preset)
    return result


def write_cv_report(result: CVResult, title: str, options: dict[str, Any], preset: str) -> None:
    """summary.csv/json (mean ± sd over folds per class), per_fold.csv and report.md."""
    out = result.out_dir
    tables = result.fold_tables()
    means, stds = result.summary()
    report.write_metric_csv(out / "summary.csv", means, stds)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "folds": len(tables),
                "rows": list(report.ROWS),
                "mean": {m: v.tolist() for m, v in means.items()},
                "std": {m: v.tolist() for m, v in stds.items()},
                "per_fold": [{m: v.tolist() for m, v in t.items()} for t in tables],
                "training": {k: v for k, v in options.items() if k != "progress"},
                "preset": preset,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    rows = [
        [index, name] + [report.csv_number(float(t[m][i])) for m in report.METRICS]
        for index, t in enumerate(tables)
        for i, name in enumerate(report.ROWS)
    ]
    write_csv_atomic(out / "per_fold.csv", ["fold", "class", *report.METRICS], rows)
    header = ["", "sensitivity", "specificity", "Dice"]
    spread = "mean ± standard deviation over folds" if len(tables) > 1 else "single split"
    settings = ", ".join(f"{k}={v}" for k, v in options.items() if k != "progress")
    lines = [
        f"# {title}",
        "",
        f"{len(tables)} fold(s); training: {settings}; inference preset "
        f"`{preset}`. Each fold's metrics are pooled over its test mosaics' labelled pixels "
        f"(one-vs-rest per class); the table gives the {spread}.",
        "",
        report.markdown_table(header, report.metric_rows(means, stds)),
        "",
        "Per-fold reports: "
        + ", ".join(f"[fold {i}](fold_{i}/evaluation/report.md)" for i in range(len(tables))),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
