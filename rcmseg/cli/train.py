"""`rcmseg train`: train a network on a dataset (`train model`) or a bundle's network through its
``train.json`` (`train bundle`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from rcmseg.cli.common import (
    BUNDLE_DEFAULT,
    DEVICE_HELP,
    DeviceOption,
    exit_on_interrupt,
    note_unknown_pixel_sizes,
    user_errors,
)
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads

train_app = typer.Typer(
    help="Train a segmentation network (the bundle's DynUNet, MED-Net or a baseline) on labelled "
    "mosaics with the paper's protocol.",
    no_args_is_help=True,
)

Epochs = Annotated[int | None, typer.Option(help="Epochs (paper: 200).")]
Fold = Annotated[
    int | None, typer.Option(help="Validation fold of the patient-wise split (0-based).")
]
Device = Annotated[str | None, typer.Option(help=DEVICE_HELP)]
Seed = Annotated[int | None, typer.Option(help="Seed of every random choice.")]
Iterations = Annotated[
    int | None,
    typer.Option("--iterations", help="Cap on optimiser steps per epoch, for quick runs."),
]
BatchSize = Annotated[int | None, typer.Option(help="Patches per step (paper: 48).")]


def _summary(result: Any) -> str:
    dice = "n/a" if math.isnan(result.best_val_dice) else f"{result.best_val_dice:.3f}"
    return (
        f"{result.epochs_completed} epochs; best validation Dice {dice} at epoch "
        f"{result.best_epoch}; weights: {result.model_path}; log: {result.log_path}"
    )


def _kept_checkpoint(run_dir: Path) -> str:
    """What an interrupted training keeps, and how to go on."""
    from rcmseg.training.loop import RunPaths

    paths = RunPaths(run_dir)
    resume = "; run the same command with --resume to go on" if paths.last.is_file() else ""
    return paths.kept_note() + resume


@train_app.command("model")
def train_model_command(
    data: Annotated[Path, typer.Argument(help="Dataset folder with manifest.csv (rcmseg layout).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: checkpoints, log, model.pt.")
    ],
    epochs: Annotated[int, typer.Option(help="Epochs (paper: 200).")] = 200,
    batch_size: Annotated[int, typer.Option(help="Patches per step (paper: 48).")] = 48,
    lr: Annotated[float, typer.Option(help="Learning rate of the first epoch.")] = 0.01,
    final_lr: Annotated[
        float, typer.Option(help="Learning rate of the last epoch (exponential decay in between).")
    ] = 0.001,
    optimizer: Annotated[str, typer.Option(help="sgd (momentum 0.9), adam or adamw.")] = "sgd",
    network: Annotated[
        str,
        typer.Option(
            help="dynunet_ds (the bundle's default: DynUNet with deep supervision), dynunet, "
            "mednet (MED-Net, 3 levels), mednet2, mednet1, mednet_legacy, mednet2_legacy, "
            "mednet_deep, mednet_deep_noprior, mednet_unet, mednet_unet_in, mednet_dynunet, "
            "dynunet_tiny (rcm_lite's), unet, fcn, segnet or deeplab."
        ),
    ] = "dynunet_ds",
    loss: Annotated[
        str, typer.Option(help="mdsc_tv (paper), dice, ce or mdsc_tv_ce (+ cross-entropy).")
    ] = "mdsc_tv",
    level_weights: Annotated[
        list[float] | None,
        typer.Option(
            "--level-weight",
            help="Deep-supervision weight per output, coarse to fine (repeat it; default all 1).",
        ),
    ] = None,
    fold: Annotated[
        int, typer.Option(help="Validation fold of the patient-wise split (0-based).")
    ] = 0,
    folds: Annotated[int, typer.Option(help="Number of patient-wise folds.")] = 5,
    val_every: Annotated[int, typer.Option(help="Validate every this many epochs.")] = 1,
    preset: Annotated[
        str, typer.Option(help="Sliding-window preset used to segment the validation mosaics.")
    ] = "fast",
    patch_size: Annotated[int, typer.Option(help="Crop side in px at 2 µm/px (paper: 256).")] = 256,
    iterations: Iterations = None,
    augmentation: Annotated[
        str,
        typer.Option(
            help="batched (on the device), per_patch (MONAI transforms in the DataLoader) or none."
        ),
    ] = "batched",
    augment_appearance: Annotated[
        bool,
        typer.Option(
            # a flag alone: its off switch made the option column of this help twice as wide
            "--augment-appearance",
            help="Also randomise sharpness, tone curve and contrast (beyond the paper; batched).",
        ),
    ] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Distil from this bundle: its probabilities are the targets where the expert "
            "labelled nothing (e.g. a smaller, faster network learning from the bundle's)."
        ),
    ] = None,
    teacher_weights: Annotated[
        Path | None, typer.Option(help="The teacher's weights (default: its models/model.pt).")
    ] = None,
    teacher_blend: Annotated[
        float, typer.Option(help="The teacher's weight at labelled pixels, 0-1.")
    ] = 0.0,
    device: DeviceOption = "auto",
    amp: Annotated[
        bool, typer.Option(help="Mixed precision: fp16 on CUDA, bf16 on CPUs with native bf16.")
    ] = True,
    workers: Annotated[int, typer.Option(help="DataLoader processes for augmentation.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    remap: Annotated[
        Path | None,
        typer.Option(help="Label remapping table (.json/.csv) for label maps in another encoding."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/checkpoints/last.pt if it exists.")
    ] = False,
    stop_after: Annotated[
        int | None,
        typer.Option(help="Stop after this many epochs in this call (resume later with --resume)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train with per-epoch patch sampling, augmentation and validation Dice on whole mosaics.

    Writes OUT/model.pt (best weights, weights only), OUT/checkpoints/{best,last}.pt and
    OUT/train_log.csv/.json.
    """
    with user_errors():
        check_output_folder(out)
        from rcmseg.io.labels import load_remap_table
        from rcmseg.training import TrainConfig, train

        note_unknown_pixel_sizes(data)

        if not progress:  # one line per epoch instead of the bar
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        else:
            from rcmseg.training.monitor import show_log_above_the_bar

            show_log_above_the_bar()

        table = load_remap_table(remap) if remap is not None else None
        config = TrainConfig(
            data_dir=data,
            output_dir=out,
            max_epochs=epochs,
            batch_size=batch_size,
            learning_rate=lr,
            final_learning_rate=final_lr,
            optimizer=optimizer,
            network=network,
            loss=loss,
            level_weights=list(level_weights) if level_weights else None,
            fold=fold,
            num_folds=folds,
            val_every=val_every,
            val_preset=preset,
            patch_size=patch_size,
            window=2 * patch_size,
            iterations_per_epoch=iterations,
            augmentation=augmentation,
            augment_appearance=augment_appearance,
            teacher=teacher,
            teacher_weights=teacher_weights,
            teacher_blend=teacher_blend,
            device=device,
            amp=amp,
            num_workers=workers,
            threads=threads,
            seed=seed,
            resume=resume,
            stop_after_epochs=stop_after,
            progress=progress,
            label_remap=table,
        )
        with exit_on_interrupt(lambda: _kept_checkpoint(out)):
            result = train(config)
        typer.echo(_summary(result))


