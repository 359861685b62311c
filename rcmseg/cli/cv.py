"""`rcmseg cv`: the paper's evaluation scenarios, one trained model per fold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rcmseg.cli.common import (
    BUNDLE_DEFAULT,
    DeviceOption,
    exit_on_interrupt,
    note_unknown_pixel_sizes,
    user_errors,
)
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads

# Options shared with `rcmseg study` (same split, same training budget flags).
Data = Annotated[Path, typer.Argument(help="Dataset folder with manifest.csv (rcmseg layout).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (resumable).")]
Scenario = Annotated[
    str,
    typer.Option(
        help="patients: patient-wise stratified K-fold (Scenario 1); groups: train on some "
        "manifest groups, test on others (Scenario 2)."
    ),
]
Folds = Annotated[int, typer.Option(help="Number of folds (Scenario 1).")]
ValidationFraction = Annotated[
    float | None,
    typer.Option(
        help="Validation share: of all data in Scenario 1 (default 0.1), of the training groups in "
        "Scenario 2 (default 0.125)."
    ),
]
TestGroup = Annotated[
    list[str] | None,
    typer.Option("--test-group", help="Group tested in Scenario 2 (repeat for several)."),
]
TrainGroup = Annotated[
    list[str] | None,
    typer.Option(
        "--train-group", help="Group trained on in Scenario 2 (default: all other groups)."
    ),
]
GroupColumn = Annotated[str, typer.Option(help="Manifest column naming groups.")]
Seed = Annotated[int, typer.Option(help="Seed of the fold assignment and of training.")]
Epochs = Annotated[int | None, typer.Option(help="Training epochs per model (default 200).")]
BatchSize = Annotated[int | None, typer.Option(help="Patches per step (default 48).")]
Iterations = Annotated[
    int | None, typer.Option(help="Cap on optimiser steps per epoch, for quick runs.")
]
LearningRate = Annotated[float | None, typer.Option("--lr", help="Base learning rate.")]
Optimizer = Annotated[str | None, typer.Option(help="sgd, adam or adamw.")]
Preset = Annotated[str, typer.Option(help="Inference preset for the test mosaics: fast or paper.")]
Remap = Annotated[Path | None, typer.Option(help="Label remapping table (.json/.csv).")]
Threads = Annotated[int | None, typer.Option(help="torch threads for training.")]
Bundle = Annotated[
    Path | None,
    typer.Option(
        help="Bundle whose configs/train.json gives the training recipe "
        f"({BUNDLE_DEFAULT}); the options below override it."
    ),
]
PatchSize = Annotated[
    int | None,
    typer.Option(help="Training crop side in px at 2 µm/px (default 256; windows twice that)."),
]


def train_options(
    epochs: int | None,
    batch_size: int | None,
    iterations: int | None,
    lr: float | None,
    optimizer: str | None,
    threads: int | None,
    seed: int,
    patch_size: int | None = None,
) -> dict[str, Any]:
    """TrainConfig fields given on the command line (they override the bundle's recipe)."""
    given = {
        "max_epochs": epochs,
        "batch_size": batch_size,
        "iterations_per_epoch": iterations,
        "learning_rate": lr,
        "optimizer": optimizer,
        "threads": threads,
        "patch_size": patch_size,
        "window": 2 * patch_size if patch_size else None,
    }
    return {"seed": seed, **{key: value for key, value in given.items() if value is not None}}


def split_settings(
    scenario: str,
    folds: int,
    validation_fraction: float | None,
    test_group: list[str] | None,
    train_group: list[str] | None,
    group_column: str,
    seed: int,
):
    from rcmseg.evaluation.cv import SplitSettings

    return SplitSettings(
        scenario=scenario,
        folds=folds,
        validation_fraction=validation_fraction,
        test_groups=list(test_group or []),
        train_groups=list(train_group or []),
        group_column=group_column,
        seed=seed,
    )


def cv_command(
    data: Data,
    out: Out,
    scenario: Scenario = "patients",
    folds: Folds = 5,
    validation_fraction: ValidationFraction = None,
    test_group: TestGroup = None,
    train_group: TrainGroup = None,
    group_column: GroupColumn = "clinic",
    bundle: Bundle = None,
    network: Annotated[
        str | None,
        typer.Option(
            help="dynunet_ds, dynunet, mednet, mednet2, mednet1, mednet_unet_in, "
            "mednet_dynunet, unet, fcn, segnet, deeplab, … (default: the bundle's)."
        ),
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="mdsc_tv, dice, ce or mdsc_tv_ce (default: the bundle's).")
    ] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    iterations_per_epoch: Iterations = None,
    patch_size: PatchSize = None,
    lr: LearningRate = None,
    optimizer: Optimizer = None,
    seed: Seed = 0,
    device: DeviceOption = "auto",
    preset: Preset = "fast",
    remap: Remap = None,
    threads: Threads = None,
) -> None:
    """Cross-validate: train one model per fold, test it on the held-out part, report mean ± sd.

    Every fold trains with the bundle's recipe (configs/train.json: network, loss, optimiser,
    schedule, patch sampling, augmentation); the options given here override it.

    Writes OUT/folds.json (reproducible from --seed), OUT/fold_<i>/ (training run and test
    report), OUT/summary.csv and OUT/report.md. Run again to resume: finished folds are kept.
    """
    with user_errors():
        check_output_folder(out)
        from rcmseg.evaluation.cv import run_cv
        from rcmseg.evaluation.report import format_value
        from rcmseg.evaluation.study import Variant
        from rcmseg.io.labels import load_remap_table
        from rcmseg.training.bundle import bundle_train_settings, with_overrides, with_variant
        from rcmseg.training.monitor import show_log_above_the_bar

        note_unknown_pixel_sizes(data)
        show_log_above_the_bar()  # each fold's training and Dice, above the bar

        base = bundle_train_settings(bundle)
        variant = Variant.parse(f"{network or base['network']}:{loss or base['loss']}")
        options = with_overrides(
            with_variant(base, variant.network, variant.loss),
            train_options(
                epochs, batch_size, iterations_per_epoch, lr, optimizer, threads, seed, patch_size
            ),
        )
        # validation during training segments with the same preset as the test mosaics
        options["val_preset"] = preset
        split = split_settings(
            scenario, folds, validation_fraction, test_group, train_group, group_column, seed
        )
        resumable = f"finished folds are kept in {out}; run the same command again to go on"
        with exit_on_interrupt(resumable):
            result = run_cv(
                data,
                out,
                split,
                options,
                preset=preset,
                device=device,
                remap=load_remap_table(remap) if remap is not None else None,
                title=f"Cross-validation: {variant.name}",
            )
        means, stds = result.summary()
        typer.echo(
            f"{len(result.evaluations)} fold(s): mean Dice "
            f"{format_value(means['dice'][-1], stds['dice'][-1])}; "
            f"report: {out / 'report.md'}"
        )


def register(app: typer.Typer) -> None:
    """Add ``rcmseg cv`` to the application."""
    app.command("cv")(cv_command)
