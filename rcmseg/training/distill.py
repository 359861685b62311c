"""Distillation: a trained network (the teacher, a bundle) gives its class probabilities as
training targets for another network (the student), usually a smaller, faster one.

Where the expert labelled a pixel, the target is the label (or, with ``blend`` > 0, the label
mixed with the teacher's probabilities); where the expert left it unlabelled, the target is the
teacher's probabilities, so the student also learns from the pixels no one labelled. The teacher
runs once per batch, after augmentation, through the shared inference engine (eval mode, folded
norms, the engine's precision), without gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rcmseg.bundle import load_bundle
from rcmseg.classes import WORKING_MPP
from rcmseg.errors import InputError
from rcmseg.inference import SegmentationEngine
from rcmseg.losses import labelled_one_hot

Augment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def distillation_targets(labels: torch.Tensor, teacher: torch.Tensor, blend: float) -> torch.Tensor:
    """Soft targets from expert labels and a teacher's probabilities.

    Args:
        labels: (B, 1, H, W) integer, 0..K-1 or UNLABELLED.
        teacher: (B, K, H, W) the teacher's class probabilities.
        blend: weight of the teacher at labelled pixels (0: the label alone; 1: the teacher).

    Returns:
        (B, K, H, W) float: ``(1 - blend) * one_hot + blend * teacher`` at labelled pixels, the
        teacher's probabilities at unlabelled ones.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], not {blend}")
    one_hot, mask = labelled_one_hot(labels, teacher.shape[1])
    labelled = (1.0 - blend) * one_hot + blend * teacher
    return torch.where(mask.bool(), labelled, teacher)


@dataclass
class Teacher:
    """Turns a training batch's labels into distillation targets (an :data:`Augment` step).

    ``engine`` segments windows (B, 1, H, W) in [0, 1]; ``blend`` as in
    :func:`distillation_targets`.
    """

    engine: SegmentationEngine
    blend: float = 0.0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = self.engine.window_probabilities(images)
        return images, distillation_targets(labels, probabilities, self.blend)

    def after(self, augment: Augment | None) -> Augment:
        """``augment`` (or nothing), then the teacher's targets."""
        if augment is None:
            return self

        def augment_then_teach(
            images: torch.Tensor, labels: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self(*augment(images, labels))

        return augment_then_teach


def load_teacher(
    bundle_dir: str | Path,
    device: torch.device,
    weights: str | Path | None = None,
    blend: float = 0.0,
    precision: str = "auto",
) -> Teacher:
    """The teacher held by a bundle folder (its ``network_def`` with ``weights``, default the
    bundle's ``models/model.pt``), run by the engine on ``device`` at ``precision``.

    Raises:
        InputError: the bundle or its weights cannot be loaded (see
            :func:`rcmseg.bundle.load_bundle`), or its network sees mosaics at another
            resolution than training crops are cut at (``WORKING_MPP``).
    """
    bundle = load_bundle(bundle_dir, device, ckpt_path=weights)
    if not math.isclose(bundle.working_mpp, WORKING_MPP):
        raise InputError(
            bundle.root,
            f"teacher works at {bundle.working_mpp} µm/px; training crops are at {WORKING_MPP}",
        )
    return Teacher(bundle.engine(precision=precision), blend)
