"""The paper's augmentation applied to a whole batch at once, on the training device.

Same recipe as :func:`rcmseg.transforms.train_transforms` (which runs per patch in the
DataLoader): rotation up to ±180°, horizontal and vertical flips, zoom ±10 %, shear 0.2 (affine
off-diagonal coefficient), intensity offset ±20 on 0-255 (clipped), speckle ``x + x·n`` with
σ ~ U(0, 0.2) (clipped), then ``/ INTENSITY_MAX``. Labels follow the geometry with nearest
neighbour sampling, and pixels brought in from outside the patch become UNLABELLED.

Why a second implementation: per patch, MONAI's ``RandAffined`` costs ~0.1 s on one CPU core, so
feeding an H100 (≥ 1000 patches/s) would need ~100 worker processes; one ``grid_sample`` over the
batch on the GPU costs about a millisecond. Flips, rotation, zoom and shear compose into one
affine matrix per patch, so each patch is resampled once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from rcmseg.classes import INTENSITY_MAX, UNLABELLED

# Sampled Gaussian of σ = 1 px to ±3 px, normalised: the unsharp mask's blur.
_BLUR_1PX = gaussian_1d(torch.tensor(1.0), truncated=3.0, approx="sampled", normalize=True)


@dataclass(frozen=True)
class BatchAugment:
    """Random geometry and intensity for a batch of patches.

    Args:
        rotate_deg: rotation angle drawn from U(-rotate_deg, rotate_deg).
        flip_prob: probability of each of the horizontal and vertical flips.
        zoom: scale factor drawn from U(1 - zoom, 1 + zoom), the same for both axes.
        shear: off-diagonal shear coefficients drawn from U(-shear, shear), one per axis.
        intensity_offset: offset drawn from U(-offset, offset) on the 0-255 scale.
        speckle_sigma: (low, high) of σ of the multiplicative speckle noise.
        sharpness: unsharp-mask amount drawn from U(-sharpness, sharpness) with a σ = 1 px
            Gaussian: ``x + a·(x - blur(x))``, negative amounts blur (0: off, the paper's recipe).
        gamma: tone curve ``255·(x/255)**exp(u)``, u ~ U(-gamma, gamma) (0: off).
        contrast: deviations from the patch mean scaled by U(1 - contrast, 1 + contrast) (0: off).

    The last three are beyond the paper (:data:`APPEARANCE` turns them on): another microscope,
    scanner or gain setting changes sharpness and tone curve, which the paper's offset and
    speckle do not cover.

    ``__call__(images, labels, generator)``: images (B, 1, h, w) float on the 0-255 scale, labels
    (B, 1, h, w) integer (class indices or UNLABELLED), both on the same device; ``generator``
    (on that device) draws every random number, so a seeded generator repeats the augmentation
    exactly. Returns images float32 (B, 1, h, w) in [0, 1] and labels int64 (B, 1, h, w).
    """

    rotate_deg: float = 180.0
    flip_prob: float = 0.5
    zoom: float = 0.1
    shear: float = 0.2
    intensity_offset: float = 20.0
    speckle_sigma: tuple[float, float] = (0.0, 0.2)
    sharpness: float = 0.0
    gamma: float = 0.0
    contrast: float = 0.0

    def affine(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 2, 3) matrices mapping output to input coordinates (``affine_grid``'s)."""
        device = generator.device

        def uniform(low: float, high: float, size: tuple[int, ...] = (count,)) -> torch.Tensor:
            return low + (high - low) * torch.rand(size, generator=generator, device=device)

        angle = uniform(-math.radians(self.rotate_deg), math.radians(self.rotate_deg))
        cos, sin = torch.cos(angle), torch.sin(angle)
        scale = uniform(1.0 - self.zoom, 1.0 + self.zoom)
        shear = uniform(-self.shear, self.shear, (count, 2))
        flips = torch.where(uniform(0.0, 1.0, (count, 2)) < self.flip_prob, -1.0, 1.0)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shearing = torch.eye(2, device=device).repeat(count, 1, 1)
        shearing[:, 0, 1], shearing[:, 1, 0] = shear[:, 0], shear[:, 1]
        linear = rotation @ shearing * scale[:, None, None] * flips[:, None, :]
        return torch.cat([linear, torch.zeros(count, 2, 1, device=device)], dim=2)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = images.shape[0]
        grid = F.affine_grid(self.affine(count, generator), list(images.shape), align_corners=False)
        images = F.grid_sample(
            images.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        # Labels shifted by one so that zero padding marks "outside the patch".
        shifted = F.grid_sample(
            labels.float() + 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False
        ).long()
        labels = torch.where(shifted == 0, UNLABELLED, shifted - 1)

        device = images.device
        images = self.appearance(images, generator)
        offset = torch.rand(count, generator=generator, device=device) * 2 - 1
        images = images + self.intensity_offset * offset[:, None, None, None]
        images = images.clamp(0, INTENSITY_MAX)
        low, high = self.speckle_sigma
        sigma = low + (high - low) * torch.rand(count, generator=generator, device=device)
        noise = torch.randn(images.shape, generator=generator, device=device)
        images = images + images * noise * sigma[:, None, None, None]
        return images.clamp(0, INTENSITY_MAX) / INTENSITY_MAX, labels

    def appearance(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random sharpness, tone curve and contrast per patch; (B, 1, h, w) on 0-255."""
        if not (self.sharpness or self.gamma or self.contrast):
            return images  # draws nothing: the paper's recipe repeats exactly

        def uniform(spread: float) -> torch.Tensor:
            draw = torch.rand(images.shape[0], generator=generator, device=images.device)
            return ((draw * 2 - 1) * spread)[:, None, None, None]

        amount = uniform(self.sharpness)
        images = images + amount * (images - _blur_1px(images))
        images = images.clamp(0, INTENSITY_MAX)
        images = INTENSITY_MAX * (images / INTENSITY_MAX) ** torch.exp(uniform(self.gamma))
        mean = images.mean(dim=(2, 3), keepdim=True)
        return mean + (images - mean) * (1 + uniform(self.contrast))


# The appearance augmentation's spreads (TrainConfig.augment_appearance): ±50 % unsharp amount,
# gamma 0.67-1.5, contrast ±20 %.
APPEARANCE: dict[str, float] = {"sharpness": 0.5, "gamma": 0.4, "contrast": 0.2}


def _blur_1px(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) images blurred by a σ = 1 px Gaussian, reflected at the borders."""
    return separable_filtering(images, _BLUR_1PX, mode="reflect")
