"""A training run's settings (:class:`TrainConfig`) and what it produced (:class:`TrainResult`).

Defaults follow the MED-Net protocol (Kose et al. 2021): 200 epochs, batch 48, learning rate 0.01
decayed exponentially to 0.001 by the last epoch, weight decay 1e-8, MDSC+TV loss with γ = 1e-6,
256 px crops from 512 px windows at 50% overlap, all at the working resolution of 2 µm/px.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcmseg.errors import InputError, read_flags

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
AUGMENTATIONS: tuple[str, ...] = ("batched", "per_patch", "none")


def component_dict(value: Any, name: str) -> Any:
    """A name (lower-cased), or a component as a JSON-able ``{"_target_": ..., **kwargs}`` dict:
    MONAI's ``"_mode_": "callable"`` partials are turned back into that form."""
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, functools.partial):
        target = f"{value.func.__module__}.{value.func.__qualname__}"
        return {"_target_": target, **value.keywords}
    if isinstance(value, dict) and isinstance(value.get("_target_"), str):
        return {k: v for k, v in value.items() if k not in ("_mode_", "_requires_", "_desc_")}
    raise InputError(None, f"{name} must be a name or a component with a _target_, not {value!r}")


def build_component(spec: dict[str, Any], first: Any, **defaults: Any) -> Any:
    """Instantiate ``spec`` (``{"_target_": "torch.optim.SGD", ...}``) as
    ``target(first, **defaults, **rest)``."""
    module, _, name = str(spec["_target_"]).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise InputError(None, f"cannot import {spec['_target_']!r}") from None
    kwargs = {**defaults, **{k: v for k, v in spec.items() if k != "_target_"}}
    return target(first, **kwargs)


