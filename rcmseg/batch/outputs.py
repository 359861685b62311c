"""The files a batch writes for one mosaic, each atomically: label TIFF, optional probability
and uncertainty TIFFs, overlay PNG and QuPath GeoJSON."""

from __future__ import annotations

import numpy as np

from rcmseg.batch.jobs import GEOJSON, LABELS, OVERLAY, PROBABILITIES, UNCERTAINTY, MosaicJob
from rcmseg.bundle import LoadedBundle
from rcmseg.inference import SegmentationMaps


def requested_outputs(probabilities: bool, uncertainty: bool, overlay: bool, geojson: bool):
    """The output kinds of a run, label TIFF first."""
    optional = (
        (PROBABILITIES, probabilities),
        (UNCERTAINTY, uncertainty),
        (OVERLAY, overlay),
        (GEOJSON, geojson),
    )
    return (LABELS, *(name for name, wanted in optional if wanted))


def write_outputs(
    job: MosaicJob,
    image: np.ndarray,
    mosaic_mpp: float,
    bundle: LoadedBundle,
    maps: SegmentationMaps,
    kinds: tuple[str, ...],
    provenance: dict[str, str],
) -> tuple[str, ...]:
    """Write the outputs ``kinds`` of one mosaic atomically; return their file names.

    ``provenance`` (source, model, bundle, settings) goes into the label TIFF's description.
    """
    from rcmseg.io import geojson, overlay, writers

    mpp, names = bundle.working_mpp, bundle.class_names
    writers.write_label_tiff(
        job.output(LABELS), maps.labels, mpp, class_names=names, extra_metadata=provenance
    )
    if PROBABILITIES in kinds:
        assert maps.probabilities is not None
        writers.write_probability_tiff(
            job.output(PROBABILITIES), maps.probabilities, mpp, class_names=names
        )
    if UNCERTAINTY in kinds:
        assert maps.entropy is not None
        writers.write_uncertainty_tiff(job.output(UNCERTAINTY), maps.entropy, mpp, unit="nats")
    if OVERLAY in kinds:
        overlay.write_overlay_png(job.output(OVERLAY), image, maps.labels, class_names=names)
    if GEOJSON in kinds:
        geojson.write_geojson(
            job.output(GEOJSON), maps.labels, mpp / mosaic_mpp, mpp=mpp, class_names=names
        )
    return tuple(job.output(kind).name for kind in kinds)
