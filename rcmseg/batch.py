"""Segment every mosaic under a folder: the engine behind ``rcmseg batch`` and ``inference.json``.

For each mosaic ``IN/<dir>/<name>.<ext>`` the outputs go to ``OUT/<dir>/<name>.*``:
``labels.tif`` (always), ``probabilities.tif``, ``uncertainty.tif``, ``overlay.png``,
``geojson`` (on request), and last ``summary.json``, the record that marks the mosaic finished.
Every file is written to a temporary sibling and renamed into place when complete, so a killed
run never leaves a file that looks finished. A mosaic that fails (unreadable, truncated, wrong
type, too small) gets a ``failed`` record and the batch goes on. ``OUT/mosaics.csv`` and
``OUT/patterns.csv`` are rebuilt at the end of every run from all records in OUT, so the last
part of a split run to finish writes complete reports.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console

from rcmseg.bundle import LoadedBundle, load_bundle
from rcmseg.classes import MOSAIC_MPP
from rcmseg.errors import InputError
from rcmseg.inference import (
    MIN_SIDE_PX,
    auto_band_px,
    iter_probability_bands,
    pixel_entropy,
    resolve_device,
)
from rcmseg.report import MosaicRecord, summary_table, write_reports

console = Console(stderr=True)  # progress, warnings and failures; the summary goes to stdout

MANIFEST_NAME = "manifest.csv"
LABELS, PROBABILITIES, UNCERTAINTY, OVERLAY, GEOJSON, SUMMARY = (
    "labels.tif",
    "probabilities.tif",
    "uncertainty.tif",
    "overlay.png",
    "geojson",
    "summary.json",
)


@dataclass(frozen=True)
class BatchOptions:
    """How ``run_batch`` segments and what it writes.

    Attributes:
        preset: sliding-window preset name (``fast`` or ``paper``, or one the bundle defines).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:1``, ...
        amp: float16 autocast on CUDA (no effect on CPU).
        fallback_mpp: µm/px of mosaics whose file carries no pixel size.
        probabilities, uncertainty, overlay, geojson: optional outputs.
        resume: skip mosaics whose outputs are complete and valid (``--continue``).
        overwrite: redo mosaics that already have finished outputs.
        num_parts, part_id: process only mosaics ``part_id, part_id + num_parts, ...`` of the
            sorted list, so that parts run on several processes or machines without overlap.
    """

    preset: str = "fast"
    device: str = "auto"
    amp: bool = True
    fallback_mpp: float = MOSAIC_MPP
    probabilities: bool = False
    uncertainty: bool = False
    overlay: bool = False
    geojson: bool = False
    resume: bool = False
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0

    def requested_outputs(self) -> tuple[str, ...]:
        optional = (
            (PROBABILITIES, self.probabilities),
            (UNCERTAINTY, self.uncertainty),
            (OVERLAY, self.overlay),
            (GEOJSON, self.geojson),
        )
        return (LABELS, *(name for name, wanted in optional if wanted))


@dataclass(frozen=True)
class MosaicJob:
    """One mosaic to segment: where it is, where its outputs go, which lesion it belongs to."""

    path: Path
    relative: str
    out_stem: Path
    lesion: str

    def output(self, kind: str) -> Path:
        return self.out_stem.with_name(f"{self.out_stem.name}.{kind}")


@dataclass(frozen=True)
class BatchResult:
    """Records of this run's part (in order) and of the whole batch, and the report paths."""

    records: list[MosaicRecord]
    all_records: list[MosaicRecord]
    mosaics_csv: Path
    patterns_csv: Path

    @property
    def failed(self) -> list[MosaicRecord]:
        return [record for record in self.records if record.status == "failed"]


