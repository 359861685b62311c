"""`rcmseg synth`: write a synthetic RCM data set (mosaics, partial label maps, manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcmseg.cli.common import console, user_errors
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads


def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of mosaics.")] = 4,
    size: Annotated[
        int, typer.Option("--size", min=256, help="Mosaic side in px at 0.5 µm/px.")
    ] = 2048,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed.")] = 0,
    patients: Annotated[
        int | None,
        typer.Option("--patients", min=1, help="Number of patients (default: one per 2 mosaics)."),
    ] = None,
    clinics: Annotated[int, typer.Option("--clinics", min=1, help="Number of clinics.")] = 2,
    labelled_fraction: Annotated[
        float,
        typer.Option("--labelled-fraction", min=0.05, max=1.0, help="Share of labelled pixels."),
    ] = 0.57,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a data set already in OUT.")
    ] = False,
) -> None:
    """Write a synthetic data set: N mosaics, their label maps and OUT/manifest.csv.

    Mosaics are 8-bit TIFFs at 0.5 µm/px, label maps PNGs (255 = unlabelled); the same seed
    writes the same data set."""
    with user_errors():
        check_output_folder(out, "OUT")
        from rcmseg.errors import InputError
        from rcmseg.io.dataset import manifest_path
        from rcmseg.synth import write_dataset

        if manifest_path(out).exists() and not overwrite:
            raise InputError(out, "already holds a manifest.csv; pass --overwrite to replace it")
        cases = write_dataset(
            out,
            n,
            size=size,
            seed=seed,
            patients=patients,
            clinics=clinics,
            labelled_fraction=labelled_fraction,
        )
        counts = {
            "mosaic": len(cases),
            "patient": len({c.patient for c in cases}),
            "clinic": len({c.clinic for c in cases}),
        }
        said = [f"{count} {noun}{'s' if count != 1 else ''}" for noun, count in counts.items()]
        console.print(
            f"wrote {said[0]} of {size}x{size} px to {out} ({said[1]}, {said[2]})",
            highlight=False,
            soft_wrap=True,  # a long path stays whole, to copy
        )


def register(app: typer.Typer) -> None:
    """Add ``rcmseg synth`` to the application."""
    app.command("synth")(synth)