@dataclass
class TrainConfig:
    """Settings of one training run.

    Data and split:
        data_dir: dataset root holding ``manifest.csv`` (layout of :mod:`rcmseg.io.dataset`).
        train_cases, val_cases: explicit case lists (mosaic file name, stem or path relative to
            ``data_dir``, as in the manifest). When both are ``None`` the labelled cases are split
            patient-wise into ``num_folds`` groups with ``seed``; group ``fold`` validates and the
            rest trains. ``val_cases=[]`` trains without validation (the last epoch is exported).
        label_remap: source label value -> class index, for label maps in another encoding.

    Model and optimisation:
        network, network_kwargs: a name of :func:`rcmseg.networks.get_network` and its extra
            arguments (default ``"dynunet_ds"``, the bundle's: DynUNet trained with deep
            supervision, the measured winner of the real-texture comparisons,
            docs/benchmarks.md; ``"mednet"`` is the 3-level MED-Net).
        loss, tv_weight: a name of :func:`rcmseg.losses.make_loss` and γ of its TV term
            (``None``: the loss's default, 1e-6 for ``mdsc_tv`` and ``mdsc_tv_ce``, 0 for ``dice``
            and ``ce``).
        level_weights: deep-supervision weight of each output, coarse to fine (``None``: all 1).
        optimizer: ``"sgd"`` (default: momentum 0.9, the usual partner of a base learning rate
            of 0.01; the paper does not name its optimiser), ``"adam"`` or ``"adamw"``; or any
            torch optimiser as a MONAI component, ``{"_target_": "torch.optim.RMSprop", ...}``
            (or the ``functools.partial`` that MONAI's ``"_mode_": "callable"`` makes of one),
            called as ``target(parameters, lr=learning_rate, **rest)``.
        learning_rate, final_learning_rate: the rate of the first and of the last epoch; the
            rate decays exponentially in between (one step per epoch).
        lr_scheduler: ``None`` for that exponential decay, or any torch LR scheduler as a
            component like ``optimizer``, called as ``target(optimizer, **rest)`` and stepped
            once per epoch.
        max_epochs, batch_size: epochs and patches per optimiser step (per process under DDP).
        iterations_per_epoch: cap on optimiser steps per epoch, for quick runs (``None``: all of
            the epoch's patches).
        ema_decay: keep an exponential moving average of the weights, updated after every
            optimiser step with this decay (0.99: the last ~100 steps weigh most); validation,
            the best checkpoint and the exported ``model.pt`` then use the averaged weights.
            ``None`` (default) validates and exports the weights as trained.

    Patches (px at the working resolution, 2 µm/px):
        patch_size, window, window_overlap: the paper's per-epoch sampling, one ``patch_size``
            crop at a random position in every ``window`` window at ``window_overlap``.
        augmentation: ``"batched"`` (default: the paper's augmentation on whole batches on the
            training device, :class:`rcmseg.training.augment.BatchAugment`) or ``"per_patch"``
            (:func:`rcmseg.transforms.train_transforms` in the DataLoader, MONAI transforms) or
            ``"none"`` (plain crops, for ablations and debugging).
        zoom: scale spread of the augmentation, factors U(1 - zoom, 1 + zoom) (the paper's
            ±10 %; nnU-Net draws 0.7-1.4).
        augment_appearance: also randomise sharpness, tone curve (gamma) and contrast per crop
            (:data:`rcmseg.training.augment.APPEARANCE`; beyond the paper, for mosaics from other
            microscopes or settings); ``"batched"`` only.

    Distillation (:mod:`rcmseg.training.distill`):
        teacher: a bundle folder whose network teaches this run's: its probabilities are the
            targets at unlabelled pixels (and, with ``teacher_blend``, mixed into the labelled
            ones); ``None`` (default) trains on the labels alone.
        teacher_weights: the teacher's weights (default: the bundle's ``models/model.pt``).
        teacher_blend: the teacher's weight at labelled pixels, in [0, 1].

    Validation:
        val_every: validate every this many epochs (the last epoch always validates).
        val_preset: sliding-window preset of :func:`rcmseg.inference.segment_image` used to
            segment the whole validation mosaics.

    Running:
        output_dir: run folder for checkpoints, the training log and ``model.pt``.
        export_path: also write the best weights here (e.g. a bundle's ``models/model.pt``).
        seed: seeds every random choice; the same seed gives the same weights on CPU.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        amp: mixed precision: float16 autocast + gradient scaling on CUDA, bfloat16 autocast on
            CPUs with native bf16 (:func:`rcmseg.training.loop.autocast_dtype`); float32 otherwise.
        num_workers: DataLoader processes running the per-patch augmentation.
        threads: ``torch.set_num_threads`` for the run (``None``: leave torch's choice).
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        stop_after_epochs: stop after this many epochs in this call (a later ``resume`` goes on
            to ``max_epochs``), for schedulers with time limits.
        progress: show a progress bar (rank 0 only).
    """

    data_dir: Path | str
    output_dir: Path | str
    train_cases: list[str] | None = None
    val_cases: list[str] | None = None
    fold: int = 0
    num_folds: int = 5
    label_remap: dict[int, int] | None = None
    network: str = "dynunet_ds"
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "mdsc_tv"
    tv_weight: float | None = None
    level_weights: list[float] | None = None
    optimizer: str | dict[str, Any] = "sgd"
    learning_rate: float = 0.01
    final_learning_rate: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-8
    lr_scheduler: dict[str, Any] | None = None
    max_epochs: int = 200
    batch_size: int = 48
    iterations_per_epoch: int | None = None
    ema_decay: float | None = None
    patch_size: int = 256
    window: int = 512
    window_overlap: float = 0.5
    augmentation: str = "batched"
    zoom: float = 0.1
    augment_appearance: bool = False
    teacher: Path | str | None = None
    teacher_weights: Path | str | None = None
    teacher_blend: float = 0.0
    val_every: int = 1
    val_preset: str = "fast"
    export_path: Path | str | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    threads: int | None = None
    resume: bool = False
    stop_after_epochs: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        read_flags(self)
        self.output_dir = Path(self.output_dir)
        for name in ("export_path", "teacher", "teacher_weights"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if not 0 <= self.teacher_blend <= 1:
            raise InputError(None, f"teacher_blend must be in [0, 1], not {self.teacher_blend}")
        if self.teacher is None and self.teacher_weights is not None:
            raise InputError(None, "teacher_weights needs a teacher bundle")
        self.optimizer = component_dict(self.optimizer, "optimizer")
        if self.lr_scheduler is not None:
            self.lr_scheduler = component_dict(self.lr_scheduler, "lr_scheduler")
            if not isinstance(self.lr_scheduler, dict):
                raise InputError(None, "lr_scheduler must be a component with a _target_")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise InputError(None, f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        from rcmseg.inference import get_preset
        from rcmseg.losses import loss_key
        from rcmseg.networks import network_factory

        try:
            network_factory(self.network)
            loss_key(self.loss)
        except ValueError as error:
            raise InputError(None, str(error)) from None
        get_preset(self.val_preset)  # an unknown preset fails now, not after the first epoch
        for name in ("learning_rate", "final_learning_rate"):
            if not getattr(self, name) > 0:
                raise InputError(None, f"{name} must be above 0, not {getattr(self, name)}")
        if self.level_weights is not None and (
            not self.level_weights or any(not w >= 0 for w in self.level_weights)
        ):
            raise InputError(
                None, f"level_weights must be non-negative numbers, not {self.level_weights}"
            )
        if self.augmentation not in AUGMENTATIONS:
            raise InputError(
                None, f"augmentation must be one of {AUGMENTATIONS}, not {self.augmentation!r}"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InputError(None, f"ema_decay must be in (0, 1), not {self.ema_decay}")
        if not 0 <= self.zoom < 1:
            raise InputError(None, f"zoom must be in [0, 1), not {self.zoom}")
        if self.augment_appearance and self.augmentation != "batched":
            raise InputError(None, "augment_appearance needs augmentation 'batched'")
        for name in ("max_epochs", "batch_size", "num_folds", "val_every", "patch_size", "window"):
            if int(getattr(self, name)) < 1:
                raise InputError(None, f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.fold < self.num_folds:
            raise InputError(None, f"fold must be in 0..{self.num_folds - 1}, not {self.fold}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (paths as strings), fit for JSON and for weights-only checkpoints."""
        values = dataclasses.asdict(self)
        return {key: str(v) if isinstance(v, Path) else v for key, v in values.items()}


@dataclass
class TrainResult:
    """What :func:`rcmseg.training.train` produced.

    ``history`` holds one dict per finished epoch (the rows of ``train_log.csv``);
    ``best_val_dice`` is the mean Dice over classes on the validation mosaics' labelled pixels
    (``nan`` when the run had no validation).
    """

    output_dir: Path
    model_path: Path
    best_checkpoint: Path
    last_checkpoint: Path
    log_path: Path
    best_epoch: int
    best_val_dice: float
    epochs_completed: int
    history: list[dict[str, float]]
