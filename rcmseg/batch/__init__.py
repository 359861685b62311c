"""Batch segmentation: plan the mosaics (:mod:`.jobs`), segment them through the engine and
keep resume state (:mod:`.run`, :mod:`.resume`), write their files (:mod:`.outputs`) and show
progress (:mod:`.progress`)."""

from rcmseg.batch.jobs import MosaicJob, parts_from_env, plan_jobs, select_part
from rcmseg.batch.run import (
    BatchOptions,
    BatchResult,
    Segmenter,
    check_size,
    print_summary,
    run_batch,
)

__all__ = [
    "BatchOptions",
    "BatchResult",
    "MosaicJob",
    "Segmenter",
    "check_size",
    "parts_from_env",
    "plan_jobs",
    "print_summary",
    "run_batch",
    "select_part",
]
