"""Train task: fine-tune the served MED-Net on the datastore's labelled mosaics.

One run (MONAI Label starts it in a subprocess on ``POST /train/{model}``):

1. The mosaics with a ``final`` label become a data set in ``STUDIES/.rcmseg/train/<run>/``
   (``manifest.csv``; QuPath's ASAP XML labels are drawn into label maps, see
   :mod:`rcmseg.label_app.asap`). Labels are partial: unlabelled pixels (255) are ignored by the
   loss and by the validation Dice.
2. The mosaics are split into training and validation (``val_split``; a single labelled mosaic
   serves as both, so the comparison below still means something).
3. The served model's validation Dice is measured with the trainer's own validation function.
4. The bundle's ``configs/train.json`` runs (:func:`rcmseg.training.bundle.train_bundle`: the
   bundle's loss, optimiser and patch settings and :func:`rcmseg.training.train`), starting
   from the served weights, with the request's overrides (``max_epochs``, ...).
5. The run's best weights replace the served ``model.pt`` only if their validation Dice is not
   worse than the served model's; either way the outcome is kept in ``train_stats.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from rcmseg.bundle import load_bundle
from rcmseg.classes import NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.io.dataset import Case, write_manifest
from rcmseg.io.mosaics import mosaic_suffix
from rcmseg.label_app.asap import ASAP_SUFFIX, rasterize_asap_labels
from rcmseg.label_app.pixel_sizes import StudyPixelSizes
from rcmseg.label_app.workspace import ServedModel, Workspace, replace_file
from rcmseg.splits import SplitCase, holdout_fraction

logger = logging.getLogger(__name__)

# Request keys a client may set, and the train.json ids they override.
REQUEST_OVERRIDES: dict[str, str] = {
    "max_epochs": "epochs",
    "iterations_per_epoch": "iterations_per_epoch",
    "batch_size": "batch_size",
    "num_workers": "num_workers",
    "seed": "seed",
    "learning_rate": "learning_rate",
    "final_learning_rate": "final_learning_rate",
    "val_preset": "val_preset",
}


@dataclass(frozen=True)
class Split:
    """Datastore image ids for training and for validation."""

    train: list[str]
    val: list[str]


def split_ids(ids: list[str], val_split: float, seed: int) -> Split:
    """Hold out ``val_split`` of the mosaics (at least one) for validation, the rest trains:
    :func:`rcmseg.splits.holdout_fraction`, the split every rcmseg command uses, with each
    datastore image its own patient.

    With one labelled mosaic it both trains and validates: fine-tuning from few labels is the
    point of the app, and the served-model comparison needs some validation Dice.
    """
    ordered = sorted(ids)
    if len(ordered) == 1:
        return Split(train=ordered, val=ordered)
    cases = [SplitCase(i, i, "", np.ones(NUM_CLASSES, dtype=np.int64)) for i in ordered]
    train, val = holdout_fraction(cases, val_split, seed)
    return Split(train=list(train), val=list(val))


def labelled_cases(
    datastore: Datastore, run_dir: Path, pixel_sizes: StudyPixelSizes | None = None
) -> dict[str, Case]:
    """The datastore's mosaics with a final label, as data set cases (one patient each); a
    mosaic whose file carries no pixel size is read at the one ``pixel_sizes`` gives."""
    cases: dict[str, Case] = {}
    for item in datastore.datalist():
        mosaic, labels = Path(item["image"]), Path(item["label"])
        image_id = mosaic.name[: -len(mosaic_suffix(mosaic))]
        if labels.name.lower().endswith(ASAP_SUFFIX):
            labels = rasterize_asap_labels(labels, mosaic, run_dir / "labels" / f"{image_id}.png")
        cases[image_id] = Case(
            mosaic=mosaic,
            labels=labels,
            patient=image_id,
            lesion=image_id,
            clinic="",
            mosaic_mpp=pixel_sizes.fallback_mpp(mosaic) if pixel_sizes is not None else None,
        )
    if not cases:
        raise InputError(None, "no mosaic has a final label yet: save labels before training")
    return cases


def should_replace(trained_dice: float, served_dice: float) -> bool:
    """Serve the fine-tuned weights unless their validation Dice is worse (or unmeasured)."""
    if not math.isfinite(trained_dice):
        return False
    return not math.isfinite(served_dice) or trained_dice >= served_dice


def served_model_dice(
    bundle_dir: Path, data_dir: Path, val: list[Case], device: str, preset: str
) -> float:
    """Validation Dice of the served weights, by the trainer's own validation function."""
    from rcmseg.inference import resolve_device
    from rcmseg.training.data import load_cases
    from rcmseg.training.loop import validate

    bundle = load_bundle(bundle_dir, device)
    return validate(bundle.network, load_cases(val, data_dir), resolve_device(device), preset)


