"""Task config of the MED-Net model: its infer task, train task, strategy and scoring method.

App options come from MONAI Label's ``--conf KEY VALUE`` (``rcmseg label serve`` sets them):

    bundle   the bundle the working copy is seeded from (default: rcmseg's default bundle)
    preset   sliding-window preset for inference and entropy (default ``fast``)
    device   ``auto`` (CUDA when present), ``cpu``, ``cuda:1``, ... (default ``auto``)
    precision ``auto``, ``fp32``, ``bf16`` or ``fp16`` (default ``auto``)
    backend  ``torch`` or ``openvino`` (CPU, extra ``rcmseg[openvino]``; default ``torch``)
    openvino_cache  a folder to keep the network converted for OpenVINO in (default: none)
    epochs   fine-tuning epochs (default: the bundle's ``train.json``)
    mpp      µm/px of mosaics whose file carries no pixel size and that ``STUDIES/manifest.csv``
             does not size (default 0.5; :mod:`rcmseg.label_app.pixel_sizes`)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from rcmseg.bundle import default_bundle_dir
from rcmseg.classes import CLASS_NAMES, MOSAIC_MPP
from rcmseg.inference import configure_threads
from rcmseg.label_app.infer import MEDNetInfer, Runtime, whole_mosaic_entropy
from rcmseg.label_app.pixel_sizes import StudyPixelSizes
from rcmseg.label_app.strategy import (
    EntropyCache,
    EntropyScoring,
    EntropyStrategy,
    MosaicEntropy,
)
from rcmseg.label_app.train import MEDNetTrain
from rcmseg.label_app.workspace import ServedModel, Workspace


class MEDNetTaskConfig(TaskConfig):
    """MED-Net served from the working copy of a bundle kept under ``STUDIES/.rcmseg``."""

    def init(
        self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any
    ) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        self.workspace: Workspace = kwargs["workspace"]
        self.labels = {class_name: index for index, class_name in enumerate(CLASS_NAMES)}
        source = Path(conf.get("bundle") or default_bundle_dir())
        self.bundle_path = str(self.workspace.ensure_bundle(source))
        self.path = str(self.workspace.model_path)
        # the server's torch threads: --threads, else the cores this process may run on
        configure_threads(int(conf["threads"]) if conf.get("threads") else None)
        self.preset = conf.get("preset", "fast")
        self.device = conf.get("device", "auto")
        self.runtime = Runtime(
            precision=conf.get("precision", "auto"),
            backend=conf.get("backend", "torch"),
            openvino_cache=conf.get("openvino_cache") or None,
        )
        self.pixel_sizes = StudyPixelSizes(
            self.workspace.studies, float(conf.get("mpp") or MOSAIC_MPP)
        )
        self.served = ServedModel(self.workspace.bundle_dir, self.device)
        self.cache = EntropyCache(self.workspace.entropy_path, self.pixel_sizes)
        self.entropy = MosaicEntropy(
            self.served,
            self.cache,
            lambda mosaic, bundle: whole_mosaic_entropy(
                mosaic, bundle, self.preset, self.runtime, self.pixel_sizes
            ),
        )

    def infer(self) -> InferTask:
        return MEDNetInfer(
            self.served,
            preset=self.preset,
            on_whole_mosaic=self.cache.put,
            runtime=self.runtime,
            pixel_sizes=self.pixel_sizes,
        )

    def trainer(self) -> TrainTask:
        defaults: dict[str, Any] = {}
        if self.conf.get("epochs"):
            defaults["max_epochs"] = int(self.conf["epochs"])
        return MEDNetTrain(self.workspace, self.served, self.device, defaults, self.pixel_sizes)

    def strategy(self) -> dict[str, Strategy]:
        return {"entropy": EntropyStrategy(self.entropy)}

    def scoring_method(self) -> dict[str, ScoringMethod]:
        return {"entropy": EntropyScoring(self.entropy)}
