"""`rcmseg batch`: segment every mosaic under a folder with a MONAI bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rcmseg.classes import MOSAIC_MPP
from rcmseg.cli.common import (
    BUNDLE_DEFAULT,
    BackendOption,
    DeviceOption,
    OpenVINOCacheOption,
    PrecisionOption,
    PresetOption,
    ThreadsOption,
    TTAOption,
    exit_on_interrupt,
    user_errors,
)
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads


def batch(
    in_dir: Annotated[
        Path, typer.Argument(help="A mosaic file, or a folder searched recursively for mosaics.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for outputs and reports.")],
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
    mpp: Annotated[
        float, typer.Option(help="µm/px of mosaics whose file carries no pixel size.")
    ] = MOSAIC_MPP,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write <name>.probabilities.tif.")
    ] = False,
    uncertainty: Annotated[
        bool,
        typer.Option("--uncertainty", help="Also write <name>.uncertainty.tif (entropy in nats)."),
    ] = False,
    overlay: Annotated[
        bool, typer.Option("--overlay", help="Also write <name>.overlay.png.")
    ] = False,
    geojson: Annotated[
        bool, typer.Option("--geojson", help="Also write <name>.geojson for QuPath.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--continue", help="Skip mosaics whose outputs are complete and valid."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo mosaics that already have outputs.")
    ] = False,
    num_parts: Annotated[
        int | None,
        typer.Option(help="Split the mosaics into this many parts (default: $WORLD_SIZE, else 1)."),
    ] = None,
    part_id: Annotated[
        int | None, typer.Option(help="Which part this process does (default: $RANK, else 0).")
    ] = None,
    threads: ThreadsOption = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Segment every mosaic under IN_DIR into OUT: <name>.labels.tif per mosaic,
    OUT/mosaics.csv and OUT/patterns.csv. Exit status 1 when any mosaic failed."""
    with user_errors():
        from rcmseg.io.mosaics import check_mosaic_source

        # run_batch checks both too, but only after torch has loaded: a typo is told at once
        check_mosaic_source(in_dir)
        check_output_folder(out)
        from rcmseg.batch import BatchOptions, parts_from_env, print_summary, run_batch

        env_parts, env_part_id = parts_from_env()
        options = BatchOptions(
            preset=preset,
            device=device,
            precision=precision,
            tta=tta,
            backend=backend,
            openvino_cache=openvino_cache,
            fallback_mpp=mpp,
            probabilities=probabilities,
            uncertainty=uncertainty,
            overlay=overlay,
            geojson=geojson,
            resume=resume,
            overwrite=overwrite,
            num_parts=num_parts if num_parts is not None else env_parts,
            part_id=part_id if part_id is not None else env_part_id,
            threads=threads,
        )
        with exit_on_interrupt(None):  # run_batch says what is kept and how to go on
            result = run_batch(
                in_dir, out, bundle_dir=bundle, options=options, show_progress=progress
            )
    print_summary(result)
    if result.failed:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``rcmseg batch`` to the rcmseg application."""
    app.command("batch")(batch)