def bundle_value(bundle_dir: Path, key: str, default: Any) -> Any:
    """A plain top-level value of the bundle's ``configs/train.json``."""
    try:
        config = json.loads((bundle_dir / "configs" / "train.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default
    value = config.get(key, default)
    return default if isinstance(value, str) and value.startswith(("$", "@")) else value


class MEDNetTrain(TrainTask):
    """Fine-tune the served model with the bundle's training settings; keep it only if better.

    Args:
        workspace: the app's working state (the served bundle copy, run folders, stats).
        served: the served model (its weights file is replaced after a better run).
        device: ``auto``, ``cpu``, ``cuda:0``, ...
        defaults: request defaults shown to clients (``max_epochs``, ``val_split``, ...).
        pixel_sizes: µm/px of mosaics whose file carries none (none: 0.5 µm/px).
    """

    def __init__(
        self,
        workspace: Workspace,
        served: ServedModel,
        device: str = "auto",
        defaults: dict[str, Any] | None = None,
        pixel_sizes: StudyPixelSizes | None = None,
    ) -> None:
        super().__init__("Fine-tune MED-Net on the labelled mosaics (partial labels)")
        self.workspace = workspace
        self.served = served
        self.device = device
        self.defaults = {"val_split": 0.2, "seed": 0, **(defaults or {})}
        self.pixel_sizes = pixel_sizes

    def config(self) -> dict[str, Any]:
        return dict(self.defaults)

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.workspace.train_stats_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = {**self.defaults, **{k: v for k, v in request.items() if v is not None}}
        started = time.time()
        run_dir = self.workspace.runs_dir / time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
        run_dir.mkdir(parents=True, exist_ok=True)
        cases = labelled_cases(datastore, run_dir, self.pixel_sizes)
        split = split_ids(list(cases), float(options["val_split"]), int(options["seed"]))
        write_manifest(run_dir, list(cases.values()))

        device = self.device
        bundle_dir = self.workspace.bundle_dir
        preset = str(options.get("val_preset") or bundle_value(bundle_dir, "val_preset", "fast"))
        baseline = served_model_dice(
            bundle_dir, run_dir, [cases[i] for i in split.val], device, preset
        )
        result = self._run_bundle_training(run_dir, split, cases, options, device)

        candidate = result.best_val_dice
        replaced = should_replace(candidate, baseline)
        if replaced:
            replace_file(result.model_path, self.workspace.model_path)
        stats = {
            "run": run_dir.name,
            "train_mosaics": split.train,
            "val_mosaics": split.val,
            "served_val_dice": baseline,
            "trained_val_dice": candidate,
            "replaced": replaced,
            "epochs": result.epochs_completed,
            "best_epoch": result.best_epoch,
            "seconds": round(time.time() - started, 1),
            "model": str(self.workspace.model_path),
        }
        self.workspace.train_stats_path.write_text(json.dumps(stats, indent=1), encoding="utf-8")
        logger.info(
            "fine-tuning %s: served Dice %.4f, trained %.4f, %s",
            run_dir.name,
            baseline,
            candidate,
            "replaced the served model" if replaced else "kept the served model",
        )
        return stats

    def _run_bundle_training(
        self,
        run_dir: Path,
        split: Split,
        cases: dict[str, Case],
        options: dict[str, Any],
        device: str,
    ) -> Any:
        from rcmseg.training.bundle import train_bundle

        overrides: dict[str, Any] = {
            train_id: options[key] for key, train_id in REQUEST_OVERRIDES.items() if key in options
        }
        names = {image_id: case.mosaic.name for image_id, case in cases.items()}
        overrides.update(
            {
                "output_dir": str(run_dir / "output"),
                "ckpt_path": str(run_dir / "model.pt"),
                # Start from the served weights, not from network_def's fresh initialisation.
                "network": f"$rcmseg.bundle.load_bundle({str(self.workspace.bundle_dir)!r}, "
                "@device).network",
                "train_config#train_cases": [names[i] for i in split.train],
                "train_config#val_cases": [names[i] for i in split.val],
                "train_config#progress": False,
            }
        )
        if device != "auto":
            overrides["device"] = device
        return train_bundle(self.workspace.bundle_dir, run_dir, **overrides)
