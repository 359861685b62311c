"""Evaluate a model on the labelled mosaics of a dataset, as in the paper.

Every labelled mosaic is segmented with the shared sliding-window path
(:class:`rcmseg.inference.SegmentationEngine` on :func:`rcmseg.io.dataset.load_case` images at
the working resolution, 2 µm/px); metrics are one-vs-rest per class on labelled pixels only
(:mod:`rcmseg.metrics`), per mosaic and pooled over all mosaics (confusion matrices summed).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import track

from rcmseg.bundle import LoadedBundle, load_bundle
from rcmseg.classes import CLASS_NAMES, WORKING_MPP
from rcmseg.errors import InputError, noted_on_interrupt
from rcmseg.evaluation import report
from rcmseg.inference import Preset, SegmentationEngine, configure_threads
from rcmseg.io.atomic import write_csv_atomic, write_text_atomic
from rcmseg.io.dataset import Case, case_id, load_case, read_manifest
from rcmseg.io.mosaics import distinct_stems
from rcmseg.io.overlay import overlay_panels, save_png
from rcmseg.metrics import confusion_matrix, one_vs_rest

STDERR = Console(stderr=True)  # progress, failures and the start lines; results go to stdout

METRICS_FILE = "metrics.json"


def read_finished_evaluation(out_dir: Path) -> Evaluation | None:
    """The evaluation saved in ``out_dir`` when it is complete and readable, else None."""
    try:
        evaluation = Evaluation.from_json(json.loads((out_dir / METRICS_FILE).read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return evaluation if evaluation.cases else None


def metric_table(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and Dice per class plus their mean over classes.

    Returns ``{metric: (K + 1,) float64}``: entries 0..K-1 are the classes, entry K is the mean
    over classes as :func:`rcmseg.metrics.one_vs_rest` defines it (NaN where undefined).
    """
    values = one_vs_rest(np.asarray(confusion, dtype=np.int64))
    table = {}
    for metric in report.METRICS:
        per_class = np.asarray(values[metric], dtype=np.float64).reshape(-1)
        table[metric] = np.append(per_class, float(values[f"mean_{metric}"]))
    return table


@dataclass
class CaseResult:
    """Confusion matrix (K, K) of one labelled mosaic (rows truth, columns prediction)."""

    case_id: str
    patient: str
    lesion: str
    clinic: str
    confusion: np.ndarray

    def to_json(self) -> dict:
        return {
            "case_id": self.case_id,
            "patient": self.patient,
            "lesion": self.lesion,
            "clinic": self.clinic,
            "confusion": self.confusion.astype(int).tolist(),
        }


@dataclass
class Evaluation:
    """Per-mosaic results of one evaluation; pooled metrics come from the summed matrices.
    ``failed``: one line per labelled mosaic that could not be evaluated (file and problem);
    ``overlays``: the overlay PNGs this evaluation wrote (names inside ``OUT/overlays/``)."""

    cases: list[CaseResult]
    failed: list[str] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)

    @property
    def pooled_confusion(self) -> np.ndarray:
        return np.sum([c.confusion for c in self.cases], axis=0).astype(np.int64)

    def pooled(self) -> dict[str, np.ndarray]:
        return metric_table(self.pooled_confusion)

    def per_mosaic(self) -> list[dict[str, np.ndarray]]:
        return [metric_table(c.confusion) for c in self.cases]

    def to_json(self) -> dict:
        pooled = self.pooled()
        return {
            "pooled": {m: v.tolist() for m, v in pooled.items()},
            "rows": list(report.ROWS),
            "pooled_confusion": self.pooled_confusion.tolist(),
            "cases": [c.to_json() for c in self.cases],
            "failed": self.failed,
            "overlays": self.overlays,
        }

    @classmethod
    def from_json(cls, data: dict) -> Evaluation:
        return cls(
            [
                CaseResult(
                    c["case_id"],
                    c["patient"],
                    c["lesion"],
                    c["clinic"],
                    np.asarray(c["confusion"], dtype=np.int64),
                )
                for c in data["cases"]
            ],
            list(data.get("failed", [])),
            list(data.get("overlays", [])),
        )


