"""Losses on partially labelled maps: MDSC + γ·TV (the paper's), plain soft Dice, cross-entropy,
and MDSC + γ·TV plus cross-entropy (nnU-Net's Dice + CE compound on the paper's loss).

Every loss takes logits and an integer label map (B, 1, H, W) whose value ``UNLABELLED`` (255)
marks pixels the expert did not label, or soft targets (B, K, H, W) float (class probabilities per
pixel, e.g. a teacher network's for distillation, :mod:`rcmseg.training.distill`). Unlabelled
pixels contribute nothing to the Dice or cross-entropy terms (their gradient from those terms is
exactly zero); the TV term, a smoothness prior on the prediction, runs over all pixels.

Choices where the paper is silent:

- Dice sums run over the whole batch by default (``batch=True``, MONAI's name for it): that is
  what a Keras loss written with whole-tensor sums does (the original code was never released;
  the paper's remark that TV "grows with batch size" fits it), and batch sums are stabler for rare
  classes (nested is 5 % of labelled pixels), often missing from a single 256 px patch.
  ``batch=False`` computes MDSC per image and averages it over the batch.
- A Dice term whose ground-truth set is empty is skipped: the TP term of class k when no labelled
  pixel is k, the TN term when every labelled pixel is k. Such a term is the constant 1 with zero
  gradient (its numerator is identically 0), so skipping it changes the value, not the training:
  a perfect prediction scores ~0, and a patch without labelled pixels scores 0.
- TV is summed over all pixels, classes and images of the batch, as written; the logged ratio
  ``last_tv / last_dice`` shows whether γ keeps it at the paper's 0.01-0.1.
- Deep supervision: L = Σ_m L_m (equal weights, the paper's) with the labels brought to each
  output's size by :func:`downsample_label_tensor`, the same vote as
  :func:`rcmseg.io.labels.downsample_labels`. ``make_loss(level_weights=(w_0, ..., w_{M-1}))``
  gives L = Σ_m w_m L_m instead, weights in the outputs' order (coarse to fine for MED-Net);
  a list of another length is refused.

After each call a loss made by :func:`make_loss` exposes ``last_dice`` (the data term: MDSC,
Dice or cross-entropy, summed over levels) and ``last_tv`` (γ·TV summed over levels), as detached
0-dim tensors (``float()`` them to log).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss
from torch import Tensor
from torch.nn.modules.loss import _Loss

from rcmseg.classes import NUM_CLASSES, UNLABELLED

LOSS_NAMES: tuple[str, ...] = ("mdsc_tv", "dice", "ce", "mdsc_tv_ce")
DEFAULT_GAMMA: float = 1e-6  # the paper's TV weight
DEFAULT_EPSILON: float = 1e-5  # ε in the Dice denominators


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    """``labels`` as int64, or ValueError if a value is neither a class index nor UNLABELLED."""
    labels = labels.long()
    invalid = (labels < 0) | ((labels >= num_classes) & (labels != UNLABELLED))
    if bool(invalid.any()):
        raise ValueError(f"labels must be 0..{num_classes - 1} or {UNLABELLED}")
    return labels


def labelled_one_hot(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """One-hot ground truth and labelled mask of a label map, or soft targets passed through.

    Args:
        labels: (B, 1, H, W) integer, 0..K-1 or UNLABELLED; or soft targets (B, K, H, W) float,
            class probabilities per pixel (a teacher's, :mod:`rcmseg.training.distill`), all
            zeros where a pixel has no target.
        num_classes: K.

    Returns:
        one_hot (B, K, H, W) float, all zeros at unlabelled pixels (soft targets as given); mask
        (B, 1, H, W) float, 1 at labelled pixels (soft targets: where they sum above 0).
    """
    if labels.is_floating_point():
        if labels.shape[1] != num_classes:
            raise ValueError(f"soft targets need {num_classes} channels, not {labels.shape[1]}")
        return labels, (labels.sum(dim=1, keepdim=True) > 0).float()
    labels = _check_labels(labels, num_classes)
    labelled = labels != UNLABELLED
    one_hot = F.one_hot(torch.where(labelled, labels, 0)[:, 0], num_classes)
    mask = labelled.float()
    return one_hot.permute(0, 3, 1, 2).float() * mask, mask


def downsample_label_tensor(
    labels: Tensor, size: tuple[int, int], num_classes: int = NUM_CLASSES
) -> Tensor:
    """Bring a label map to a coarser output's ``size`` by an honest vote.

    Each coarse pixel covers a (f x f) block, f = H / h (an integer). It is UNLABELLED where
    unlabelled fine pixels outnumber labelled ones, otherwise the most frequent class among the
    labelled fine pixels (ties: lower class index). The counts come from average pooling a
    one-hot map with an extra channel for UNLABELLED. Soft targets (float (B, K, H, W)) are
    averaged over each block instead.

    Args:
        labels: (B, 1, H, W) integer, 0..K-1 or UNLABELLED; or soft targets (B, K, H, W) float.
        size: (h, w) with H / h == W / w an integer.
        num_classes: K.

    Returns:
        (B, 1, h, w) int64, or (B, K, h, w) float for soft targets.
    """
    height, width = labels.shape[-2:]
    factor = height // size[0]
    if factor * size[0] != height or factor * size[1] != width:
        raise ValueError(f"cannot downsample labels of size {(height, width)} to {size}")
    if labels.is_floating_point():
        return F.avg_pool2d(labels, factor) if factor > 1 else labels
    labels = _check_labels(labels, num_classes)
    if factor == 1:
        return labels
    channels = torch.where(labels == UNLABELLED, num_classes, labels)[:, 0]
    one_hot = F.one_hot(channels, num_classes + 1).permute(0, 3, 1, 2).float()
    fractions = F.avg_pool2d(one_hot, factor)
    votes = fractions[:, :num_classes].argmax(dim=1, keepdim=True)  # first maximum on ties
    return torch.where(fractions[:, num_classes:] > 0.5, UNLABELLED, votes)


def total_variation(probabilities: Tensor) -> Tensor:
    """Anisotropic total variation Σ |P[i+1,j] - P[i,j]| + |P[i,j+1] - P[i,j]| over all pixels,
    classes and images of a (B, K, H, W) map (a 0-dim tensor)."""
    vertical = (probabilities[..., 1:, :] - probabilities[..., :-1, :]).abs().sum()
    horizontal = (probabilities[..., :, 1:] - probabilities[..., :, :-1]).abs().sum()
    return vertical + horizontal


def soft_dice_terms(
    probabilities: Tensor,
    one_hot: Tensor,
    mask: Tensor,
    true_negatives: bool = True,
    batch: bool = True,
    epsilon: float = DEFAULT_EPSILON,
) -> Tensor:
    """The Dice part of the loss on labelled pixels: Σ_k TP terms (+ Σ_k TN terms for MDSC).

    TP term of class k: 1 - 2 Σ P G / (Σ P² + Σ G² + ε); TN term: the same with 1-P and 1-G.
    Sums run over labelled pixels (of the batch, or of each image with ``batch=False``, then
    averaged over images); terms with an empty ground-truth set are skipped (see module doc).

    Args:
        probabilities: P (B, K, H, W), softmax output.
        one_hot: G (B, K, H, W), zero at unlabelled pixels.
        mask: (B, 1, H, W), 1 at labelled pixels.

    Returns:
        0-dim tensor.
    """
    dims = (0, 2, 3) if batch else (2, 3)
    predicted = probabilities * mask  # zero (and zero gradient) at unlabelled pixels
    loss = _dice_sum(predicted, one_hot, dims, epsilon)
    if true_negatives:
        loss = loss + _dice_sum((1.0 - probabilities) * mask, (1.0 - one_hot) * mask, dims, epsilon)
    return loss if batch else loss.mean()


def _dice_sum(predicted: Tensor, truth: Tensor, dims: tuple[int, ...], epsilon: float) -> Tensor:
    """Σ_k (1 - 2 Σ PG / (Σ P² + Σ G² + ε)) over classes whose truth set is not empty."""
    intersection = (predicted * truth).sum(dims)
    truth_size = (truth * truth).sum(dims)
    terms = 1.0 - 2.0 * intersection / ((predicted * predicted).sum(dims) + truth_size + epsilon)
    return torch.where(truth_size > 0, terms, torch.zeros_like(terms)).sum(-1)


class LabelledDiceLoss(_Loss):
    """MDSC (``true_negatives=True``) or plain soft Dice, plus γ·TV, on one output.

    Args:
        num_classes: K.
        true_negatives: add the TN Dice terms (MDSC) or not (plain soft Dice).
        gamma: weight γ of the total variation of the softmax map.
        batch: Dice sums over the whole batch (True) or per image, then averaged (False).
        epsilon: ε in the denominators.

    ``forward(logits (B, K, H, W), labels (B, 1, H, W))`` -> 0-dim tensor; sets ``last_dice`` and
    ``last_tv`` (γ·TV), detached.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        true_negatives: bool = True,
        gamma: float = DEFAULT_GAMMA,
        batch: bool = True,
        epsilon: float = DEFAULT_EPSILON,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.true_negatives = true_negatives
        self.gamma = gamma
        self.batch = batch
        self.epsilon = epsilon
        self.last_dice = torch.tensor(0.0)
        self.last_tv = torch.tensor(0.0)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        probabilities = torch.softmax(logits.float(), dim=1)
        one_hot, mask = labelled_one_hot(labels, self.num_classes)
        dice = soft_dice_terms(
            probabilities, one_hot, mask, self.true_negatives, self.batch, self.epsilon
        )
        tv = self.gamma * total_variation(probabilities) if self.gamma else dice.new_zeros(())
        self.last_dice, self.last_tv = dice.detach(), tv.detach()
        return dice + tv


class LabelledCrossEntropyLoss(_Loss):
    """Cross-entropy averaged over labelled pixels (UNLABELLED ignored), plus γ·TV.

    A batch without labelled pixels gives 0. ``last_dice`` holds the cross-entropy term.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, gamma: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.gamma = gamma
        self.last_dice = torch.tensor(0.0)
        self.last_tv = torch.tensor(0.0)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = logits.float()
        if labels.is_floating_point():  # soft targets (B, K, H, W): mean over pixels with one
            targets, mask = labelled_one_hot(labels, self.num_classes)
            per_pixel = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1, keepdim=True)
            ce = (per_pixel * mask).sum() / mask.sum().clamp(min=1)
        else:
            target = labels.long()[:, 0]
            total = F.cross_entropy(logits, target, ignore_index=UNLABELLED, reduction="sum")
            ce = total / (target != UNLABELLED).sum().clamp(min=1)
        if self.gamma:
            tv = self.gamma * total_variation(torch.softmax(logits, dim=1))
        else:
            tv = ce.new_zeros(())
        self.last_dice, self.last_tv = ce.detach(), tv.detach()
        return ce + tv


class LabelledCompoundLoss(_Loss):
    """MDSC + γ·TV plus ``ce_weight`` × cross-entropy on labelled pixels, on one output.

    nnU-Net trains with soft Dice + cross-entropy at 1:1, its Dice a mean over classes; MDSC is a
    sum of 2K per-class terms (TP and TN), so the default ``ce_weight`` = K keeps about that
    balance. ``last_dice`` holds MDSC + weighted CE, ``last_tv`` γ·TV (detached).
    """

    def __init__(
        self,
        dice: LabelledDiceLoss,
        cross_entropy: LabelledCrossEntropyLoss,
        ce_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.dice = dice
        self.cross_entropy = cross_entropy
        self.ce_weight = float(dice.num_classes if ce_weight is None else ce_weight)
        self.last_dice = torch.tensor(0.0)
        self.last_tv = torch.tensor(0.0)

    @property
    def num_classes(self) -> int:
        return self.dice.num_classes

    @property
    def gamma(self) -> float:
        """γ of the TV term, which the Dice part carries."""
        return self.dice.gamma

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        value = self.dice(logits, labels) + self.ce_weight * self.cross_entropy(logits, labels)
        self.last_dice = self.dice.last_dice + self.ce_weight * self.cross_entropy.last_dice
        self.last_tv = self.dice.last_tv
        return value


class LabelledDeepSupervisionLoss(DeepSupervisionLoss):
    """MONAI's :class:`DeepSupervisionLoss` with equal weights (L = Σ_m L_m) or the given
    ``level_weights`` (L = Σ_m w_m L_m), whose targets are brought to each output's size by
    :func:`downsample_label_tensor` (not nearest neighbour).

    ``forward(outputs, labels)``: outputs a (B, K, H, W) tensor or a list of them at any
    power-of-two fractions of (H, W), in any order (``level_weights`` follow that order and must
    have one weight per output; a single tensor is never weighted); labels (B, 1, H, W). Sums the
    wrapped loss's ``last_dice`` and ``last_tv`` over the outputs into its own, unweighted (so
    logs stay comparable across weightings); ``last_level_dice`` holds the data term of each
    output, in order (detached 0-dim tensors).
    """

    def __init__(
        self,
        loss: LabelledDiceLoss | LabelledCrossEntropyLoss | LabelledCompoundLoss,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        weights = None if level_weights is None else [float(w) for w in level_weights]
        if weights is not None and (not weights or any(w < 0 for w in weights)):
            raise ValueError(f"level_weights must be non-negative numbers, got {level_weights}")
        super().__init__(loss, weight_mode="same", weights=weights)
        self.level_weights = weights
        self.last_dice = torch.tensor(0.0)
        self.last_tv = torch.tensor(0.0)
        self.last_level_dice: list[Tensor] = []

    def get_loss(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 - MONAI's name
        if input.shape[2:] != target.shape[2:]:
            size = (input.shape[2], input.shape[3])
            target = downsample_label_tensor(target, size, self.loss.num_classes)
        value = self.loss(input, target)
        self.last_dice = self.last_dice + self.loss.last_dice
        self.last_tv = self.last_tv + self.loss.last_tv
        self.last_level_dice.append(self.loss.last_dice)
        return value

    def forward(self, input: Tensor | list[Tensor], target: Tensor) -> Tensor:  # noqa: A002
        self.last_dice = torch.zeros((), device=target.device)
        self.last_tv = torch.zeros((), device=target.device)
        self.last_level_dice = []
        outputs = list(input) if isinstance(input, list | tuple) else [input]
        if len(outputs) == 1:  # one output: never weighted
            return self.get_loss(outputs[0].float(), target)
        if self.level_weights is not None and len(self.level_weights) != len(outputs):
            raise ValueError(f"{len(self.level_weights)} level weights for {len(outputs)} outputs")
        return super().forward(outputs, target)


def loss_key(name: str) -> str:
    """``name`` as a key of :data:`LOSS_NAMES` (any case), or ValueError naming the choices."""
    key = name.lower()
    if key not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    return key


def make_loss(
    name: str = "mdsc_tv",
    gamma: float | None = None,
    num_classes: int = NUM_CLASSES,
    batch: bool = True,
    epsilon: float = DEFAULT_EPSILON,
    level_weights: Sequence[float] | None = None,
) -> LabelledDeepSupervisionLoss:
    """The training loss called ``name``, ready for a tensor or a coarse-to-fine list of logits.

    Args:
        name: ``mdsc_tv`` (the paper's MDSC + γ·TV), ``dice`` (plain soft Dice on labelled
            pixels), ``ce`` (cross-entropy ignoring UNLABELLED), the paper's ablation losses, or
            ``mdsc_tv_ce`` (MDSC + γ·TV + K × cross-entropy: nnU-Net's Dice + CE compound).
        gamma: TV weight γ; ``None`` means 1e-6 for ``mdsc_tv`` and ``mdsc_tv_ce`` and 0 for the
            ablation losses (which have no TV term in the paper); a number adds γ·TV to any of
            them.
        num_classes: K.
        batch: Dice sums over the batch (True) or per image (False); unused by ``ce``.
        epsilon: ε of the Dice denominators; unused by ``ce``.
        level_weights: deep-supervision weight of each output, in the outputs' order (coarse
            to fine for MED-Net), e.g. ``(0.25, 0.5, 1.0)``; ``None`` is the paper's equal
            weights. Needs one weight per output of a list; a single tensor is unweighted.

    Returns:
        a module ``(outputs, labels) -> 0-dim tensor`` with ``last_dice`` and ``last_tv``.
    """
    key = loss_key(name)
    if key == "ce":
        return LabelledDeepSupervisionLoss(
            LabelledCrossEntropyLoss(num_classes, gamma=0.0 if gamma is None else gamma),
            level_weights,
        )
    default_gamma = DEFAULT_GAMMA if key.startswith("mdsc_tv") else 0.0
    dice = LabelledDiceLoss(
        num_classes,
        true_negatives=key.startswith("mdsc_tv"),
        gamma=default_gamma if gamma is None else gamma,
        batch=batch,
        epsilon=epsilon,
    )
    if key == "mdsc_tv_ce":  # TV once, in the Dice part
        compound = LabelledCompoundLoss(dice, LabelledCrossEntropyLoss(num_classes, gamma=0.0))
        return LabelledDeepSupervisionLoss(compound, level_weights)
    return LabelledDeepSupervisionLoss(dice, level_weights)
