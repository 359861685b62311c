"""MONAI Label app: annotate RCM mosaics with MED-Net suggestions, fine-tune, pick what to label.

Start it with ``rcmseg label serve --studies DIR`` (binds to 127.0.0.1) or with MONAI Label
itself: ``monailabel start_server --app <this folder> --studies DIR --conf bundle B``.

Models: ``mednet`` (infer and train). Strategies: ``entropy`` (least certain unlabelled mosaic)
and MONAI Label's ``random``. Scoring: ``entropy`` (fills the strategy's cache).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import rcmseg
from rcmseg.batch.jobs import OUTPUT_IMAGE_ENDINGS
from rcmseg.classes import CLASS_NAMES
from rcmseg.errors import InputError
from rcmseg.io.atomic import is_utf8_name
from rcmseg.io.mosaics import MOSAIC_SUFFIXES
from rcmseg.label_app.asap import ASAP_SUFFIX
from rcmseg.label_app.configs import MEDNetTaskConfig
from rcmseg.label_app.workspace import Workspace

logger = logging.getLogger(__name__)

MODEL_NAME = "mednet"
# MONAI Label's defaults lack *.tiff; labels may come as PNG/TIFF/NRRD/NIfTI maps or QuPath XML.
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".nrrd", ".nii", ".nii.gz", ASAP_SUFFIX)


# Smallest tile side (mosaic px, 2 mm at 0.5 µm/px) of MONAI Label's WSI tiling; viewers ask for
# 1024 px tiles, which would cost several times the region's own work in context windows.
MIN_WSI_TILE_PX = 4096


def datastore_patterns() -> list[str]:
    """File patterns of mosaics (every format ``rcmseg batch`` reads) and of label files."""
    suffixes = dict.fromkeys((*MOSAIC_SUFFIXES, *LABEL_SUFFIXES))
    return [f"*{suffix}" for suffix in suffixes]


def opens_in_openslide(path: str) -> bool:
    """Whether OpenSlide reads ``path`` (MONAI Label's tiled WSI path needs it)."""
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide is part of the label extra
        return False
    try:
        return openslide.OpenSlide.detect_format(path) is not None
    except Exception:  # OpenSlide raises its own error types for unreadable files
        return False


class MosaicDatastore(LocalDatastore):
    """MONAI Label's local datastore, less the images ``rcmseg batch`` writes: in a studies
    folder that is also a batch's ``--out``, only the mosaics are images to annotate.

    Files MONAI Label cannot serve are left out with one warning each: names that are not UTF-8,
    and a second file with the same name but another ending (``a.png`` beside ``a.tif``: the
    first in sorted order is kept).
    """

    def _list_files(self, path: str, patterns: list[str]) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        kept: dict[str, str] = {}
        name_by_id: dict[str, str] = {}
        for name in sorted(files):
            if name.lower().endswith(OUTPUT_IMAGE_ENDINGS):
                continue
            image_id = self._to_id(name)[0]
            if not is_utf8_name(name):  # MONAI Label's JSON replies cannot carry it
                logger.warning(
                    "left out %r: file name is not UTF-8; rename it to annotate it", name
                )
            elif image_id in name_by_id:  # MONAI Label keys images by it: one would vanish
                logger.warning(
                    "left out %r: %r has the same name without its ending; rename one to annotate"
                    " both",
                    name,
                    name_by_id[image_id],
                )
            else:
                name_by_id[image_id] = name
                kept[name] = files[name]
        return kept


class RCMSegApp(MONAILabelApp):
    """The rcmseg app: one MED-Net model served from ``STUDIES/.rcmseg/bundle``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        if studies.startswith(("http://", "https://")):
            raise InputError(studies, "only a local studies folder is supported")
        self.workspace = Workspace.for_studies(studies)
        self.model_config = MEDNetTaskConfig()
        self.model_config.init(
            MODEL_NAME, os.path.join(app_dir, "model"), conf, None, workspace=self.workspace
        )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="rcmseg",
            description="MED-Net segmentation of RCM mosaics into six cellular patterns",
            version=rcmseg.__version__,
            labels=list(CLASS_NAMES),
        )

    def init_datastore(self) -> Datastore:
        return MosaicDatastore(
            self.studies,
            extensions=datastore_patterns(),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL_NAME: self.model_config.infer()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL_NAME: self.model_config.trainer()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), **self.model_config.strategy()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return self.model_config.scoring_method()

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> Any:
        """MONAI Label's WSI inference, also for mosaics OpenSlide cannot open.

        MONAI Label tiles a region only for files OpenSlide reads (tiled TIFF, SVS, ...); a
        striped TIFF, BMP, PNG or NIfTI mosaic goes to the infer task whole region at once,
        which reads it with rcmseg's readers and answers in the requested viewer format.
        """
        image, task = request.get("image"), self._infers.get(request.get("model", ""))
        if isinstance(image, str) and task is not None:
            path = image if os.path.exists(image) else self.datastore().get_image_uri(image)
            if path and not opens_in_openslide(path):
                task_request = copy.deepcopy(task.config())
                task_request.update(request)
                task_request["output"] = task_request.get("output") or "dsa"
                return self.infer(task_request, datastore)
        # Each tile is segmented with a window of context: small tiles repeat most of the work.
        tile = request.get("tile_size") or (MIN_WSI_TILE_PX, MIN_WSI_TILE_PX)
        request = {**request, "tile_size": [max(int(side), MIN_WSI_TILE_PX) for side in tile]}
        if not torch.cuda.is_available():
            # MONAI Label 0.8.5 spreads tiles over CUDA devices by default and divides by zero
            # where there are none.
            request = {**request, "multi_gpu": False, "device": "cpu"}
        return super().infer_wsi(request, datastore)