def find_mosaics(in_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Mosaic files under ``in_dir`` (recursively, sorted), skipping the ``exclude`` folder."""
    from rcmseg.io.mosaics import MOSAIC_SUFFIXES, mosaic_suffix

    excluded = exclude.resolve() if exclude is not None else None
    found = []
    for path in sorted(in_dir.rglob("*")):
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        if (
            path.is_file()
            and not path.name.startswith(".")
            and (mosaic_suffix(path) in MOSAIC_SUFFIXES)
        ):
            found.append(path)
    return found


def manifest_lesions(in_dir: Path) -> dict[Path, str]:
    """Lesion id of each mosaic listed in a ``manifest.csv`` under ``in_dir`` (or next to it).

    Manifests follow the data set layout (:mod:`rcmseg.io.dataset`); when the tree holds none,
    ``in_dir/../manifest.csv`` is used, so that ``rcmseg batch DATA/mosaics`` finds
    ``DATA/manifest.csv``.
    """
    from rcmseg.io.dataset import read_manifest

    manifests = sorted(in_dir.rglob(MANIFEST_NAME))
    if not manifests and (in_dir.parent / MANIFEST_NAME).is_file():
        manifests = [in_dir.parent / MANIFEST_NAME]
    lesions = {}
    for manifest in manifests:
        for case in read_manifest(manifest):
            if case.lesion:
                lesions[case.mosaic.resolve()] = case.lesion
    return lesions


def plan_jobs(in_dir: Path, out_dir: Path) -> list[MosaicJob]:
    """Every mosaic under ``in_dir`` with its output stem and lesion id, sorted by path.

    The lesion id comes from a manifest when one lists the mosaic, else the file name. Two
    mosaics that differ only by suffix (``a.tif``, ``a.png``) keep the suffix in their stems.
    """
    from rcmseg.io.mosaics import mosaic_suffix

    mosaics = find_mosaics(in_dir, exclude=out_dir)
    lesions = manifest_lesions(in_dir)
    stems = [path.relative_to(in_dir).as_posix()[: -len(mosaic_suffix(path))] for path in mosaics]
    jobs = []
    for path, stem in zip(mosaics, stems, strict=True):
        if stems.count(stem) > 1:
            stem = stem + mosaic_suffix(path).replace(".", "_")
        name = Path(stem).name
        jobs.append(
            MosaicJob(
                path=path,
                relative=path.relative_to(in_dir).as_posix(),
                out_stem=out_dir / stem,
                lesion=lesions.get(path.resolve(), name),
            )
        )
    return jobs


def parts_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(num_parts, part_id)`` from torchrun's ``WORLD_SIZE`` and ``RANK``; ``(1, 0)`` alone."""
    return int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))


