"""Training augmentation and per-epoch patch sampling (Kose et al. 2021, section on training).

Images enter the transforms as (1, h, w) float32 on the 0-255 scale at the working resolution
(2 µm/px); label maps as (1, h, w) integers (0..5, 255 = unlabelled). The output image is scaled to
[0, 1] (``image / INTENSITY_MAX``), the output label is int64 (1, h, w).

Labels follow the image through the same geometry with nearest-neighbour sampling, so they are
never interpolated. Pixels that a rotation, zoom or shear brings in from outside the patch must be
*unlabelled*; MONAI pads with zeros, which is a real class (background), so labels are shifted by
one before the geometry (0 then means "outside") and shifted back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    RandomizableTransform,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

from rcmseg.classes import INTENSITY_MAX, UNLABELLED

__all__ = [
    "ClipIntensityd",
    "DecodeOutsideMarkerd",
    "EncodeOutsideMarkerd",
    "EpochPatchDataset",
    "RandSpeckleNoise",
    "RandSpeckleNoised",
    "sample_epoch_patches",
    "train_transforms",
    "window_starts",
]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis as MONAI places them: multiples of ``stride`` until a window
    reaches the end, the last one clamped flush with it (one window at 0 if ``length <= window``).

    This is the one window-grid function of rcmseg; bands and regions derive from it.
    """
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(index * stride, length - window) for index in range(count)]


# Label value that marks "brought in from outside the patch" while labels are shifted by one.
OUTSIDE_MARKER = 0


class RandSpeckleNoise(RandomizableTransform):
    """Signal-dependent speckle: ``x' = x + x·n``, ``n ~ N(0, σ²)`` per pixel, σ ~ U(sigma_range).

    One σ is drawn per call (per patch), then one ``n`` per pixel. Works on any array shape; the
    result has the input's dtype. Values are not clipped (clip afterwards if the range matters).

    Args:
        prob: probability of adding noise to a patch.
        sigma_range: (low, high) of the uniform distribution of σ; the paper uses (0, 0.2).
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(self, prob: float = 1.0, sigma_range: tuple[float, float] = (0.0, 0.2)) -> None:
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.sigma = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        noise = self.R.normal(0.0, self.sigma, size=tuple(img.shape)).astype(np.float32)
        if isinstance(img, torch.Tensor):
            return img + img * torch.as_tensor(noise, dtype=img.dtype, device=img.device)
        return (img + img * noise).astype(img.dtype, copy=False)


class RandSpeckleNoised(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandSpeckleNoise`; each key gets its own noise field.

    Args:
        keys: keys of the images to corrupt (not labels).
        prob: probability of adding noise to a sample.
        sigma_range: (low, high) of σ; the paper's augmentation uses (0, 0.2).
    """

    backend = RandSpeckleNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        sigma_range: tuple[float, float] = (0.0, 0.2),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.speckle = RandSpeckleNoise(prob=1.0, sigma_range=sigma_range)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandSpeckleNoised:
        super().set_random_state(seed, state)
        self.speckle.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.speckle(d[key], randomize=True)
        return d


class ClipIntensityd(MapTransform):
    """Clip intensities to ``[minimum, maximum]`` (e.g. 0-255 after an intensity offset)."""

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(
        self,
        keys: KeysCollection,
        minimum: float = 0.0,
        maximum: float = INTENSITY_MAX,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.minimum = minimum
        self.maximum = maximum

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, torch.Tensor):
                d[key] = value.clamp(self.minimum, self.maximum)
            else:
                d[key] = np.clip(value, self.minimum, self.maximum)
        return d


