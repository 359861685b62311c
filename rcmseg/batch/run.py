"""Segment every mosaic under a folder (or one mosaic file): ``rcmseg batch`` and the bundle's
``inference.json``.

Every file is written to a temporary sibling and renamed into place when complete, and the
mosaic's record (``<name>.summary.json``) last, so a killed run never leaves a file that looks
finished. A mosaic that fails (unreadable, truncated, wrong type, too small) gets a ``failed``
record and the batch goes on. ``OUT/mosaics.csv`` and ``OUT/patterns.csv`` are rebuilt at the end
of every run from all records in OUT, so the last part of a split run to finish writes complete
reports. All options are checked before any mosaic is touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.markup import escape

from rcmseg.batch.jobs import MosaicJob, plan_jobs, select_part
from rcmseg.batch.outputs import requested_outputs, write_outputs
from rcmseg.batch.progress import MosaicProgress, batch_progress, console
from rcmseg.batch.resume import (
    Provenance,
    check_not_finished,
    check_not_foreign,
    read_record,
    remove_outputs,
    reuse_verdict,
    save_record,
)
from rcmseg.bundle import LoadedBundle, load_bundle
from rcmseg.classes import MOSAIC_MPP
from rcmseg.errors import InputError, os_reason, read_flags
from rcmseg.inference import (
    MIN_SIDE_PX,
    SegmentationEngine,
    SegmentationMaps,
    configure_threads,
    resolve_device,
)
from rcmseg.io.atomic import check_output_folder
from rcmseg.io.mosaics import (
    FolderTree,
    MosaicInfo,
    check_fallback_mpp,
    probe_mosaic,
    read_mosaic,
    walk_folder,
)
from rcmseg.report import MosaicRecord, summary_table, write_reports


@dataclass(frozen=True)
class BatchOptions:
    """How ``run_batch`` segments and what it writes.

    Attributes:
        preset: sliding-window preset name (``fast`` or ``paper``, or one the bundle defines).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:1``, ...
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see
            :func:`rcmseg.inference.resolve_precision`).
        tta: test-time augmentation, the mean over 8 flips/rotations (8x the network time).
        backend: ``torch`` or ``openvino`` (CPU; extra ``rcmseg[openvino]``).
        openvino_cache: folder to keep the converted OpenVINO model in, reused by later runs.
        fallback_mpp: µm/px of mosaics whose file carries no pixel size.
        probabilities, uncertainty, overlay, geojson: optional outputs.
        resume: skip mosaics whose outputs are complete, valid and made the same way
            (``--continue``).
        overwrite: redo mosaics that already have finished outputs.
        num_parts, part_id: process only mosaics ``part_id, part_id + num_parts, ...`` of the
            sorted list, so that parts run on several processes or machines without overlap.
        threads: torch CPU threads (default: the cores this process may run on).
    """

    preset: str = "fast"
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    backend: str = "torch"
    openvino_cache: Path | None = None
    fallback_mpp: float = MOSAIC_MPP
    probabilities: bool = False
    uncertainty: bool = False
    overlay: bool = False
    geojson: bool = False
    resume: bool = False
    overwrite: bool = False
    num_parts: int = 1
    part_id: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        read_flags(self)

    def requested_outputs(self) -> tuple[str, ...]:
        return requested_outputs(self.probabilities, self.uncertainty, self.overlay, self.geojson)

    def check(self) -> None:
        """Refuse contradictory or impossible options with one line."""
        check_fallback_mpp(self.fallback_mpp)
        if self.resume and self.overwrite:
            raise InputError(None, "--continue and --overwrite exclude each other")


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


def check_size(width: int, height: int, path: Path) -> None:
    """Refuse mosaics below :data:`~rcmseg.inference.MIN_SIDE_PX` at the working resolution."""
    if min(width, height) < MIN_SIDE_PX:
        raise InputError(
            path,
            f"too small: {width}×{height} px at the working resolution, below the "
            f"{MIN_SIDE_PX} px minimum side",
        )


@dataclass
class LoadedMosaic:
    """A mosaic read at the working resolution, with what its record needs from the file."""

    info: MosaicInfo
    image: np.ndarray
    source_size: int
    source_mtime_ns: int
    read_seconds: float


# A write refused for one of these reasons is refused for every later mosaic too (a full drive,
# a quota, a drive remounted read-only): the batch stops rather than segment what it cannot keep.
OUTPUT_STOPPERS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class OutputsNotWritten(InputError):
    """A mosaic was segmented but its outputs could not be written (``cause``: the OSError)."""

    def __init__(self, out_dir: Path, job: MosaicJob, cause: OSError) -> None:
        reason = os_reason(cause)
        super().__init__(out_dir, f"the outputs of {job.relative} cannot be written ({reason})")
        self.stops_batch = cause.errno in OUTPUT_STOPPERS


@dataclass
class Segmenter:
    """What segments every mosaic of a run: the bundle, its engine and the run's options.

    Each mosaic goes read → infer → write. :meth:`segment_all` overlaps the stages: the next
    mosaic is read and the previous one written while the current one is segmented, with at
    most one mosaic read ahead and one waiting to be written (bounded memory).
    """

    bundle: LoadedBundle
    engine: SegmentationEngine
    options: BatchOptions
    stopped: str = ""  # why the batch stopped early (outputs could no longer be written)

    @property
    def provenance(self) -> Provenance:
        return Provenance(
            model=self.bundle.model,
            bundle_version=self.bundle.version,
            preset=self.engine.preset_name,
            engine=self.engine.describe(with_device=False),
            outputs=self.options.requested_outputs(),
            fallback_mpp=self.options.fallback_mpp,
        )

    def read(self, job: MosaicJob) -> LoadedMosaic:
        """Read one mosaic at the working resolution; raise on a bad file."""
        started = time.perf_counter()
        mpp = job.fallback_mpp(self.options.fallback_mpp)
        info = probe_mosaic(job.path, fallback_mpp=mpp)  # first: its errors name the problem
        stat = job.path.stat()
        height, width = info.working_shape(self.bundle.working_mpp)
        check_size(width, height, job.path)
        image, info = read_mosaic(job.path, self.bundle.working_mpp, fallback_mpp=mpp)
        if info.mpp_source == "fallback" and job.declared_mpp:
            info = replace(info, mpp_source="manifest")
        seconds = time.perf_counter() - started
        return LoadedMosaic(info, image, stat.st_size, stat.st_mtime_ns, seconds)

    def infer(
        self, job: MosaicJob, mosaic: LoadedMosaic, progress: MosaicProgress
    ) -> tuple[SegmentationMaps, float]:
        """The mosaic's maps and the seconds they took."""
        started = time.perf_counter()
        progress.begin(job, steps=self.engine.band_count(*mosaic.image.shape) + 2)
        progress.step("segmenting")
        maps = self.engine.segment(
            mosaic.image,
            probabilities=self.options.probabilities,
            entropy=self.options.uncertainty,
            on_band=lambda: progress.step("segmenting"),
        )
        progress.step("writing")
        return maps, time.perf_counter() - started

    def write(
        self,
        job: MosaicJob,
        mosaic: LoadedMosaic,
        maps: SegmentationMaps,
        infer_seconds: float,
        note: str = "",
    ) -> MosaicRecord:
        """Write the mosaic's outputs, then its record (last: it marks the mosaic finished)."""
        started = time.perf_counter()
        bundle, info, provenance = self.bundle, mosaic.info, self.provenance
        description = {
            "source": job.relative,
            "model": bundle.model,
            "bundle": f"{bundle.name} {bundle.version}",
            "preset": provenance.preset,
            "settings": provenance.engine,
        }
        try:
            outputs = write_outputs(
                job, mosaic.image, info.mosaic_mpp, bundle, maps, provenance.outputs, description
            )
        except OSError as error:
            with contextlib.suppress(OSError):  # a failed mosaic keeps no outputs (frees room)
                remove_outputs(job, finished=True)
            raise OutputsNotWritten(job.out_stem.parent, job, error) from error
        write_seconds = time.perf_counter() - started
        record = MosaicRecord(
            mosaic=job.relative,
            lesion=job.lesion,
            status="done",
            seconds=mosaic.read_seconds + infer_seconds + write_seconds,
            read_seconds=mosaic.read_seconds,
            infer_seconds=infer_seconds,
            write_seconds=write_seconds,
            width_px=info.width_px,
            height_px=info.height_px,
            mosaic_mpp=info.mosaic_mpp,
            mpp_source=info.mpp_source,
            working_mpp=bundle.working_mpp,
            working_shape=tuple(maps.labels.shape),
            pixel_counts=tuple(int(count) for count in maps.counts),
            confidence_sums=tuple(float(total) for total in maps.confidence_sums),
            preset=provenance.preset,
            engine=provenance.engine,
            precision=self.engine.precision,
            model=bundle.model,
            bundle=bundle.name,
            bundle_version=bundle.version,
            source_size=mosaic.source_size,
            source_mtime_ns=mosaic.source_mtime_ns,
            outputs=outputs,
            note=note,
        )
        save_record(job, record)
        return record

    def segment_mosaic(
        self, job: MosaicJob, progress: MosaicProgress, note: str = ""
    ) -> MosaicRecord:
        """Read, segment and write one mosaic in turn; raise on any failure."""
        mosaic = self.read(job)
        return self.write(job, mosaic, *self.infer(job, mosaic, progress), note)

    def plan(self, job: MosaicJob) -> MosaicRecord | str:
        """The kept record of a finished mosaic (``skipped``), else the note of why it is
        (re)done; leftovers of killed runs (and redone outputs) are removed first."""
        note = ""
        if self.options.resume:
            kept, why = reuse_verdict(job, self.provenance)
            if kept is not None:
                return replace(kept, status="skipped")
            if why:
                note = f"redone: {why}"
                console.print(
                    f"[yellow]redo[/yellow] {escape(job.relative)}: {escape(why)}",
                    highlight=False,
                    soft_wrap=True,
                )
        check_not_foreign(job, self.provenance.outputs)
        remove_outputs(job, finished=self.options.overwrite or bool(note))
        return note

    def segment_all(self, jobs: list[MosaicJob], progress: MosaicProgress) -> list[MosaicRecord]:
        """Every job's record, in order; reads and writes overlap the segmentation."""
        records: dict[int, MosaicRecord] = {}
        todo: list[tuple[int, MosaicJob, str]] = []
        for index, job in enumerate(jobs):
            try:
                planned = self.plan(job)
            except Exception as error:  # e.g. an unreadable output folder
                records[index] = self.failed(job, error, 0.0)
                continue
            if isinstance(planned, MosaicRecord):
                records[index] = planned
                progress.mosaic_done()
            else:
                todo.append((index, job, planned))
        with (
            ThreadPoolExecutor(1, "rcmseg-read") as reader,
            ThreadPoolExecutor(1, "rcmseg-write") as writer,
        ):
            reading = reader.submit(self.read, todo[0][1]) if todo else None
            writing: tuple[int, MosaicJob, Future] | None = None
            for position, (index, job, note) in enumerate(todo):
                started = time.perf_counter()
                current, reading = reading, None
                if position + 1 < len(todo):  # one mosaic read ahead, no more
                    reading = reader.submit(self.read, todo[position + 1][1])
                try:
                    assert current is not None
                    mosaic = current.result()
                    maps, infer_seconds = self.infer(job, mosaic, progress)
                except Exception as error:  # one bad mosaic must not stop the batch
                    records[index] = self.failed(job, error, time.perf_counter() - started)
                    progress.mosaic_done()
                    continue
                if writing is not None:  # one mosaic waits to be written, no more
                    records[writing[0]] = self.written(*writing[1:])
                    writing = None
                    if self.stopped:  # this mosaic and the rest stay pending
                        break
                future = writer.submit(self.write, job, mosaic, maps, infer_seconds, note)
                writing = (index, job, future)
                progress.mosaic_done()
            if writing is not None:
                records[writing[0]] = self.written(*writing[1:])
        return [records[index] for index in range(len(jobs)) if index in records]

    def written(self, job: MosaicJob, future: Future) -> MosaicRecord:
        """The record of a write, or a failure record if writing failed."""
        try:
            return future.result()
        except Exception as error:
            if isinstance(error, OutputsNotWritten) and error.stops_batch:
                self.stopped = str(error)
            return self.failed(job, error, 0.0)

    def failed(self, job: MosaicJob, error: BaseException, seconds: float) -> MosaicRecord:
        """A ``failed`` record, saved (best effort) unless the mosaic's outputs of an earlier
        run are still finished: a mosaic that cannot be read now (e.g. a link to an unmounted
        drive under ``--continue``) keeps them, and a later run can keep them too."""
        record = failure_record(job, error, seconds)
        previous = read_record(job)
        if previous is None or previous.status != "done":
            with contextlib.suppress(OSError):
                save_record(job, record)
        return record


