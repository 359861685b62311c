"""Sliding-window inference: Gaussian blending, banded stitching, padding, presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from rcmseg.classes import INTENSITY_MAX, NUM_CLASSES
from rcmseg.inference import (
    MIN_SIDE_PX,
    PRESETS,
    Preset,
    band_rows,
    iter_probability_bands,
    pixel_entropy,
    segment_image,
    windows_per_pixel,
)
from rcmseg.networks import get_network

torch.set_num_threads(2)
SMALL = Preset(window_px=64, overlap=0.75, sw_batch_size=4)  # 16 px stride


@pytest.fixture(scope="module")
def conv_net() -> nn.Module:
    """A small fully convolutional net with a 9 px receptive field: fast and position-free."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 5, padding=2)
    ).eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width)) * 255).astype(np.float32)


def test_presets_match_the_paper_and_the_network_grid():
    paper = PRESETS["paper"]
    assert (paper.window_px, paper.stride_px) == (256, 32)
    assert windows_per_pixel("paper") == 64
    for preset in PRESETS.values():
        assert preset.window_px % 32 == 0  # MED-Net needs sides that are multiples of 32
        assert preset.stride_px <= preset.window_px
    assert windows_per_pixel("fast") < windows_per_pixel("paper")


def test_probabilities_are_a_gaussian_blend_of_window_softmaxes(conv_net):
    image = random_image(150, 130)
    probabilities = segment_image(image, conv_net, SMALL)
    assert probabilities.shape == (NUM_CLASSES, 150, 130)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    # The same blend computed by MONAI directly on the whole image.
    tensor = torch.from_numpy(image / INTENSITY_MAX)[None, None]
    with torch.no_grad():
        expected = sliding_window_inference(
            tensor,
            roi_size=(64, 64),
            sw_batch_size=4,
            predictor=lambda x: torch.softmax(conv_net(x), dim=1),
            overlap=0.75,
            mode="gaussian",
            sigma_scale=0.125,
        )[0].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.parametrize("height", [64, 77, 211])
@pytest.mark.parametrize("band_px", [1, 16, 37, 100])
def test_banded_stitching_equals_whole_image_stitching(conv_net, height, band_px):
    image = random_image(height, 97, seed=1)
    whole = segment_image(image, conv_net, SMALL, band_px=10_000)
    banded = segment_image(image, conv_net, SMALL, band_px=band_px)
    np.testing.assert_allclose(banded, whole, atol=1e-6)


@pytest.mark.parametrize("height", [256, 1000, 1030, 1281])
def test_bands_cover_every_row_once_with_whole_windows(height):
    window, overlap = 256, PRESETS["paper"].overlap
    covered = np.zeros(height, dtype=int)
    for r0, r1, b0, b1 in band_rows(height, window, overlap, band_px=300):
        covered[r0:r1] += 1
        assert b0 <= r0 and b1 >= r1 and b1 - b0 >= min(window, height)
        assert b0 % 32 == 0 or b0 == height - window  # on the grid, or the clamped last window
    assert (covered == 1).all()


def test_bands_are_yielded_in_order_with_bounded_height(conv_net):
    image = random_image(300, 80, seed=2)
    starts = [
        (r0, band.shape) for r0, band in iter_probability_bands(image, conv_net, SMALL, band_px=128)
    ]
    assert [r0 for r0, _ in starts] == [0, 128, 256]
    assert [shape[1] for _, shape in starts] == [128, 128, 44]


def test_an_image_smaller_than_a_window_is_padded_and_segmented(conv_net):
    image = random_image(40, 50)
    probabilities = segment_image(image, conv_net, SMALL)
    assert probabilities.shape == (NUM_CLASSES, 40, 50)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_an_image_below_the_minimum_side_is_refused(conv_net):
    with pytest.raises(ValueError, match=f"{MIN_SIDE_PX} px minimum"):
        segment_image(random_image(MIN_SIDE_PX - 1, 200), conv_net, SMALL)


def test_mednet_segments_with_both_presets():
    torch.manual_seed(0)
    network = get_network("mednet").eval()
    image = random_image(288, 200, seed=3)  # paper: 2 × 1 windows (padded across), fast: 1
    for preset in ("paper", "fast"):
        probabilities = segment_image(image, network, preset, device="cpu")
        assert probabilities.shape == (NUM_CLASSES, 288, 200)
        assert np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)


def test_pixel_entropy_is_zero_when_certain_and_ln_k_when_uniform():
    certain = np.zeros((NUM_CLASSES, 2, 3), dtype=np.float32)
    certain[2] = 1.0
    uniform = np.full((NUM_CLASSES, 2, 3), 1 / NUM_CLASSES, dtype=np.float32)
    np.testing.assert_allclose(pixel_entropy(certain), 0.0, atol=1e-6)
    np.testing.assert_allclose(pixel_entropy(uniform), math.log(NUM_CLASSES), atol=1e-5)
    two_way = np.zeros((NUM_CLASSES, 1, 1), dtype=np.float32)
    two_way[:2] = 0.5
    np.testing.assert_allclose(pixel_entropy(two_way), math.log(2), atol=1e-6)


def test_windows_shrink_to_small_images_but_not_below_the_training_patch():
    large, paper = Preset(window_px=512, overlap=0.5), PRESETS["paper"]
    assert large.window_for(3000, 3000) == (512, 512)
    assert large.window_for(300, 2000) == (320, 512)  # rounded up to a multiple of 32
    assert large.window_for(100, 150) == (256, 256)  # padded to the 256 px field of view
    assert paper.window_for(100, 3000) == (256, 256)