class EncodeOutsideMarkerd(MapTransform):
    """Shift labels by one into float32 so that zero padding reads as "outside the patch".

    Run before any geometry that pads; undo with :class:`DecodeOutsideMarkerd`.
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            d[key] = label.to(torch.float32) + 1.0
        return d


class DecodeOutsideMarkerd(MapTransform):
    """Undo :class:`EncodeOutsideMarkerd`: outside pixels become UNLABELLED, the rest shift back.

    The output is an int64 tensor, the label dtype losses and metrics take.
    """

    backend = [torch.Tensor.__name__]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shifted = torch.as_tensor(d[key]).round().to(torch.int64)
            d[key] = torch.where(shifted == OUTSIDE_MARKER, UNLABELLED, shifted - 1)
        return d


def train_transforms(
    keys: Sequence[str] = ("image", "label"),
    rotate_deg: float = 180.0,
    flip_prob: float = 0.5,
    intensity_offset: float = 20.0,
    zoom: float = 0.1,
    shear: float = 0.2,
    speckle_sigma: tuple[float, float] = (0.0, 0.2),
    image_padding: str = "reflection",
) -> Compose:
    """The paper's augmentation as one MONAI Compose of dictionary transforms.

    Per patch: rotation by U(-rotate_deg, rotate_deg); horizontal and vertical flips, each with
    ``flip_prob``; zoom by a factor U(1 - zoom, 1 + zoom); shear with factors U(-shear, shear) on
    both axes (``shear`` is the off-diagonal coefficient of the affine matrix, MONAI's unit; 0.2
    is about 11°); intensity offset U(-intensity_offset, intensity_offset) on 0-255, clipped;
    speckle ``x + x·n``, σ ~ U(*speckle_sigma), clipped; finally ``image / INTENSITY_MAX``.

    Args:
        keys: (image key, label key). Image (1, h, w) float 0-255; label (1, h, w) integer with
            UNLABELLED = 255. Output: image float32 (1, h, w) in [0, 1]; label int64 (1, h, w)
            where pixels from outside the patch are UNLABELLED.
        image_padding: how the image is filled where geometry reaches outside the patch
            (``grid_sample`` padding: "reflection", "zeros" or "border"); those pixels are
            unlabelled, so this only affects what the network sees there.
    """
    image_key, label_key = keys
    return Compose(
        [
            EnsureTyped(keys=[image_key], dtype=torch.float32, track_meta=False),
            EncodeOutsideMarkerd(keys=[label_key]),
            RandFlipd(keys=[image_key, label_key], prob=flip_prob, spatial_axis=0),
            RandFlipd(keys=[image_key, label_key], prob=flip_prob, spatial_axis=1),
            RandAffined(
                keys=[image_key, label_key],
                prob=1.0,
                rotate_range=(math.radians(rotate_deg),),
                shear_range=(shear, shear),
                scale_range=(zoom, zoom),
                mode=("bilinear", "nearest"),
                padding_mode=(image_padding, "zeros"),
            ),
            DecodeOutsideMarkerd(keys=[label_key]),
            RandShiftIntensityd(keys=[image_key], offsets=intensity_offset, prob=1.0),
            ClipIntensityd(keys=[image_key], minimum=0.0, maximum=INTENSITY_MAX),
            RandSpeckleNoised(keys=[image_key], prob=1.0, sigma_range=speckle_sigma),
            ScaleIntensityRanged(
                keys=[image_key], a_min=0.0, a_max=INTENSITY_MAX, b_min=0.0, b_max=1.0, clip=True
            ),
            EnsureTyped(keys=[image_key, label_key], track_meta=False),
        ]
    )


def _crop_with_padding(
    image: np.ndarray, labels: np.ndarray, top: int, left: int, crop: int
) -> tuple[np.ndarray, np.ndarray]:
    """A (crop, crop) cut at (top, left); parts beyond the mosaic are 0 and UNLABELLED."""
    image_cut = image[top : top + crop, left : left + crop]
    label_cut = labels[top : top + crop, left : left + crop]
    if image_cut.shape == (crop, crop):
        return image_cut.copy(), label_cut.copy()
    image_out = np.zeros((crop, crop), dtype=image.dtype)
    label_out = np.full((crop, crop), UNLABELLED, dtype=labels.dtype)
    h, w = image_cut.shape
    image_out[:h, :w] = image_cut
    label_out[:h, :w] = label_cut
    return image_out, label_out


def sample_epoch_patches(
    images_and_labels: Sequence[tuple[np.ndarray, np.ndarray]],
    window: int = 512,
    overlap: float = 0.5,
    crop: int = 256,
    rng: np.random.Generator | int | None = None,
) -> list[dict[str, np.ndarray]]:
    """One epoch of training patches, as the paper samples them.

    Every mosaic is cut into ``window`` px windows at ``overlap`` (0.5: step = window / 2); from
    each window one ``crop`` px square is taken at a uniformly random position; crops with no
    labelled pixel are skipped. A mosaic (or window) smaller than ``crop`` gives a crop padded
    with intensity 0 and UNLABELLED labels, so every patch has the same size.

    Args:
        images_and_labels: pairs of image (H, W) float32 0-255 and labels (H, W) uint8 at the
            working resolution (2 µm/px), as :func:`rcmseg.io.dataset.load_case` returns them.
        rng: a numpy Generator or a seed; draws the crop positions.

    Returns:
        Dicts ``{"image": (1, crop, crop) float32, "label": (1, crop, crop) uint8}`` in mosaic
        order, ready for :func:`train_transforms` and a ``monai.data.Dataset``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    step = max(1, round(window * (1.0 - overlap)))
    patches: list[dict[str, np.ndarray]] = []
    for image, labels in images_and_labels:
        if image.shape != labels.shape:
            raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        height, width = image.shape
        for top in window_starts(height, window, step):
            for left in window_starts(width, window, step):
                window_h = min(window, height - top)
                window_w = min(window, width - left)
                dy = int(generator.integers(0, max(window_h - crop, 0) + 1))
                dx = int(generator.integers(0, max(window_w - crop, 0) + 1))
                image_cut, label_cut = _crop_with_padding(image, labels, top + dy, left + dx, crop)
                if not np.any(label_cut != UNLABELLED):
                    continue
                patches.append(
                    {
                        "image": image_cut[None].astype(np.float32, copy=False),
                        "label": label_cut[None],
                    }
                )
    return patches


class EpochPatchDataset(torch.utils.data.Dataset):
    """A torch Dataset of one epoch's augmented patches; call :meth:`set_epoch` to resample.

    Patches are sampled with :func:`sample_epoch_patches` from a generator seeded by
    ``(seed, epoch)``, so an epoch's crop positions are reproducible (resume gives the same ones).

    Args:
        images_and_labels: pairs of image (H, W) float32 0-255 and labels (H, W) uint8.
        transform: applied to each patch dict (e.g. :func:`train_transforms`); None = raw.
    """

    def __init__(
        self,
        images_and_labels: Sequence[tuple[np.ndarray, np.ndarray]],
        transform: Any = None,
        window: int = 512,
        overlap: float = 0.5,
        crop: int = 256,
        seed: int = 0,
    ) -> None:
        self.images_and_labels = images_and_labels
        self.transform = transform
        self.window, self.overlap, self.crop, self.seed = window, overlap, crop, seed
        self.patches: list[dict[str, np.ndarray]] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Resample the crops for ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        self.patches = sample_epoch_patches(
            self.images_and_labels, self.window, self.overlap, self.crop, rng
        )

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> Any:
        patch = self.patches[index]
        return patch if self.transform is None else self.transform(dict(patch))

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))