def evaluate_cases(
    network: torch.nn.Module | SegmentationEngine,
    cases: Sequence[Case],
    root: Path,
    out_dir: Path | None = None,
    preset: str | Preset = "fast",
    device: str | torch.device = "cpu",
    remap: dict[int, int] | None = None,
    overlays: int = 3,
    target_mpp: float = WORKING_MPP,
    title: str = "Evaluation",
    notes: Sequence[str] = (),
    progress: bool = True,
    precision: str = "auto",
    tta: bool = False,
    keep_going: bool = False,
) -> Evaluation:
    """Segment every labelled case and collect confusion matrices; write the report if ``out_dir``.

    ``network`` may be a ready :class:`SegmentationEngine` (then ``preset``, ``device``,
    ``precision`` and ``tta`` are its own). The first ``overlays`` cases get an overlay PNG
    (mosaic, ground truth, prediction).

    Raises:
        InputError: no labelled case; a case that cannot be read or segmented, unless
            ``keep_going``: then it is printed, listed in ``failed`` and the report, and the rest
            are evaluated (an error only if none is left).
    """
    labelled = [c for c in cases if c.labels is not None]
    if not labelled:
        raise InputError(
            root,
            "no labelled mosaics to evaluate (the manifest's labels column "
            "is empty for every mosaic)",
        )
    engine = (
        network
        if isinstance(network, SegmentationEngine)
        else SegmentationEngine(network, preset, device, precision=precision, tta=tta)
    )
    results, failed, written = [], [], []
    ids = [case_id(case, root) for case in labelled]
    overlay_files = [stem.replace("/", "__") + ".png" for stem in distinct_stems(ids)]
    steps = list(zip(labelled, ids, overlay_files, strict=True))

    def kept() -> str:
        where = f" to {out_dir}" if out_dir is not None else ""
        return (
            f"{len(results)} of {len(labelled)} labelled mosaic(s) scored; no report written"
            f"{where}; run the same command again to evaluate them all"
        )

    with noted_on_interrupt(kept):
        for case, name, overlay_file in (
            track(steps, description="evaluating", transient=True, console=STDERR)
            if progress
            else steps
        ):
            try:
                image, labels = load_case(case, target_mpp=target_mpp, remap=remap)
                try:
                    prediction = engine.labels(image)
                except InputError as error:  # e.g. a mosaic below the inference minimum size
                    raise InputError(case.mosaic, error.problem) from None
            except InputError as error:
                if not keep_going:
                    raise
                failed.append(str(error))
                line = f"[red]failed[/red] {escape(str(error))}"
                STDERR.print(line, soft_wrap=True)
                continue
            results.append(
                CaseResult(
                    name,
                    str(case.patient),
                    str(case.lesion),
                    str(case.clinic),
                    confusion_matrix(prediction, labels, num_classes=len(CLASS_NAMES)),
                )
            )
            if out_dir is not None and len(results) <= overlays:
                save_png(
                    overlay_panels(image, labels, prediction),
                    Path(out_dir) / "overlays" / overlay_file,
                )
                written.append(overlay_file)
    if not results:
        raise InputError(root, f"no labelled mosaic could be evaluated ({len(failed)} failed)")
    evaluation = Evaluation(results, failed, written)
    if out_dir is not None:
        write_evaluation(Path(out_dir), evaluation, title=title, notes=notes)
    return evaluation


def evaluate_bundle(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    output_dir: str | Path,
    preset: str = "fast",
    device: str = "cpu",
    remap: dict[int, int] | None = None,
    overlays: int = 3,
    progress: bool = True,
    precision: str = "auto",
    tta: bool = False,
    ckpt_path: str | Path | None = None,
    backend: str = "torch",
    openvino_cache: str | Path | None = None,
    threads: int | None = None,
) -> Evaluation:
    """Load a bundle's model (weights from ``ckpt_path`` when given) and evaluate it on a
    dataset in the rcmseg layout (``rcmseg evaluate``), with the network run by ``backend``
    (:class:`~rcmseg.inference.SegmentationEngine`) on ``threads`` CPU threads (default: the
    cores this process may run on); see :func:`evaluate_loaded`."""
    threads = configure_threads(threads)
    bundle = load_bundle(Path(bundle_dir), device, ckpt_path=ckpt_path)
    engine = bundle.engine(
        preset, precision=precision, tta=tta, backend=backend, openvino_cache=openvino_cache
    )
    if progress:
        for line in bundle.start_lines(engine, threads):
            STDERR.print(line, highlight=False)
    return evaluate_loaded(bundle, engine, dataset_dir, output_dir, remap, overlays, progress)


def evaluate_loaded(
    bundle: LoadedBundle,
    engine: SegmentationEngine,
    dataset_dir: str | Path,
    output_dir: str | Path,
    remap: dict[int, int] | None = None,
    overlays: int = 3,
    progress: bool = True,
) -> Evaluation:
    """Evaluate a loaded bundle, segmenting with ``engine``, on a dataset in the rcmseg layout.

    Used by :func:`evaluate_bundle` and by the bundle's ``configs/evaluate.json``, which is
    layered on ``inference.json`` and passes its ``bundle`` and ``engine`` (so the network,
    weights, window and precision settings of inference count for evaluation too).
    """
    cases = read_manifest(Path(dataset_dir))
    notes = [
        f"Model: bundle `{bundle.name}` version {bundle.version} ({bundle.model}).",
        f"Data: `{Path(dataset_dir)}`; segmented with {engine.describe()}.",
    ]
    return evaluate_cases(
        engine,
        cases,
        Path(dataset_dir),
        Path(output_dir),
        remap=remap,
        overlays=overlays,
        target_mpp=bundle.working_mpp,
        title="Evaluation",
        notes=notes,
        progress=progress,
        keep_going=True,
    )