def select_part(jobs: list[MosaicJob], num_parts: int, part_id: int) -> list[MosaicJob]:
    """Every ``num_parts``-th job starting at ``part_id``: parts are disjoint and cover all."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise InputError(None, f"--part-id must be in 0..{num_parts - 1} and --num-parts ≥ 1")
    return jobs[part_id::num_parts]


def read_record(job: MosaicJob) -> MosaicRecord | None:
    """The job's saved record, or None when there is none or it is unreadable."""
    try:
        return MosaicRecord.from_json(job.output(SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def finished_record(job: MosaicJob, options: BatchOptions) -> MosaicRecord | None:
    """The job's record when all requested outputs are complete and its mosaic is unchanged."""
    from rcmseg.io.writers import is_complete_label_tiff

    record = read_record(job)
    if record is None or record.status != "done":
        return None
    stat = job.path.stat()
    if (record.source_size, record.source_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        return None
    if not all(job.output(kind).is_file() for kind in options.requested_outputs()):
        return None
    if not is_complete_label_tiff(job.output(LABELS), tuple(record.working_shape)):
        return None
    return record


def check_size(width: int, height: int, path: Path) -> None:
    """Refuse mosaics below :data:`~rcmseg.inference.MIN_SIDE_PX` at the working resolution."""
    if min(width, height) < MIN_SIDE_PX:
        raise InputError(
            path,
            f"too small: {width}×{height} px at the working resolution, below the "
            f"{MIN_SIDE_PX} px minimum side",
        )


class MosaicProgress:
    """Progress callbacks of a batch run; the base class shows nothing."""

    def begin(self, job: MosaicJob, steps: int) -> None:
        """A mosaic starts: ``steps`` = 1 for reading + bands to segment + 1 for writing."""

    def step(self, stage: str) -> None:
        """One step done; ``stage`` names the next one."""

    def mosaic_done(self) -> None:
        """The mosaic is finished, skipped or failed."""


def segment_mosaic(
    job: MosaicJob,
    bundle: LoadedBundle,
    options: BatchOptions,
    progress: MosaicProgress | None = None,
) -> MosaicRecord:
    """Segment one mosaic, write its outputs and its record; raise on any failure."""
    from rcmseg.io.mosaics import probe_mosaic, read_mosaic

    progress = progress or MosaicProgress()
    started = time.perf_counter()
    stat = job.path.stat()
    info = probe_mosaic(job.path, fallback_mpp=options.fallback_mpp)
    height, width = info.working_shape(bundle.working_mpp)
    check_size(width, height, job.path)
    progress.begin(job, steps=math.ceil(height / auto_band_px(width)) + 2)
    image, info = read_mosaic(job.path, bundle.working_mpp, fallback_mpp=options.fallback_mpp)
    read_done = time.perf_counter()
    progress.step("segmenting")

    maps = segment_to_maps(image, bundle, options, progress)
    infer_done = time.perf_counter()
    progress.step("writing")
    outputs = write_outputs(job, image, info.mosaic_mpp, bundle, options, maps)
    finished = time.perf_counter()

    record = MosaicRecord(
        mosaic=job.relative,
        lesion=job.lesion,
        status="done",
        seconds=finished - started,
        read_seconds=read_done - started,
        infer_seconds=infer_done - read_done,
        write_seconds=finished - infer_done,
        width_px=info.width_px,
        height_px=info.height_px,
        mosaic_mpp=info.mosaic_mpp,
        mpp_source=info.mpp_source,
        working_mpp=bundle.working_mpp,
        working_shape=tuple(maps.labels.shape),
        pixel_counts=tuple(int(count) for count in maps.counts),
        confidence_sums=tuple(float(total) for total in maps.confidence_sums),
        preset=options.preset,
        model=bundle.model,
        bundle=bundle.name,
        bundle_version=bundle.version,
        source_size=stat.st_size,
        source_mtime_ns=stat.st_mtime_ns,
        outputs=outputs,
    )
    save_record(job, record)
    return record


@dataclass
class SegmentationMaps:
    """Per-pixel results at the working resolution, and per-class sums for the reports.

    ``labels`` uint8 (H, W); ``probabilities`` float32 (K, H, W) and ``entropy`` float32 (H, W)
    only when those outputs are requested (they are the only full-size float arrays).
    """

    labels: np.ndarray
    counts: np.ndarray
    confidence_sums: np.ndarray
    probabilities: np.ndarray | None
    entropy: np.ndarray | None


def segment_to_maps(
    image: np.ndarray,
    bundle: LoadedBundle,
    options: BatchOptions,
    progress: MosaicProgress,
) -> SegmentationMaps:
    """Run the sliding window band by band, keeping only what the outputs need."""
    preset = bundle.presets[options.preset]
    num_classes = len(bundle.class_names)
    height, width = image.shape
    maps = SegmentationMaps(
        labels=np.empty((height, width), dtype=np.uint8),
        counts=np.zeros(num_classes, dtype=np.int64),
        confidence_sums=np.zeros(num_classes, dtype=np.float64),
        probabilities=(
            np.empty((num_classes, height, width), np.float32) if options.probabilities else None
        ),
        entropy=np.empty((height, width), np.float32) if options.uncertainty else None,
    )
    bands = iter_probability_bands(image, bundle.network, preset, bundle.device, amp=options.amp)
    for r0, band in bands:
        rows = slice(r0, r0 + band.shape[1])
        labels = band.argmax(axis=0).astype(np.uint8)
        confidence = band.max(axis=0)  # the winning probability
        maps.labels[rows] = labels
        maps.counts += np.bincount(labels.ravel(), minlength=num_classes)
        maps.confidence_sums += np.bincount(
            labels.ravel(), weights=confidence.ravel(), minlength=num_classes
        )
        if maps.probabilities is not None:
            maps.probabilities[:, rows] = band
        if maps.entropy is not None:
            maps.entropy[rows] = pixel_entropy(band)
        progress.step("segmenting")
    return maps


def write_outputs(
    job: MosaicJob,
    image: np.ndarray,
    mosaic_mpp: float,
    bundle: LoadedBundle,
    options: BatchOptions,
    maps: SegmentationMaps,
) -> tuple[str, ...]:
    """Write the requested outputs atomically; return their file names."""
    from rcmseg.io import writers

    mpp, names = bundle.working_mpp, bundle.class_names
    provenance = {
        "source": job.relative,
        "model": bundle.model,
        "bundle": f"{bundle.name} {bundle.version}",
        "preset": options.preset,
    }
    writers.write_label_tiff(
        job.output(LABELS), maps.labels, mpp, class_names=names, extra_metadata=provenance
    )
    if maps.probabilities is not None:
        writers.write_probability_tiff(
            job.output(PROBABILITIES), maps.probabilities, mpp, class_names=names
        )
    if maps.entropy is not None:
        writers.write_uncertainty_tiff(job.output(UNCERTAINTY), maps.entropy, mpp, unit="nats")
    if options.overlay:
        writers.write_overlay_png(job.output(OVERLAY), image, maps.labels, class_names=names)
    if options.geojson:
        writers.write_geojson(
            job.output(GEOJSON), maps.labels, mpp / mosaic_mpp, mpp=mpp, class_names=names
        )
    return tuple(job.output(kind).name for kind in options.requested_outputs())


def save_record(job: MosaicJob, record: MosaicRecord) -> None:
    """Write ``<name>.summary.json`` atomically: written last, it marks the mosaic finished."""
    from rcmseg.io.atomic import atomic_path

    job.out_stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(job.output(SUMMARY)) as partial:
        Path(partial).write_text(record.to_json(), encoding="utf-8")


def failure_record(job: MosaicJob, error: BaseException, seconds: float) -> MosaicRecord:
    """A ``failed`` record whose error is one line naming the file and the problem."""
    if isinstance(error, InputError):
        message = str(error)
    else:
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = f"{job.path}: {type(error).__name__}: {first_line}"
    return MosaicRecord(
        mosaic=job.relative, lesion=job.lesion, status="failed", error=message, seconds=seconds
    )


def remove_outputs(job: MosaicJob, finished: bool) -> None:
    """Delete temporary files a killed run left for this mosaic, and with ``finished`` its
    previous outputs too (record first, so that the mosaic never reads finished meanwhile)."""
    from rcmseg.io.atomic import PARTIAL_MARKER

    if finished:
        for kind in (SUMMARY, LABELS, PROBABILITIES, UNCERTAINTY, OVERLAY, GEOJSON):
            job.output(kind).unlink(missing_ok=True)
    if job.out_stem.parent.is_dir():
        for leftover in job.out_stem.parent.glob(f"{job.out_stem.name}.*{PARTIAL_MARKER}*"):
            leftover.unlink(missing_ok=True)


def device_for_part(device: str) -> str:
    """Under torchrun, ``auto`` picks the GPU of this process (``LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "auto" and local_rank is not None and resolve_device("auto").type == "cuda":
        return f"cuda:{int(local_rank)}"
    return device


def check_not_finished(jobs: list[MosaicJob], options: BatchOptions, out_dir: Path) -> None:
    """Refuse to silently redo finished work: ask for ``--continue`` or ``--overwrite``."""
    if options.resume or options.overwrite:
        return
    finished = [job for job in jobs if (record := read_record(job)) and record.status == "done"]
    if finished:
        raise InputError(
            out_dir,
            f"already holds finished outputs for {len(finished)} mosaic(s), e.g. "
            f"{finished[0].relative}; pass --continue to keep them or --overwrite to redo them",
        )


def run_batch(
    in_dir: str | Path,
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    options: BatchOptions | None = None,
    show_progress: bool = True,
) -> BatchResult:
    """Segment every mosaic under ``in_dir`` (this part of it) into ``out_dir``.

    Raises:
        InputError: a missing input folder, a bad bundle or manifest, no mosaics, bad part
            numbers, or finished outputs without ``resume``/``overwrite``. Failures of single
            mosaics do not raise: they are recorded and the batch goes on.
    """
    options = options or BatchOptions()
    if not str(in_dir) or not str(out_dir):  # e.g. inference.json run without --dataset_dir
        raise InputError(None, "both an input folder and an output folder are needed")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise InputError(in_dir, "input folder does not exist")
    if options.resume and options.overwrite:
        raise InputError(None, "--continue and --overwrite exclude each other")
    jobs = plan_jobs(in_dir, out_dir)
    if not jobs:
        raise InputError(in_dir, "holds no mosaics (TIFF, SVS, BMP, PNG, JPEG or NIfTI files)")
    mine = select_part(jobs, options.num_parts, options.part_id)
    check_not_finished(mine, options, out_dir)
    bundle = load_bundle(bundle_dir, device=device_for_part(options.device))
    if options.preset not in bundle.presets:
        raise InputError(bundle.root, f"has no preset {options.preset!r}")
    out_dir.mkdir(parents=True, exist_ok=True)

    if bundle.intended_use:
        console.print(
            f"[yellow]{bundle.name} {bundle.version}:[/] {bundle.intended_use}", highlight=False
        )
    records = []
    with batch_progress(show_progress, len(mine)) as progress:
        for job in mine:
            record = process_job(job, bundle, options, progress)
            if record.status == "failed":
                console.print(f"[red]failed[/red] {record.error}", highlight=False, soft_wrap=True)
            records.append(record)
            progress.mosaic_done()

    all_records = batch_records(jobs, records)
    mosaics_csv, patterns_csv = write_reports(out_dir, all_records, bundle.class_names)
    return BatchResult(records, all_records, mosaics_csv, patterns_csv)


def batch_records(jobs: list[MosaicJob], this_run: list[MosaicRecord]) -> list[MosaicRecord]:
    """A record for every job: this run's, else one saved by another run or part, else pending."""
    by_mosaic = {record.mosaic: record for record in this_run}
    return [
        replace(
            by_mosaic.get(job.relative) or read_record(job) or MosaicRecord("", "", "pending"),
            mosaic=job.relative,
            lesion=job.lesion,  # the manifest may have changed since a record was saved
        )
        for job in jobs
    ]


def process_job(
    job: MosaicJob, bundle: LoadedBundle, options: BatchOptions, progress: MosaicProgress
) -> MosaicRecord:
    """Skip, or segment, one mosaic; any failure becomes a saved ``failed`` record."""
    started = time.perf_counter()
    try:
        if options.resume and (record := finished_record(job, options)) is not None:
            return replace(record, status="skipped")
        remove_outputs(job, finished=options.overwrite)
        return segment_mosaic(job, bundle, options, progress)
    except Exception as error:  # one bad mosaic must not stop the batch
        record = failure_record(job, error, time.perf_counter() - started)
        with contextlib.suppress(OSError):
            save_record(job, record)
        return record


class RichBatchProgress(MosaicProgress):
    """A rich progress display: one bar over all mosaics, one for the current mosaic."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.display = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.overall = self.display.add_task("mosaics", total=total)
        self.current = self.display.add_task("", total=1, visible=False)

    def begin(self, job: MosaicJob, steps: int) -> None:
        self.name = job.relative
        self.display.reset(
            self.current, total=steps, visible=True, description=f"{job.relative}: reading"
        )

    def step(self, stage: str) -> None:
        self.display.update(self.current, advance=1, description=f"{self.name}: {stage}")

    def mosaic_done(self) -> None:
        self.display.update(self.current, visible=False)
        self.display.advance(self.overall)


@contextlib.contextmanager
def batch_progress(show: bool, total: int) -> Iterator[MosaicProgress]:
    """Rich bars when ``show`` (they hide themselves on a non-terminal), else nothing."""
    if not show:
        yield MosaicProgress()
        return
    progress = RichBatchProgress(total)
    with progress.display:
        yield progress


def print_summary(result: BatchResult) -> None:
    """The summary table of this run and one line of totals, on stdout."""
    from rich.console import Console

    stdout = Console()
    stdout.print(summary_table(result.records))
    counts = {status: 0 for status in ("done", "skipped", "failed")}
    for record in result.records:
        counts[record.status] = counts.get(record.status, 0) + 1
    stdout.print(
        ", ".join(f"{count} {status}" for status, count in counts.items())
        + f"; reports: {result.mosaics_csv}, {result.patterns_csv}",
        highlight=False,
        soft_wrap=True,
    )
