"""`rcmseg study`: several variants cross-validated on shared folds, one comparison table."""

from __future__ import annotations

from typing import Annotated

import typer

from rcmseg.cli.common import DeviceOption, exit_on_interrupt, note_unknown_pixel_sizes, user_errors
from rcmseg.cli.cv import (
    BatchSize,
    Bundle,
    Data,
    Epochs,
    Folds,
    GroupColumn,
    Iterations,
    LearningRate,
    Optimizer,
    Out,
    PatchSize,
    Preset,
    Remap,
    Scenario,
    Seed,
    TestGroup,
    Threads,
    TrainGroup,
    ValidationFraction,
    split_settings,
    train_options,
)
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads


def study_command(
    data: Data,
    out: Out,
    study: Annotated[
        str | None,
        typer.Option(
            help="A preset list of variants: levels (MED-Net 3/2/1 levels), losses (ce, dice, "
            "mdsc_tv), baselines (MED-Net, U-Net, FCN, SegNet, DeepLab, DynUNet, MED-Net with "
            "U-Net levels) or paper (all)."
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant", help="A variant network[:loss], e.g. mednet1 or unet:ce (repeatable)."
        ),
    ] = None,
    bundle: Bundle = None,
    scenario: Scenario = "patients",
    folds: Folds = 5,
    validation_fraction: ValidationFraction = None,
    test_group: TestGroup = None,
    train_group: TrainGroup = None,
    group_column: GroupColumn = "clinic",
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
    """Run a study (variants × scenario) and write OUT/comparison.md and OUT/comparison.csv.

    Every variant uses the same folds (OUT/folds.json) and the same training recipe: the
    bundle's configs/train.json with the options given here on top. Resumable.
    """
    with user_errors():
        check_output_folder(out)
        from rcmseg.errors import InputError
        from rcmseg.evaluation.study import STUDIES, Variant, run_study
        from rcmseg.io.labels import load_remap_table
        from rcmseg.training.bundle import bundle_train_settings, with_overrides
        from rcmseg.training.monitor import show_log_above_the_bar

        note_unknown_pixel_sizes(data)
        show_log_above_the_bar()  # each fold's training and Dice, above the bar

        if study is not None and study not in STUDIES:
            raise InputError(None, f"unknown study {study!r}; choose from {', '.join(STUDIES)}")
        variants = list(STUDIES[study]) if study else []
        variants += [Variant.parse(text) for text in variant or []]
        if not variants:
            raise InputError(None, "give --study or at least one --variant")
        variants = list(dict.fromkeys(variants))
        split = split_settings(
            scenario, folds, validation_fraction, test_group, train_group, group_column, seed
        )
        resumable = f"finished runs are kept in {out}; run the same command again to go on"
        with exit_on_interrupt(resumable):
            run_study(
                variants,
                data,
                out,
                split,
                {
                    **with_overrides(
                        bundle_train_settings(bundle),
                        train_options(
                            epochs,
                            batch_size,
                            iterations_per_epoch,
                            lr,
                            optimizer,
                            threads,
                            seed,
                            patch_size,
                        ),
                    ),
                    "val_preset": preset,
                },
                preset=preset,
                device=device,
                remap=load_remap_table(remap) if remap is not None else None,
                title=f"Study: {study or 'custom'}",
            )
        typer.echo((out / "comparison.md").read_text())


def register(app: typer.Typer) -> None:
    """Add ``rcmseg study`` to the application."""
    app.command("study")(study_command)
