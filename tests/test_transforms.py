"""Augmentation keeps labels aligned and honest; speckle statistics; per-epoch patch sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Affined
from scipy import ndimage

from rcmseg.classes import UNLABELLED
from rcmseg.transforms import (
    DecodeOutsideMarkerd,
    EncodeOutsideMarkerd,
    EpochPatchDataset,
    RandSpeckleNoise,
    RandSpeckleNoised,
    sample_epoch_patches,
    train_transforms,
    window_starts,
)

torch.set_num_threads(1)


def blocky_labels(size: int, block: int, seed: int) -> np.ndarray:
    """Random classes (and some unlabelled) in square blocks: asymmetric, so flips show."""
    rng = np.random.default_rng(seed)
    values = np.array([0, 1, 2, 3, 4, 5, UNLABELLED], dtype=np.uint8)
    grid = rng.choice(values, size=(size // block, size // block))
    return np.kron(grid, np.ones((block, block), dtype=np.uint8))


def image_from_labels(labels: np.ndarray) -> np.ndarray:
    """Intensity 30 + 35·class (unlabelled = 240): the label can be read back from the image."""
    image = 30.0 + 35.0 * labels.astype(np.float32)
    image[labels == UNLABELLED] = 240.0
    return image


def test_augmented_labels_stay_aligned_with_image() -> None:
    transform = train_transforms(intensity_offset=0.0, speckle_sigma=(0.0, 0.0))
    transform.set_random_state(seed=3)
    labels = blocky_labels(256, 32, seed=1)
    for _ in range(6):
        out = transform({"image": image_from_labels(labels)[None], "label": labels[None].copy()})
        image, label = out["image"][0].numpy() * 255.0, out["label"][0].numpy()
        assert out["label"].dtype == torch.int64 and out["label"].shape == (1, 256, 256)
        assert out["image"].dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 255.0
        # Nearest-neighbour: no value other than the classes present and UNLABELLED appears.
        assert set(np.unique(label)) <= set(np.unique(labels)) | {UNLABELLED}
        # Away from class borders the image must show exactly the intensity of its label.
        interior = ndimage.minimum_filter(label, 5) == ndimage.maximum_filter(label, 5)
        labelled = interior & (label != UNLABELLED)
        assert labelled.sum() > 10_000
        expected = 30.0 + 35.0 * label[labelled]
        assert np.mean(np.abs(image[labelled] - expected) < 1.0) > 0.99


def test_a_flipped_label_would_be_caught() -> None:
    """The check above is sensitive: the same image with a mirrored label disagrees widely."""
    labels = blocky_labels(256, 32, seed=1)
    image = image_from_labels(labels)
    mirrored = labels[:, ::-1]
    labelled = mirrored != UNLABELLED
    agree = np.abs(image[labelled] - (30.0 + 35.0 * mirrored[labelled])) < 1.0
    assert agree.mean() < 0.5


def test_pixels_from_outside_the_patch_are_unlabelled_not_background() -> None:
    labels = np.zeros((1, 64, 64), dtype=np.uint8)  # all background (class 0)
    rotate = Affined(
        keys=["label"], rotate_params=math.pi / 4, mode="nearest", padding_mode="zeros"
    )
    pipeline = [EncodeOutsideMarkerd(keys=["label"]), rotate, DecodeOutsideMarkerd(keys=["label"])]
    data = {"label": labels}
    for step in pipeline:
        data = step(data)
    out = data["label"][0]
    assert out.dtype == torch.int64
    assert out[0, 0] == UNLABELLED and out[32, 32] == 0
    assert set(out.unique().tolist()) == {0, UNLABELLED}

    transform = train_transforms()
    transform.set_random_state(seed=0)
    outside_fractions = []
    for _ in range(8):
        label = transform({"image": np.full((1, 64, 64), 100.0, np.float32), "label": labels})[
            "label"
        ]
        assert set(label.unique().tolist()) <= {0, UNLABELLED}
        outside_fractions.append(float((label == UNLABELLED).float().mean()))
    assert max(outside_fractions) > 0.1


def test_speckle_is_signal_dependent_with_the_requested_sigma() -> None:
    speckle = RandSpeckleNoise(sigma_range=(0.1, 0.1))
    speckle.set_random_state(seed=0)
    for level in (50.0, 200.0):
        noisy = speckle(np.full((512, 512), level, dtype=np.float32))
        assert noisy.dtype == np.float32
        assert noisy.mean() == pytest.approx(level, rel=0.01)
        assert noisy.std() == pytest.approx(0.1 * level, rel=0.03)
    assert np.all(speckle(np.zeros((64, 64), dtype=np.float32)) == 0.0)


def test_speckle_sigma_is_drawn_per_patch_from_the_range() -> None:
    speckle = RandSpeckleNoised(keys=["image"], sigma_range=(0.0, 0.2))
    speckle.set_random_state(seed=1)
    ratios = []
    for _ in range(60):
        image = torch.full((1, 128, 128), 100.0)
        ratios.append(float(speckle({"image": image})["image"].std()) / 100.0)
    ratios_array = np.array(ratios)
    assert ratios_array.min() >= 0.0 and ratios_array.max() <= 0.2 * 1.05
    assert ratios_array.min() < 0.03 and ratios_array.max() > 0.17
    assert ratios_array.mean() == pytest.approx(0.1, abs=0.03)


def test_intensity_offset_is_clipped_and_output_scaled() -> None:
    transform = train_transforms(speckle_sigma=(0.0, 0.0))
    transform.set_random_state(seed=5)
    label = np.zeros((1, 64, 64), np.uint8)
    offsets, saturated = [], []
    for _ in range(20):
        grey = transform({"image": np.full((1, 64, 64), 128.0, np.float32), "label": label})
        offsets.append(float(grey["image"].mean()) * 255.0 - 128.0)
        bright = transform({"image": np.full((1, 64, 64), 250.0, np.float32), "label": label})
        assert float(bright["image"].max()) <= 1.0
        saturated.append(bool(torch.all(bright["image"] == 1.0)))
    assert min(offsets) >= -20.01 and max(offsets) <= 20.01
    assert max(offsets) - min(offsets) > 10.0
    assert 0 < sum(saturated) < 20  # offsets above +5 clip at 255, the others do not


def test_window_starts_cover_the_edges() -> None:
    assert window_starts(1024, 512, 256) == [0, 256, 512]
    assert window_starts(1100, 512, 256) == [0, 256, 512, 588]
    assert window_starts(300, 512, 256) == [0]


def test_sampling_skips_crops_without_labelled_pixels() -> None:
    image = np.random.default_rng(0).uniform(0, 255, (1024, 1024)).astype(np.float32)
    labels = np.full((1024, 1024), UNLABELLED, dtype=np.uint8)
    labels[:300, :300] = 2  # only the top-left corner is labelled
    patches = sample_epoch_patches([(image, labels)], rng=0)
    assert 0 < len(patches) < 9  # nine windows; those far from the corner give no patch
    for patch in patches:
        assert patch["image"].shape == (1, 256, 256) and patch["image"].dtype == np.float32
        assert patch["label"].shape == (1, 256, 256) and patch["label"].dtype == np.uint8
        assert np.any(patch["label"] != UNLABELLED)
    fully_labelled = np.zeros_like(labels)
    assert len(sample_epoch_patches([(image, fully_labelled)], rng=0)) == 9


def test_sampling_crops_come_from_the_image_at_random_positions() -> None:
    rows, cols = np.mgrid[0:600, 0:700]
    image = (rows * 1000 + cols).astype(np.float32)  # each pixel tells its position
    labels = np.zeros((600, 700), dtype=np.uint8)
    first = sample_epoch_patches([(image, labels)], rng=1)
    again = sample_epoch_patches([(image, labels)], rng=1)
    other = sample_epoch_patches([(image, labels)], rng=2)
    assert len(first) == 4
    corners = [p["image"][0, 0, 0] for p in first]
    assert corners == [p["image"][0, 0, 0] for p in again]
    assert corners != [p["image"][0, 0, 0] for p in other]
    for patch in first:
        top, left = divmod(int(patch["image"][0, 0, 0]), 1000)
        np.testing.assert_array_equal(patch["image"][0], image[top : top + 256, left : left + 256])


def test_mosaic_smaller_than_a_crop_is_padded_unlabelled() -> None:
    image = np.full((100, 150), 90.0, dtype=np.float32)
    labels = np.full((100, 150), 4, dtype=np.uint8)
    (patch,) = sample_epoch_patches([(image, labels)], rng=0)
    assert patch["label"].shape == (1, 256, 256)
    assert np.all(patch["label"][0, :100, :150] == 4)
    assert np.all(patch["label"][0, 100:] == UNLABELLED) and np.all(patch["image"][0, 100:] == 0)


def test_epoch_dataset_feeds_a_dataloader_and_resamples_per_epoch() -> None:
    rng = np.random.default_rng(0)
    pairs = [(rng.uniform(0, 255, (512, 768)).astype(np.float32), np.ones((512, 768), np.uint8))]
    dataset = EpochPatchDataset(pairs, transform=train_transforms(), seed=7)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 256, 256) and batch["label"].dtype == torch.int64
    first_epoch = [p["image"][0, 0, 0] for p in dataset.patches]
    dataset.set_epoch(1)
    assert len(dataset) == 2  # one row of windows, two columns
    assert first_epoch != [p["image"][0, 0, 0] for p in dataset.patches]
