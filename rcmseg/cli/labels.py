"""`rcmseg labels`: turn QuPath annotations (GeoJSON or labelled images) into rcmseg label maps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rcmseg.cli.common import user_errors
from rcmseg.io.atomic import check_output_folder  # light: refuses --out before torch loads

if TYPE_CHECKING:
    from rich.table import Table

    from rcmseg.labels_import import MosaicImport

labels_app = typer.Typer(
    help="Import QuPath annotations (GeoJSON or labelled-image exports) as rcmseg label maps.",
    no_args_is_help=True,
)

Remap = Annotated[
    Path | None,
    typer.Option(
        help="Remapping table (.json/.csv, as rcmseg train takes): a lab's class names (or label "
        "values) -> rcmseg class names, indices or 'unlabelled'."
    ),
]

RULES = (
    "Rules: coordinates are full-resolution mosaic pixels (as QuPath writes them). A pixel is "
    "labelled when its centre lies inside a polygon (even-odd over its rings: holes stay "
    "unlabelled unless another annotation covers them). Classes match background, artifact, "
    "meshwork, nested, ring, aspecific case-insensitively (or a --remap name; QuPath's Ignore* "
    "= unlabelled); unclassified annotations are left unlabelled; an unknown class is an error. "
    "Overlaps: the smaller annotation (by area) wins. Detections, cells, tiles, lines and points "
    "are ignored and counted; coordinates past the mosaic are clipped and counted. Label maps "
    "hold 0..5 in class order and 255 = unlabelled."
)


@labels_app.command("from-geojson", help=f"Rasterise one QuPath GeoJSON export.\n\n{RULES}")
def from_geojson(
    geojson: Annotated[Path, typer.Argument(help="QuPath GeoJSON export of one mosaic.")],
    mosaic: Annotated[Path, typer.Option(help="The mosaic it annotates (gives the grid).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Label map to write (.png or .tif).")],
    remap: Remap = None,
) -> None:
    with user_errors():
        check_output_folder(out.parent)
        from rcmseg.io.labels import read_remap
        from rcmseg.io.mosaics import probe_mosaic
        from rcmseg.labels_import import geojson_label_map, value_counts, write_label_map

        names = read_remap(remap).names if remap is not None else None
        info = probe_mosaic(mosaic)
        labels, found, counts = geojson_label_map(geojson, (info.height_px, info.width_px), names)
        write_label_map(out, labels)
        labelled = 100.0 * value_counts(labels)[:6].sum() / labels.size
        typer.echo(
            f"{out}: {info.width_px}x{info.height_px} px, {labelled:.1f} % labelled from "
            f"{len(found.annotations)} annotations; ignored {found.ignored_objects} objects, "
            f"{found.ignored_geometries} lines/points, {found.unclassified} unclassified; "
            f"{counts.overlapping} overlapping ({counts.overlap_px} px), {counts.clipped} clipped"
        )


@labels_app.command(
    "import",
    help="Pair every mosaic with its annotations and write a data set (label maps, manifest.csv, "
    "import_summary.csv). Annotations are found in DIR as <stem>.geojson, else as a QuPath "
    "labelled image <stem>.png/.tif or <stem>-labels.png/.tif (indices 0..5, 255 unlabelled; "
    "downsampled by an integer "
    f"factor, upsampled nearest-neighbour). Re-running adds or updates rows.\n\n{RULES}",
)
def import_command(
    mosaics: Annotated[Path, typer.Argument(help="Folder of mosaics (searched recursively).")],
    annotations: Annotated[
        Path, typer.Option(help="Folder of QuPath exports (may be the mosaic folder itself).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Data set folder to write or update.")],
    format: Annotated[
        str, typer.Option("--format", help="auto (GeoJSON first), geojson or image.")
    ] = "auto",
    colours: Annotated[
        str,
        typer.Option(
            help="Labelled images: auto (RGB by colour, others by index), index or colour "
            "(exact class colours; white/black = unlabelled)."
        ),
    ] = "auto",
    remap: Remap = None,
) -> None:
    with user_errors():
        check_output_folder(out)
        from rcmseg.io.labels import read_remap
        from rcmseg.io.mosaics import walk_folder
        from rcmseg.labels_import import SUMMARY_NAME, import_labels

        tree = walk_folder(mosaics)  # the one walk; empty for a mosaic file
        if note := tree.unsearched_note():
            typer.echo(f"note: {note}", err=True)
        table = read_remap(remap) if remap is not None else None
        results = import_labels(
            mosaics,
            annotations,
            out,
            fmt=format,
            remap=table,
            colours=colours,
            tree=tree,
        )
        from rich.console import Console

        Console().print(import_table(results))
        failed = [result for result in results if result.status == "failed"]
        for result in failed:
            typer.echo(f"failed: {result.error}", err=True)
        typer.echo(f"{len(results)} mosaics, {len(failed)} failed; {out / SUMMARY_NAME}")
        if failed:
            raise typer.Exit(code=1)


def import_table(results: list[MosaicImport]) -> Table:
    """One row per mosaic: status, labelled share, the labelled pixels of each class present,
    and how many objects were ignored, overlapped others or were clipped at the mosaic's edge.
    Narrow enough for an 80-column terminal; ``import_summary.csv`` has every count."""
    from rich.markup import escape
    from rich.table import Table

    table = Table()
    for column in ("mosaic", "status", "labelled %", "labelled px by class", "objects"):
        table.add_column(column, overflow="fold")
    for r in results:
        objects = {
            "ignored": r.ignored_objects + r.ignored_geometries + r.unclassified,
            "overlapping": r.overlapping,
            "clipped": r.clipped,
        }
        table.add_row(
            escape(r.mosaic),  # text, not markup: a file may be called scan[b].tif
            r.status,
            f"{r.labelled_pct:.1f}",
            ", ".join(f"{name} {px}" for name, px in r.class_px.items() if px) or "-",
            ", ".join(f"{count} {what}" for what, count in objects.items() if count),
        )
    return table


def register(app: typer.Typer) -> None:
    """Add ``rcmseg labels from-geojson`` and ``rcmseg labels import`` to the application."""
    app.add_typer(labels_app, name="labels")
