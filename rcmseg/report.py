"""What a batch run found: one record per mosaic, ``mosaics.csv`` and ``patterns.csv``.

Areas come from pixel counts on the label image at the working resolution: one pixel at
2 µm/px is 4 µm² = 4e-6 mm². The lesion area is the area of the lesion patterns (meshwork,
nested, ring, aspecific); background and artifact are excluded from it, and the pattern
percentages are percentages of the lesion area. The mean confidence of a pattern is the mean
winning softmax probability over the pixels labelled with that pattern.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from rcmseg.classes import CLASS_NAMES, NON_LESION_CLASSES
from rcmseg.io.atomic import write_csv_atomic

LESION_CLASSES: tuple[int, ...] = tuple(
    index for index in range(len(CLASS_NAMES)) if index not in NON_LESION_CLASSES
)
FINISHED = ("done", "skipped")  # statuses whose figures count in the reports


@dataclass
class MosaicRecord:
    """The outcome for one mosaic; saved as ``<name>.summary.json`` next to its outputs.

    ``status`` is ``done`` (segmented), ``skipped`` (finished by an earlier run, ``--continue``),
    ``failed`` (``error`` says why) or ``pending`` (left to another part of a split run).
    ``pixel_counts`` and ``confidence_sums`` hold one value per class, at ``working_mpp`` µm/px.
    """

    mosaic: str
    lesion: str
    status: str
    error: str = ""
    seconds: float = 0.0
    read_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    width_px: int = 0
    height_px: int = 0
    mosaic_mpp: float = 0.0
    mpp_source: str = ""
    working_mpp: float = 0.0
    working_shape: tuple[int, int] = (0, 0)
    pixel_counts: tuple[int, ...] = ()
    confidence_sums: tuple[float, ...] = ()
    preset: str = ""
    engine: str = ""
    precision: str = ""
    model: str = ""
    bundle: str = ""
    bundle_version: str = ""
    source_size: int = 0
    source_mtime_ns: int = 0
    outputs: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one working-resolution pixel in mm² (µm² × 1e-6)."""
        return self.working_mpp**2 * 1e-6

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> MosaicRecord:
        """Parse a record; raises ``ValueError`` (or ``TypeError``) for anything malformed."""
        values = json.loads(text)
        known = {item.name for item in fields(cls)}
        if not isinstance(values, dict) or not {"mosaic", "lesion", "status"} <= set(values):
            raise ValueError("not a mosaic record")
        values = {key: value for key, value in values.items() if key in known}
        for key in ("working_shape", "pixel_counts", "confidence_sums", "outputs"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


@dataclass
class Figures:
    """Pixel counts and confidence sums added up over one or more mosaics."""

    pixel_area_mm2: float
    counts: list[int]
    confidence_sums: list[float]

    @classmethod
    def of(cls, records: Iterable[MosaicRecord], num_classes: int) -> Figures:
        total = cls(0.0, [0] * num_classes, [0.0] * num_classes)
        for record in records:
            total.pixel_area_mm2 = record.pixel_area_mm2  # one working resolution per bundle
            total.counts = [a + b for a, b in zip(total.counts, record.pixel_counts, strict=True)]
            total.confidence_sums = [
                a + b for a, b in zip(total.confidence_sums, record.confidence_sums, strict=True)
            ]
        return total

    def columns(self, class_names: Sequence[str]) -> dict[str, str]:
        """CSV cells: analysed and lesion area, area / % of lesion / mean confidence per class."""
        areas = [count * self.pixel_area_mm2 for count in self.counts]
        lesion_area = sum(areas[index] for index in LESION_CLASSES)
        cells = {
            "analysed_area_mm2": f"{sum(areas):.6f}",
            "lesion_area_mm2": f"{lesion_area:.6f}",
        }
        for name, area in zip(class_names, areas, strict=True):
            cells[f"{name}_area_mm2"] = f"{area:.6f}"
        for index in LESION_CLASSES:
            share = 100 * areas[index] / lesion_area if lesion_area > 0 else None
            cells[f"{class_names[index]}_pct_of_lesion_area"] = _fmt(share, 3)
        for name, count, total in zip(class_names, self.counts, self.confidence_sums, strict=True):
            cells[f"{name}_mean_confidence"] = _fmt(total / count if count else None, 4)
        return cells


def _fmt(value: float | None, decimals: int) -> str:
    return "" if value is None else f"{value:.{decimals}f}"


def _joined(values: Iterable[str]) -> str:
    return ";".join(sorted({value for value in values if value}))


def figure_columns(class_names: Sequence[str]) -> list[str]:
    """The names of :meth:`Figures.columns`, in order."""
    return list(Figures(0.0, [0] * len(class_names), [0.0] * len(class_names)).columns(class_names))


def mosaic_rows(records: Sequence[MosaicRecord], class_names: Sequence[str]) -> list[dict]:
    """One row per mosaic: figures for finished mosaics, blanks otherwise."""
    rows = []
    for record in records:
        row = {
            "mosaic": record.mosaic,
            "lesion": record.lesion,
            "status": record.status,
            "seconds": f"{record.seconds:.2f}" if record.status != "pending" else "",
            "read_seconds": f"{record.read_seconds:.2f}",
            "infer_seconds": f"{record.infer_seconds:.2f}",
            "write_seconds": f"{record.write_seconds:.2f}",
            "error": record.error,
            "width_px": record.width_px or "",
            "height_px": record.height_px or "",
            "mosaic_mpp": record.mosaic_mpp or "",
            "mpp_source": record.mpp_source,
        }
        finished = record.status in FINISHED
        figures = Figures.of([record], len(class_names)).columns(class_names) if finished else {}
        row.update({name: figures.get(name, "") for name in figure_columns(class_names)})
        row.update(
            preset=record.preset,
            settings=record.engine,
            precision=record.precision,
            model=record.model,
            bundle=record.bundle,
            bundle_version=record.bundle_version,
            note=record.note,
        )
        rows.append(row)
    return rows


def lesion_rows(records: Sequence[MosaicRecord], class_names: Sequence[str]) -> list[dict]:
    """One row per lesion, its finished mosaics summed; lesions in order of first appearance."""
    by_lesion: dict[str, list[MosaicRecord]] = {}
    for record in records:
        by_lesion.setdefault(record.lesion, []).append(record)
    rows = []
    for lesion, members in by_lesion.items():
        finished = [record for record in members if record.status in FINISHED]
        row = {
            "lesion": lesion,
            "mosaics": len(finished),
            "mosaics_not_analysed": len(members) - len(finished),
        }
        row.update(Figures.of(finished, len(class_names)).columns(class_names) if finished else {})
        row.update({name: row.get(name, "") for name in figure_columns(class_names)})
        row.update(
            model=_joined(record.model for record in finished),
            bundle=_joined(record.bundle for record in finished),
            bundle_version=_joined(record.bundle_version for record in finished),
        )
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` atomically."""
    header = list(rows[0]) if rows else ["mosaic"]
    write_csv_atomic(path, header, ([row[key] for key in header] for row in rows))


def write_reports(
    out_dir: Path, records: Sequence[MosaicRecord], class_names: Sequence[str] = CLASS_NAMES
) -> tuple[Path, Path]:
    """Write ``OUT/mosaics.csv`` and ``OUT/patterns.csv``; return their paths."""
    mosaics_csv, patterns_csv = out_dir / "mosaics.csv", out_dir / "patterns.csv"
    write_csv(mosaics_csv, mosaic_rows(records, class_names))
    write_csv(patterns_csv, lesion_rows(records, class_names))
    return mosaics_csv, patterns_csv


def dominant_pattern(record: MosaicRecord, class_names: Sequence[str]) -> str:
    """The lesion pattern with the largest area and its share of the lesion, e.g. ``ring 62%``."""
    if record.status not in FINISHED or not record.pixel_counts:
        return ""
    lesion_counts = {index: record.pixel_counts[index] for index in LESION_CLASSES}
    total = sum(lesion_counts.values())
    if total == 0:
        return "no lesion"
    index = max(lesion_counts, key=lesion_counts.__getitem__)
    return f"{class_names[index]} {100 * lesion_counts[index] / total:.0f}%"


def summary_table(
    records: Sequence[MosaicRecord], class_names: Sequence[str] = CLASS_NAMES
) -> Table:
    """A rich table of this run: status, time, lesion area and dominant pattern per mosaic.

    Why a mosaic failed is not a column: ``run_batch`` prints it in full, one line per mosaic,
    just above the table; a column would fold it to a word per line on an 80-column terminal."""
    table = Table(title="rcmseg batch", show_lines=False)
    for column in ("mosaic", "lesion", "status", "seconds", "lesion mm²", "main pattern"):
        table.add_column(column, overflow="fold")
    colours = {"done": "green", "skipped": "cyan", "failed": "red", "pending": "yellow"}
    for record in records:
        finished = record.status in FINISHED
        lesion_mm2 = (
            sum(record.pixel_counts[index] for index in LESION_CLASSES) * record.pixel_area_mm2
            if finished
            else None
        )
        table.add_row(  # names are text, not markup: a file may be called scan[b].tif
            escape(record.mosaic),
            escape(record.lesion),
            f"[{colours.get(record.status, 'white')}]{record.status}[/]",
            f"{record.seconds:.1f}",
            _fmt(lesion_mm2, 3),
            escape(dominant_pattern(record, class_names)),
        )
    return table
