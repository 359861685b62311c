"""The training loop: per-epoch patch sampling and augmentation, optimiser steps (mixed precision
on CUDA), validation on whole mosaics, checkpoints, resume, the log.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from torch import nn
from torch.optim.lr_scheduler import ExponentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rcmseg.classes import INTENSITY_MAX, NUM_CLASSES
from rcmseg.errors import InputError, noted_on_interrupt
from rcmseg.inference import (
    SegmentationEngine,
    cpu_has_native_bf16,
    cpu_threads,
    resolve_device,
)
from rcmseg.losses import make_loss
from rcmseg.metrics import confusion_matrix, one_vs_rest
from rcmseg.networks import get_network, side_multiple
from rcmseg.training.augment import APPEARANCE, BatchAugment
from rcmseg.training.checkpoint import (
    export_weights,
    inference_weights,
    load_checkpoint,
    rng_states,
    save_atomic,
    set_rng_states,
)
from rcmseg.training.config import TrainConfig, TrainResult, build_component
from rcmseg.training.data import LoadedCase, epoch_order, load_cases, patch_loader, split_cases
from rcmseg.training.distill import Teacher, load_teacher
from rcmseg.training.distributed import (
    rank_and_world,
    sum_across_ranks,
    sync_buffers,
    unwrap,
    wrap_ddp,
)
from rcmseg.training.monitor import make_progress, status_line, write_log
from rcmseg.transforms import EpochPatchDataset, train_transforms

logger = logging.getLogger(__name__)

LossFunction = Callable[[Any, torch.Tensor], torch.Tensor]
Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunState:
    """Where a run stands after ``epochs_done`` epochs (what a checkpoint restores)."""

    epochs_done: int = 0
    best_val_dice: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class RunPaths:
    """The files of a run folder."""

    output_dir: Path

    @property
    def last(self) -> Path:
        return self.output_dir / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.output_dir / "checkpoints" / "best.pt"

    @property
    def model(self) -> Path:
        return self.output_dir / "model.pt"

    @property
    def log(self) -> Path:
        return self.output_dir / "train_log.csv"

    def kept_note(self) -> str:
        """What an interrupted run keeps: its last finished epoch, if one had finished."""
        if not self.last.is_file():
            return "no epoch had finished; nothing to resume"
        return f"the last finished epoch is kept in {self.last}"


def make_optimizer(
    config: TrainConfig, parameters: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The configured optimiser with the base learning rate and weight decay."""
    if isinstance(config.optimizer, dict):
        return build_component(config.optimizer, parameters, lr=config.learning_rate)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    optimizer_class = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer_class(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def lr_decay_per_epoch(config: TrainConfig) -> float:
    """Factor that takes ``learning_rate`` at the first epoch to ``final_learning_rate`` at the
    last one."""
    if config.max_epochs == 1:
        return 1.0
    ratio = config.final_learning_rate / config.learning_rate
    return ratio ** (1.0 / (config.max_epochs - 1))


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The configured LR scheduler, stepped once per epoch (default: exponential decay)."""
    if config.lr_scheduler is not None:
        return build_component(config.lr_scheduler, optimizer)
    return ExponentialLR(optimizer, gamma=lr_decay_per_epoch(config))


def _validates_after(epoch: int, config: TrainConfig) -> bool:
    """Validation runs every ``val_every`` epochs and after the last epoch (0-based ``epoch``)."""
    return (epoch + 1) % config.val_every == 0 or epoch + 1 == config.max_epochs


def _batch_augment(
    config: TrainConfig, device: torch.device, seed: int, teacher: Teacher | None = None
) -> Augment | None:
    """What turns a loader batch into network input and targets on ``device``: the batched
    augmentation with its own seeded generator, only the intensity scaling without augmentation,
    or nothing when the DataLoader's per-patch transforms did both; then the ``teacher``'s
    targets, when distilling."""
    augment: Augment | None
    if config.augmentation == "per_patch":
        augment = None
    elif config.augmentation == "none":
        augment = _scale_intensity
    else:
        appearance = APPEARANCE if config.augment_appearance else {}
        generator = torch.Generator(device=device).manual_seed(seed)
        augment = functools.partial(
            BatchAugment(zoom=config.zoom, **appearance), generator=generator
        )
    return augment if teacher is None else teacher.after(augment)


def _scale_intensity(
    images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-255 intensities to the network's [0, 1] input, labels unchanged."""
    return images / INTENSITY_MAX, labels


def _seed_of(*numbers: int) -> int:
    """A seed that depends only on ``numbers`` (here: run seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def _loss_terms(loss_function: LossFunction) -> tuple[float, float]:
    """The Dice and TV terms of the last loss call, where the loss exposes them."""
    dice = getattr(loss_function, "last_dice", None)
    tv = getattr(loss_function, "last_tv", None)
    return (
        math.nan if dice is None else float(dice),
        math.nan if tv is None else float(tv),
    )


def _as_float(outputs: Any) -> Any:
    """Loss in float32 even under autocast (Dice sums of squares overflow float16)."""
    if isinstance(outputs, (list, tuple)):
        return [output.float() for output in outputs]
    return outputs.float()


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed-precision dtype of training steps, or ``None`` for float32: float16 on CUDA
    (with gradient scaling), bfloat16 on CPUs that compute it natively (float32's range, so no
    scaling; 2-3× faster steps on the development CPU, docs/benchmarks.md)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def describe_compute(device: torch.device, amp: bool) -> str:
    """Where and in which precision training steps run, e.g. ``cpu, fp32, 2 CPU threads``."""
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
        autocast_dtype(device, amp), "fp32"
    )
    where = f", {cpu_threads(torch.get_num_threads())}" if device.type == "cpu" else ""
    return f"{device}, {precision}{where}"


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler, active only where training autocasts to float16 (bf16 needs none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, amp) == torch.float16)


def train_step(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_function: LossFunction,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimiser step on a batch (images (B, C, H, W) in [0, 1], labels (B, 1, H, W)) under
    autocast to ``dtype`` (``None``: float32, see :func:`autocast_dtype`); returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = network(images)
    loss = loss_function(_as_float(outputs), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def train_epoch(
    network: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    loss_function: LossFunction,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp: bool,
    on_step: Callable[[float, float], None] | None = None,
    augment: Augment | None = None,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the patch-weighted means of the loss and its terms over
    all processes, and the number of patches they saw.

    ``augment`` maps each batch, once on ``device``, to network input (batched augmentation and
    scaling to [0, 1]); without it the loader's batches must be network input already. ``ema``
    (the moving average of the weights) is updated after every optimiser step.
    """
    network.train()
    totals = {"loss": 0.0, "dice_term": 0.0, "tv_term": 0.0}
    patches = 0
    dtype = autocast_dtype(device, amp)
    for batch in loader:
        images = convert_to_tensor(batch["image"], track_meta=False)
        labels = convert_to_tensor(batch["label"], track_meta=False)
        images = images.to(device, dtype=torch.float32, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()
        if augment is not None:
            images, labels = augment(images, labels)
        loss = train_step(network, images, labels, loss_function, optimizer, scaler, dtype)
        if ema is not None:
            ema.update_parameters(unwrap(network))
        count = images.shape[0]
        dice, tv = _loss_terms(loss_function)
        for key, value in (("loss", loss.item()), ("dice_term", dice), ("tv_term", tv)):
            totals[key] += value * count
        patches += count
        if on_step is not None:
            on_step(totals["loss"] / patches, tv / dice if dice else math.nan)
    # Under DDP each process saw its own share: log the means over all of them.
    sums = torch.tensor([*totals.values(), patches], dtype=torch.float64, device=device)
    *global_totals, global_patches = sum_across_ranks(sums).tolist()
    count = max(global_patches, 1)
    means = {key: value / count for key, value in zip(totals, global_totals, strict=True)}
    means["tv_dice_ratio"] = (
        means["tv_term"] / means["dice_term"] if means["dice_term"] else math.nan
    )
    means["patches"] = global_patches
    return means


@torch.no_grad()
def validate(
    network: nn.Module, cases: Sequence[LoadedCase], device: torch.device, preset: str
) -> float:
    """Mean Dice over classes on the labelled pixels of whole validation mosaics.

    Each mosaic is segmented by the shared :class:`~rcmseg.inference.SegmentationEngine` (built
    once per validation from the network's current weights); the confusion matrix is summed over
    mosaics (and over processes under DDP, each segmenting its share) before the one-vs-rest
    Dice.
    """
    engine = SegmentationEngine(unwrap(network), preset, device)
    matrix = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for case in cases:
        prediction = engine.labels(case.image)
        matrix += torch.as_tensor(confusion_matrix(prediction, case.labels, NUM_CLASSES))
    matrix = sum_across_ranks(matrix.to(device)).cpu()
    return float(one_vs_rest(matrix.numpy())["mean_dice"])


@dataclass
class Run:
    """The live objects of a run and what a checkpoint saves and restores of them."""

    config: TrainConfig
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: ExponentialLR
    scaler: torch.amp.GradScaler
    state: RunState
    paths: RunPaths
    ema: AveragedModel | None = None

    @property
    def evaluated(self) -> nn.Module:
        """The network that validates and is exported: the weights' moving average if kept."""
        return unwrap(self.network) if self.ema is None else self.ema.module

    def checkpoint(self) -> dict[str, Any]:
        averaged = {}
        if self.ema is not None:
            averaged = {
                "ema_network": self.ema.module.state_dict(),
                "ema_steps": int(self.ema.n_averaged.item()),
            }
        return {
            "epochs_done": self.state.epochs_done,
            "best_val_dice": self.state.best_val_dice,
            "best_epoch": self.state.best_epoch,
            "history": self.state.history,
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(),
            "config": self.config.to_dict(),
            **averaged,
        }

    def restore(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        unwrap(self.network).load_state_dict(checkpoint["network"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_states(checkpoint["rng"])
        if self.ema is not None and "ema_network" in checkpoint:
            self.ema.module.load_state_dict(checkpoint["ema_network"])
            self.ema.n_averaged.fill_(checkpoint["ema_steps"])
        self.state = RunState(
            epochs_done=checkpoint["epochs_done"],
            best_val_dice=checkpoint["best_val_dice"],
            best_epoch=checkpoint["best_epoch"],
            history=list(checkpoint["history"]),
        )

    def save(self, improved: bool) -> None:
        """Write the last (and, when improved, the best) checkpoint, ``model.pt`` and the log."""
        checkpoint = self.checkpoint()
        save_atomic(checkpoint, self.paths.last)
        if improved:
            save_atomic(checkpoint, self.paths.best)
            weights = self.evaluated.state_dict()
            export_weights(weights, self.paths.model)
            if self.config.export_path is not None:
                export_weights(weights, Path(self.config.export_path))
        write_log(self.state.history, self.paths.log)

    def ensure_exported(self) -> None:
        """Re-export ``model.pt`` from the best checkpoint when it is missing (a run resumed
        after it had finished, whose exported weights were lost)."""
        targets = [self.paths.model]
        if self.config.export_path is not None:
            targets.append(Path(self.config.export_path))
        missing = [path for path in targets if not path.is_file()]
        if missing and self.paths.best.is_file():
            weights = inference_weights(load_checkpoint(self.paths.best))
            for path in missing:
                export_weights(weights, path)

    def result(self) -> TrainResult:
        validated = self.state.best_epoch > 0 and math.isfinite(self.state.best_val_dice)
        return TrainResult(
            output_dir=self.paths.output_dir,
            model_path=self.paths.model,
            best_checkpoint=self.paths.best,
            last_checkpoint=self.paths.last,
            log_path=self.paths.log,
            best_epoch=self.state.best_epoch,
            best_val_dice=self.state.best_val_dice if validated else math.nan,
            epochs_completed=self.state.epochs_done,
            history=self.state.history,
        )


def check_patch_size(network: nn.Module, name: str, patch_size: int) -> None:
    """Refuse training crops of ``patch_size`` px that ``network`` (called ``name``) cannot take."""
    multiple = side_multiple(network)
    if patch_size % multiple:
        raise InputError(
            None,
            f"patch size {patch_size} px: network {name} needs crops of a multiple of "
            f"{multiple} px",
        )


def moving_average(network: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``network``'s weights (and buffers), or ``None``."""
    if decay is None:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _start_run(
    config: TrainConfig,
    network: nn.Module | None,
    device: torch.device,
    amp: bool,
) -> Run:
    """Build (or take) the network, optimiser, LR schedule and scaler; resume if asked."""
    torch.manual_seed(config.seed)
    if network is None:
        network = get_network(config.network, **config.network_kwargs)
    check_patch_size(network, config.network, config.patch_size)
    # Plain NCHW for training: load_bundle hands out channels-last networks (faster CPU inference),
    # and their backward pass segfaults on the CPU build of torch 2.14.1 (MONAI Label's env).
    network = network.to(device, memory_format=torch.contiguous_format)
    optimizer = make_optimizer(config, network.parameters())
    run = Run(
        config=config,
        network=network,
        optimizer=optimizer,
        scheduler=make_scheduler(config, optimizer),
        scaler=grad_scaler(device, amp),
        state=RunState(),
        paths=RunPaths(Path(config.output_dir)),
        ema=moving_average(network, config.ema_decay),
    )
    if config.resume and run.paths.last.is_file():
        run.restore(run.paths.last)
        logger.info("resuming %s after epoch %d", run.paths.last, run.state.epochs_done)
    run.network = wrap_ddp(run.network, device)
    return run


def train(
    config: TrainConfig,
    network: nn.Module | None = None,
    loss_function: LossFunction | None = None,
) -> TrainResult:
    """Train a segmentation network on the labelled mosaics of ``config.data_dir``.

    Args:
        config: the run's settings (paper protocol by default).
        network: a network to train instead of ``get_network(config.network)`` (the bundle's
            ``network_def``); may already be wrapped in DDP.
        loss_function: a loss instead of ``make_loss(config.loss, gamma=config.tv_weight,
            level_weights=config.level_weights)``.

    Returns:
        A :class:`TrainResult`; the best weights (highest validation Dice) are in
        ``output_dir/model.pt`` (and ``config.export_path``), loadable with
        ``torch.load(..., weights_only=True)``.

    Raises:
        InputError: the data set is missing or empty, the split leaves nothing to train on,
            the patch size is not a multiple of what the network needs, or the teacher bundle
            cannot be loaded.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    amp = config.amp
    rank, world_size = rank_and_world()
    teacher = None
    if config.teacher is not None:  # before the data: a bad teacher fails at once
        teacher = load_teacher(config.teacher, device, config.teacher_weights, config.teacher_blend)
        logger.info("distilling from %s (%s)", config.teacher, teacher.engine.describe())
    root = Path(config.data_dir)
    train_cases, val_cases = split_cases(
        root,
        config.train_cases,
        config.val_cases,
        config.fold,
        config.num_folds,
        config.seed,
        config.label_remap,
    )
    per_patch = config.augmentation == "per_patch"
    patches = EpochPatchDataset(
        [(case.image, case.labels) for case in load_cases(train_cases, root, config.label_remap)],
        transform=train_transforms(zoom=config.zoom) if per_patch else None,
        window=config.window,
        overlap=config.window_overlap,
        crop=config.patch_size,
        seed=config.seed,
    )
    val_data = load_cases(val_cases[rank::world_size], root, config.label_remap)
    if loss_function is None:
        loss_function = make_loss(
            config.loss, gamma=config.tv_weight, level_weights=config.level_weights
        )
    run = _start_run(config, network, device, amp)
    logger.info(
        "training %s (%.2f M parameters) on %d training and %d validation mosaics; %s",
        config.network,
        sum(p.numel() for p in run.network.parameters()) / 1e6,
        len(train_cases),
        len(val_cases),
        describe_compute(device, amp),
    )
    max_patches = (
        None
        if config.iterations_per_epoch is None
        else config.iterations_per_epoch * config.batch_size
    )
    stop_at = config.max_epochs
    if config.stop_after_epochs is not None:
        stop_at = min(stop_at, run.state.epochs_done + config.stop_after_epochs)

    with (
        make_progress(config.progress and rank == 0) as progress,
        noted_on_interrupt(run.paths.kept_note),
    ):
        task = progress.add_task("training", total=None, status="")
        for epoch in range(run.state.epochs_done, stop_at):
            started = time.perf_counter()
            patches.set_epoch(epoch)
            epoch_seed = _seed_of(config.seed, epoch, rank)
            loader = patch_loader(
                patches,
                epoch_order(len(patches), (config.seed, epoch), rank, world_size, max_patches),
                config.batch_size,
                augment_seed=epoch_seed,
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
            )
            progress.reset(
                task, total=len(loader), description=f"epoch {epoch + 1}/{config.max_epochs}"
            )
            last_dice = run.state.history[-1]["val_dice"] if run.state.history else math.nan

            def on_step(loss: float, ratio: float, _dice: float = last_dice) -> None:
                progress.update(task, advance=1, status=status_line(loss, ratio, _dice))

            learning_rate = run.optimizer.param_groups[0]["lr"]
            means = train_epoch(
                run.network,
                loader,
                loss_function,
                run.optimizer,
                run.scaler,
                device,
                amp,
                on_step,
                _batch_augment(config, device, epoch_seed, teacher),
                run.ema,
            )
            seconds = time.perf_counter() - started
            run.scheduler.step()
            sync_buffers(run.network)

            val_dice = math.nan
            if val_cases and _validates_after(epoch, config):
                val_dice = validate(run.evaluated, val_data, device, config.val_preset)
            run.state.history.append(
                {
                    "epoch": epoch + 1,
                    **means,
                    "val_dice": val_dice,
                    "learning_rate": learning_rate,
                    "seconds": round(seconds, 3),
                    "samples_per_s": round(means["patches"] / seconds, 2),
                }
            )
            run.state.epochs_done = epoch + 1
            # Without validation cases every epoch is "best": the export is the last epoch.
            improved = not val_cases or val_dice > run.state.best_val_dice
            if improved:
                run.state.best_val_dice = val_dice if val_cases else math.nan
                run.state.best_epoch = epoch + 1
            status = status_line(means["loss"], means["tv_dice_ratio"], val_dice)
            progress.update(task, status=status)
            if rank == 0:
                run.save(improved)
            logger.info("epoch %d: %s", epoch + 1, status)
    if rank == 0:
        run.ensure_exported()
    return run.result()