def failure_record(job: MosaicJob, error: BaseException, seconds: float) -> MosaicRecord:
    """A ``failed`` record whose error is one line naming the file and the problem."""
    if isinstance(error, InputError):
        message = str(error) if error.path is not None else f"{job.path}: {error.problem}"
    else:
        first_line = (str(error).strip().splitlines() or [""])[0]
        message = f"{job.path}: {type(error).__name__}: {first_line}"
    return MosaicRecord(
        mosaic=job.relative, lesion=job.lesion, status="failed", error=message, seconds=seconds
    )


def device_for_part(device: str) -> str:
    """Under torchrun, ``auto`` picks the GPU of this process (``LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "auto" and local_rank is not None and resolve_device("auto").type == "cuda":
        return f"cuda:{int(local_rank)}"
    return device


def run_batch(
    in_dir: str | Path,
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    options: BatchOptions | None = None,
    show_progress: bool = True,
    *,
    bundle: LoadedBundle | None = None,
    engine: SegmentationEngine | None = None,
) -> BatchResult:
    """Segment every mosaic under ``in_dir`` (a folder or one mosaic file) into ``out_dir``.

    ``bundle`` and ``engine`` given (``inference.json`` builds them from its parsed config)
    are used as they are; otherwise the bundle is loaded from ``bundle_dir`` and its engine
    built from ``options``.

    Raises:
        InputError: a missing input, an output folder that cannot be written, bad options (device,
            precision, preset, pixel size, parts), a bad bundle or manifest, no mosaics, or
            finished outputs without ``resume``/``overwrite``. All are checked before any mosaic
            is segmented. Failures of single mosaics do not raise: they are recorded and the
            batch goes on.
    """
    options = options or BatchOptions()
    if not str(in_dir) or not str(out_dir):  # e.g. inference.json run without --dataset_dir
        raise InputError(None, "both an input folder and an output folder are needed")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    options.check()
    check_output_folder(out_dir)
    tree = walk_folder(in_dir)  # empty for a mosaic file: plan_jobs walks its folder
    jobs = plan_jobs(in_dir, out_dir, tree)
    announce_unsearched(tree)
    if not jobs:
        raise InputError(in_dir, "holds no mosaics (TIFF, SVS, BMP, PNG, JPEG or NIfTI files)")
    mine = select_part(jobs, options.num_parts, options.part_id)
    if not (options.resume or options.overwrite):
        check_not_finished(mine, out_dir)
    threads = configure_threads(options.threads)
    if bundle is None:
        bundle = load_bundle(bundle_dir, device=device_for_part(options.device))
    if engine is None:
        engine = bundle.engine(
            options.preset,
            precision=options.precision,
            tta=options.tta,
            backend=options.backend,
            openvino_cache=options.openvino_cache,
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    for line in bundle.start_lines(engine, threads):
        console.print(line, highlight=False)
    segmenter = Segmenter(bundle, engine, options)
    try:
        with batch_progress(show_progress, len(mine)) as progress:
            records = segmenter.segment_all(mine, progress)
    except KeyboardInterrupt as interrupt:
        interrupt.add_note(report_interruption(jobs, mine, out_dir, bundle.class_names))
        raise
    for record in records:
        if record.status == "failed":
            console.print(
                f"[red]failed[/red] {escape(record.error)}", highlight=False, soft_wrap=True
            )

    announce_fallback_mpp(records, options.fallback_mpp)
    if segmenter.stopped:
        finished = sum(record.status in ("done", "skipped") for record in records)
        console.print(
            f"[red]stopped:[/] {escape(segmenter.stopped)}; {finished} of {len(mine)} mosaic(s) "
            "finished and kept; make room and run the same command with --continue to do the rest",
            highlight=False,
            soft_wrap=True,
        )
    all_records = batch_records(jobs, records)
    try:
        mosaics_csv, patterns_csv = write_reports(out_dir, all_records, bundle.class_names)
    except OSError as error:
        raise InputError(out_dir, f"the reports cannot be written ({os_reason(error)})") from error
    return BatchResult(records, all_records, mosaics_csv, patterns_csv)


def report_interruption(
    jobs: list[MosaicJob], mine: list[MosaicJob], out_dir: Path, class_names: tuple[str, ...]
) -> str:
    """After Ctrl-C (the mosaic being written is finished first): write reports of what is on
    disk, the rest ``pending``, and return the line that says what is kept and how to go on."""
    all_records = batch_records(jobs, [])
    write_reports(out_dir, all_records, class_names)
    mosaics = {job.relative for job in mine}
    finished = sum(r.status == "done" and r.mosaic in mosaics for r in all_records)
    return (
        f"{finished} of {len(mine)} mosaic(s) finished and kept in {out_dir}; run the same "
        "command with --continue to do the rest"
    )


def announce_unsearched(tree: FolderTree) -> None:
    """Say what under the input folder could not be searched (a linked folder on a share that
    is not mounted, a folder without read permission): its mosaics would otherwise be left out
    without a word."""
    note = tree.unsearched_note()
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def announce_fallback_mpp(records: list[MosaicRecord], fallback_mpp: float) -> None:
    """Say how many mosaics carried no pixel size: their mm² rest on ``--mpp``."""
    count = sum(r.mpp_source == "fallback" and r.status != "failed" for r in records)
    if count:
        console.print(
            f"[yellow]note:[/] {count} mosaic(s) carry no pixel size; {fallback_mpp} µm/px "
            "assumed (--mpp); their areas in mm² are right only if that is their pixel size",
            highlight=False,
            soft_wrap=True,
        )


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
