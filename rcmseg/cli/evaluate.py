"""`rcmseg evaluate`: score a bundle's model on the labelled mosaics of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcmseg.cli.common import (
    BUNDLE_DEFAULT,
    BackendOption,
    DeviceOption,
    OpenVINOCacheOption,
    PrecisionOption,
    PresetOption,
    ThreadsOption,
    TTAOption,
    note_unknown_pixel_sizes,
    user_errors,
)
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads


def evaluate_command(
    data: Annotated[Path, typer.Argument(help="Dataset folder with manifest.csv (rcmseg layout).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and tables.")],
    bundle: Annotated[
        Path | None,
        typer.Option(help=f"MONAI bundle folder ({BUNDLE_DEFAULT})."),
    ] = None,
    preset: PresetOption = "fast",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    backend: BackendOption = "torch",
    openvino_cache: OpenVINOCacheOption = None,
    tta: TTAOption = False,
    remap: Annotated[
        Path | None,
        typer.Option(help="Label remapping table (.json/.csv) for label maps in another encoding."),
    ] = None,
    overlays: Annotated[
        int, typer.Option(help="Number of mosaics shown as example overlays in the report.")
    ] = 3,
    threads: ThreadsOption = None,
) -> None:
    """Segment every labelled mosaic and report sensitivity, specificity and Dice per class.

    Writes OUT/report.md (tables laid out like the paper's), metrics_pooled.csv,
    metrics_per_mosaic.csv, confusion_matrix.csv/.png, metrics.json and overlays/*.png.
    """
    with user_errors():
        check_output_folder(out)
        from rcmseg.bundle import default_bundle_dir
        from rcmseg.evaluation.evaluate import evaluate_bundle
        from rcmseg.evaluation.report import format_value
        from rcmseg.io.labels import load_remap_table

        note_unknown_pixel_sizes(data)

        table = load_remap_table(remap) if remap is not None else None
        evaluation = evaluate_bundle(
            bundle or default_bundle_dir(),
            data,
            out,
            preset=preset,
            device=device,
            remap=table,
            overlays=overlays,
            precision=precision,
            tta=tta,
            backend=backend,
            openvino_cache=openvino_cache,
            threads=threads,
        )
        pooled = evaluation.pooled()
        typer.echo(
            f"{len(evaluation.cases)} mosaics: mean sensitivity "
            f"{format_value(pooled['sensitivity'][-1])}, specificity "
            f"{format_value(pooled['specificity'][-1])}, Dice "
            f"{format_value(pooled['dice'][-1])} (pooled); report: {out / 'report.md'}"
        )
    if evaluation.failed:
        typer.echo(f"{len(evaluation.failed)} mosaic(s) failed and are left out (see above)")
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``rcmseg evaluate`` to the application."""
    app.command("evaluate")(evaluate_command)