def _per_mosaic_rows(evaluation: Evaluation) -> tuple[list[str], list[list[object]]]:
    header = ["mosaic", "patient", "lesion", "clinic", "labelled_px"]
    header += [f"{name}_{m}" for name in report.ROWS for m in report.METRICS]
    rows = []
    for case, table in zip(evaluation.cases, evaluation.per_mosaic(), strict=True):
        row: list[object] = [
            case.case_id,
            case.patient,
            case.lesion,
            case.clinic,
            int(case.confusion.sum()),
        ]
        row += [
            report.csv_number(float(table[m][i]))
            for i in range(len(report.ROWS))
            for m in report.METRICS
        ]
        rows.append(row)
    return header, rows


def mosaic_spread(evaluation: Evaluation) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and standard deviation over mosaics of each metric (NaNs skipped)."""
    tables = evaluation.per_mosaic()
    stacked = {m: np.stack([t[m] for t in tables]) for m in report.METRICS}
    with warnings.catch_warnings():  # all-NaN columns (class absent everywhere) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = {m: np.nanmean(v, axis=0) for m, v in stacked.items()}
        stds = {m: np.nanstd(v, axis=0) for m, v in stacked.items()}
    return means, stds


def _not_evaluated_lines(failed: Sequence[str]) -> list[str]:
    if not failed:
        return []
    lines = [f"**Not evaluated: {len(failed)} mosaic(s)** (the metrics leave them out):", ""]
    return lines + [f"- {message}" for message in failed] + [""]


def write_evaluation(
    out_dir: Path, evaluation: Evaluation, title: str = "Evaluation", notes: Sequence[str] = ()
) -> None:
    """Write metrics.json, the CSV tables, the confusion-matrix CSV/PNG and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = evaluation.pooled()
    means, stds = mosaic_spread(evaluation)
    report.write_metric_csv(out_dir / "metrics_pooled.csv", pooled)
    write_csv_atomic(out_dir / "metrics_per_mosaic.csv", *_per_mosaic_rows(evaluation))
    report.write_confusion_csv(out_dir / "confusion_matrix.csv", evaluation.pooled_confusion)
    save_png(
        report.confusion_heatmap(evaluation.pooled_confusion), out_dir / "confusion_matrix.png"
    )
    header = ["", "sensitivity", "specificity", "Dice"]
    count = len(evaluation.cases)
    lines = [
        f"# {title}",
        "",
        *notes,
        *([""] if notes else []),
        f"{count} labelled mosaic{'s' if count != 1 else ''}, "
        f"{int(evaluation.pooled_confusion.sum())} labelled pixels at the working "
        "resolution. Metrics are one-vs-rest per class on labelled pixels only; "
        "unlabelled pixels are predicted but not scored.",
        "",
        *_not_evaluated_lines(evaluation.failed),
        "## Pooled over all mosaics",
        "",
        report.markdown_table(header, report.metric_rows(pooled)),
        "",
        "## Mean ± standard deviation over mosaics",
        "",
        report.markdown_table(header, report.metric_rows(means, stds)),
        "",
        "## Per mosaic (mean over classes)",
        "",
    ]
    rows = [
        [c.case_id, str(int(c.confusion.sum()))]
        + [report.format_value(float(t[m][-1])) for m in report.METRICS]
        for c, t in zip(evaluation.cases, evaluation.per_mosaic(), strict=True)
    ]
    lines += [
        report.markdown_table(["mosaic", "labelled px", *header[1:]], rows),
        "",
        "## Confusion matrix (pooled)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "Counts in `confusion_matrix.csv` (rows truth, columns prediction).",
        "",
    ]
    if evaluation.overlays:  # this run's, not what an earlier run left in the folder
        lines += ["## Examples", "", "Mosaic, ground truth (unlabelled grey) and prediction.", ""]
        lines += [f"![{Path(p).stem}](overlays/{p})" for p in evaluation.overlays]
    write_text_atomic(out_dir / "report.md", "\n".join(lines) + "\n")
    # Written last: a complete metrics.json marks the evaluation finished (rcmseg cv resumes on it).
    write_text_atomic(out_dir / METRICS_FILE, json.dumps(evaluation.to_json(), indent=1) + "\n")
