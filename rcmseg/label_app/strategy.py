"""Active learning: label next the unlabelled mosaic the model is least sure about.

A mosaic's uncertainty is the mean over its pixels of the entropy of the class probabilities
(:func:`rcmseg.inference.pixel_entropy`, the uncertainty map ``rcmseg batch`` writes), in nats:
0 when every pixel is certain, ln 6 ≈ 1.79 when every pixel is a six-way toss-up. Scores
are cached in ``STUDIES/.rcmseg/entropy.json`` per mosaic file version and per model, so a mosaic
is segmented once per model: by the strategy when it meets it, by the ``entropy`` scoring method
that MONAI Label runs in the background after training, or by a whole-mosaic inference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from rcmseg.errors import InputError
from rcmseg.io.atomic import write_text_atomic
from rcmseg.label_app.pixel_sizes import StudyPixelSizes
from rcmseg.label_app.workspace import ServedModel

logger = logging.getLogger(__name__)

EntropyFunction = Callable[[Path], float]


class EntropyCache:
    """Mean entropies on disk, keyed by mosaic path, file version (and the pixel size a file
    without one is read at, from ``pixel_sizes``) and model id.

    Shared by the server and MONAI Label's scoring subprocess: writes merge under a file lock
    and land with one rename.
    """

    def __init__(self, path: Path, pixel_sizes: StudyPixelSizes | None = None) -> None:
        self.path = path
        self.pixel_sizes = pixel_sizes
        self._lock = FileLock(str(path) + ".lock")

    @staticmethod
    def _key(mosaic: Path) -> str:
        return str(mosaic.resolve())

    def _version(self, mosaic: Path) -> list[float]:
        stat = mosaic.stat()
        mpp = [self.pixel_sizes.fallback_mpp(mosaic)] if self.pixel_sizes is not None else []
        return [stat.st_mtime_ns, stat.st_size, *mpp]

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def get(self, mosaic: Path, model: str) -> float | None:
        entry = self._load().get(self._key(mosaic))
        if entry and entry["model"] == model and entry["version"] == self._version(mosaic):
            return float(entry["entropy"])
        return None

    def put(self, mosaic: Path, model: str, entropy: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"model": model, "version": self._version(mosaic), "entropy": float(entropy)}
        with self._lock:
            scores = self._load()
            scores[self._key(mosaic)] = entry
            write_text_atomic(self.path, json.dumps(scores, indent=1))


class MosaicEntropy:
    """Mean normalised entropy of a mosaic under the served model, through the cache."""

    def __init__(
        self,
        served: ServedModel,
        cache: EntropyCache,
        compute: Callable[[Path, Any], float],
    ) -> None:
        self.served = served
        self.cache = cache
        self.compute = compute

    def __call__(self, mosaic: Path) -> float:
        bundle = self.served.get()
        cached = self.cache.get(mosaic, bundle.model)
        if cached is not None:
            return cached
        entropy = self.compute(mosaic, bundle)
        self.cache.put(mosaic, bundle.model, entropy)
        return entropy


def unlabelled_mosaics(request: dict[str, Any], datastore: Datastore) -> dict[str, Path]:
    """Datastore id → file of every image without a label of the requested tag (final)."""
    images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
    return {image_id: Path(datastore.get_image_uri(image_id)) for image_id in images}


def score_mosaics(mosaics: dict[str, Path], entropy: EntropyFunction) -> dict[str, float]:
    """Entropy of each mosaic; an unreadable one is logged and left out."""
    scores: dict[str, float] = {}
    for image_id, path in mosaics.items():
        try:
            scores[image_id] = entropy(path)
        except (InputError, ValueError) as error:
            logger.warning("entropy of %s skipped: %s", image_id, error)
    return scores


class EntropyStrategy(Strategy):
    """Next mosaic = the unlabelled one with the highest mean per-pixel entropy."""

    def __init__(self, entropy: EntropyFunction) -> None:
        super().__init__("Unlabelled mosaic the model is least sure about (mean entropy)")
        self.entropy = entropy

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        scores = score_mosaics(unlabelled_mosaics(request, datastore), self.entropy)
        if not scores:
            return None
        chosen = max(scores, key=lambda image_id: scores[image_id])
        logger.info(
            "entropy strategy: %s (%.4f) of %d unlabelled", chosen, scores[chosen], len(scores)
        )
        return {"id": chosen, "entropy": scores[chosen], "scores": scores}


class EntropyScoring(ScoringMethod):
    """Fill the entropy cache for every unlabelled mosaic (MONAI Label runs it after training)."""

    def __init__(self, entropy: EntropyFunction) -> None:
        super().__init__("Mean per-pixel entropy of unlabelled mosaics under the served model")
        self.entropy = entropy

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        scores = score_mosaics(unlabelled_mosaics(request, datastore), self.entropy)
        return {"entropy": scores}
