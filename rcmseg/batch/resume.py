"""Resume state of a batch: the per-mosaic record that marks it finished, and its provenance.

``<name>.summary.json`` is written last and atomically, so a mosaic reads finished only when all
its outputs are. ``--continue`` keeps a finished mosaic only when its record names the same
weights (hash), bundle version, segmentation settings (preset, precision, TTA), fallback pixel
size and outputs as this run, and its mosaic file is unchanged; otherwise it redoes the mosaic and
says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rcmseg.batch.jobs import GEOJSON, LABELS, OUTPUT_KINDS, SUMMARY, MosaicJob
from rcmseg.errors import InputError
from rcmseg.io.atomic import PARTIAL_MARKER, write_text_atomic
from rcmseg.io.geojson import is_rcmseg_geojson
from rcmseg.io.writers import is_complete_label_tiff
from rcmseg.report import MosaicRecord


@dataclass(frozen=True)
class Provenance:
    """What made a mosaic's outputs; a finished mosaic is kept only under equal provenance."""

    model: str
    bundle_version: str
    preset: str
    engine: str
    outputs: tuple[str, ...]
    fallback_mpp: float

    def differences(self, record: MosaicRecord, job: MosaicJob) -> list[str]:
        """Why ``record`` was made otherwise (empty when it matches), e.g. ``["weights ..."]``."""
        found = []
        made = sorted(name.removeprefix(f"{job.out_stem.name}.") for name in record.outputs)
        if made != sorted(self.outputs):
            found.append(f"outputs {', '.join(made)} → {', '.join(self.outputs)}")
        if record.model != self.model:
            found.append(f"weights {record.model or '?'} → {self.model}")
        if record.bundle_version != self.bundle_version:
            found.append(f"bundle version {record.bundle_version or '?'} → {self.bundle_version}")
        if (record.preset, record.engine) != (self.preset, self.engine):
            found.append(f"settings '{record.engine or record.preset}' → '{self.engine}'")
        if record.mpp_source in ("fallback", "manifest"):  # the file carries no pixel size
            source = "manifest" if job.declared_mpp else "fallback"
            mpp = job.fallback_mpp(self.fallback_mpp)
            if (record.mpp_source, record.mosaic_mpp) != (source, mpp):
                found.append(f"pixel size {record.mosaic_mpp} µm/px → {mpp} µm/px ({source})")
        return found


def read_record(job: MosaicJob) -> MosaicRecord | None:
    """The job's saved record, or None when there is none or it is unreadable."""
    try:
        return MosaicRecord.from_json(job.output(SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def reuse_verdict(job: MosaicJob, provenance: Provenance) -> tuple[MosaicRecord | None, str]:
    """``(record, "")`` when the job's finished outputs can be kept, else ``(None, why)``.

    ``why`` is empty when there is nothing finished to keep (no record, a failed one).
    """
    record = read_record(job)
    if record is None or record.status != "done":
        return None, ""
    try:
        stat = job.path.stat()
    except OSError:  # reading it will say why; its finished outputs stay
        return None, ""
    if (record.source_size, record.source_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        return None, "the mosaic file changed"
    if differences := provenance.differences(record, job):
        return None, "made with other " + "; ".join(differences)
    missing = [kind for kind in provenance.outputs if not job.output(kind).is_file()]
    if missing:
        return None, f"missing {', '.join(missing)}"
    if not is_complete_label_tiff(job.output(LABELS), tuple(record.working_shape)):
        return None, "its label TIFF is incomplete"
    return record, ""


def save_record(job: MosaicJob, record: MosaicRecord) -> None:
    """Write ``<name>.summary.json`` atomically: written last, it marks the mosaic finished."""
    write_text_atomic(job.output(SUMMARY), record.to_json())


def remove_outputs(job: MosaicJob, finished: bool) -> None:
    """Delete temporary files a killed run left for this mosaic, and with ``finished`` its
    previous outputs too (record first, so that the mosaic never reads finished meanwhile);
    a GeoJSON rcmseg did not write is kept."""
    if finished:
        for kind in OUTPUT_KINDS:
            if not (kind == GEOJSON and foreign_geojson(job)):
                job.output(kind).unlink(missing_ok=True)
    if job.out_stem.parent.is_dir():
        for leftover in job.out_stem.parent.glob(f"{job.out_stem.name}.*{PARTIAL_MARKER}*"):
            leftover.unlink(missing_ok=True)


def foreign_geojson(job: MosaicJob) -> Path | None:
    """The job's GeoJSON path when a file there is not one rcmseg wrote (e.g. a QuPath
    annotation kept beside its mosaic, where ``--out`` is the mosaic folder), else None."""
    path = job.output(GEOJSON)
    return path if path.is_file() and not is_rcmseg_geojson(path) else None


def check_not_foreign(job: MosaicJob, outputs: tuple[str, ...]) -> None:
    """Refuse to replace a file rcmseg did not write: it may be a lab's annotations."""
    if GEOJSON in outputs and (path := foreign_geojson(job)):
        raise InputError(
            path,
            "is not an rcmseg output (an annotation?) and --geojson would replace it; "
            "move it or choose another --out",
        )


def check_not_finished(jobs: list[MosaicJob], out_dir: Path) -> None:
    """Refuse to silently redo finished work: ask for ``--continue`` or ``--overwrite``."""
    finished = [job for job in jobs if (record := read_record(job)) and record.status == "done"]
    if finished:
        raise InputError(
            out_dir,
            f"already holds finished outputs for {len(finished)} mosaic(s), e.g. "
            f"{finished[0].relative}; pass --continue to keep them or --overwrite to redo them",
        )