@train_app.command("bundle")
def train_bundle_command(
    bundle: Annotated[
        Path | None,
        typer.Argument(help=f"MONAI bundle folder ({BUNDLE_DEFAULT})."),
    ] = None,
    data: Annotated[Path, typer.Option("--data", help="Dataset folder with manifest.csv.")] = ...,
    epochs: Epochs = None,
    fold: Fold = None,
    device: Device = None,
    seed: Seed = None,
    batch_size: BatchSize = None,
    iterations: Iterations = None,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader processes for augmentation.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the bundle's last checkpoint if it exists.")
    ] = False,
) -> None:
    """Train the bundle's network through its configs/train.json.

    Writes BUNDLE/models/model.pt (best weights) and the run (checkpoints, train_log.csv) to
    BUNDLE/runs/train. Options not given keep the values in train.json.
    """
    with user_errors():
        from rcmseg.bundle import default_bundle_dir
        from rcmseg.training.bundle import train_bundle

        note_unknown_pixel_sizes(data)

        overrides = {
            "epochs": epochs,
            "fold": fold,
            "device": device,
            "seed": seed,
            "batch_size": batch_size,
            "iterations_per_epoch": iterations,
            "num_workers": workers,
        }
        bundle = bundle or default_bundle_dir()
        if bundle.is_dir():  # a missing bundle or a zip is load_bundle's to name
            for written in ("models", "runs"):  # the trained weights and the run go there
                check_output_folder(bundle / written, "bundle (train a copy of it)")
        with exit_on_interrupt(lambda: _kept_checkpoint(bundle / "runs" / "train")):
            result = train_bundle(
                bundle,
                data,
                resume=resume,
                **{key: value for key, value in overrides.items() if value is not None},
            )
        typer.echo(_summary(result))


def register(app: typer.Typer) -> None:
    """Add ``rcmseg train model`` and ``rcmseg train bundle`` to the application."""
    app.add_typer(train_app, name="train")
