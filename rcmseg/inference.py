"""Sliding-window segmentation of a whole mosaic at the working resolution (2 µm/px).

The one inference path of rcmseg: ``rcmseg batch``, the bundle's ``inference.json``, evaluation
and the MONAI Label app all call :func:`segment_image` or :func:`iter_probability_bands`.

Windows are blended with MONAI's :class:`~monai.inferers.SlidingWindowInferer` in Gaussian mode:
each window's softmax probabilities are weighted by a Gaussian (σ = ``sigma_scale`` × window side)
and the weighted sum is normalised per pixel, as in MED-Net (Kose et al. 2021). On a side where
the image is smaller than the preset's window, the window shrinks to the image (rounded up to a
multiple of 32, at least 256 px, the training field of view); an image smaller than that is
padded with zeros (black, i.e. "outside the mosaic").

Memory stays bounded by stitching in horizontal bands: band rows ``[r0, r1)`` are computed from
input rows ``[b0, b1)``, where ``b0`` is the first window origin of the whole-image grid (multiples
of the stride, the last window clamped to the edge) whose window reaches below ``r0``, and ``b1``
the end of the last window that starts above ``r1``. MONAI's grid on the band then holds exactly
the whole-image windows that touch ``[r0, r1)``, at the same positions, so the banded result equals
the whole-image result (up to float rounding) while only one band of probabilities is held.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from rcmseg.classes import INTENSITY_MAX, NUM_CLASSES
from rcmseg.networks.blocks import fold_batch_norms

# Smallest accepted side at the working resolution: 32 px = 64 µm, one stride of MED-Net's finest
# level and a few cells across; a smaller field holds no recognisable pattern.
MIN_SIDE_PX: int = 32
MIN_WINDOW_PX: int = 256  # MED-Net's training patch side (0.5 mm): windows never shrink below it


@dataclass(frozen=True)
class Preset:
    """Sliding-window settings, in pixels at the working resolution (2 µm/px).

    Attributes:
        window_px: side of the square window fed to the network (a multiple of 32).
        overlap: fraction of a window shared by neighbours; stride = window × (1 − overlap).
        sigma_scale: Gaussian σ as a fraction of the window side (MONAI's ``sigma_scale``); the
            paper's "variance half of the patch size" is ambiguous, MONAI's default 0.125 is used.
        sw_batch_size: windows per forward pass on CPU; CUDA uses ``CUDA_BATCH_FACTOR`` times more.
    """

    window_px: int
    overlap: float
    sigma_scale: float = 0.125
    sw_batch_size: int = 4

    @property
    def stride_px(self) -> int:
        """Step between window origins, as MONAI computes it (at least 1 px)."""
        return max(int(self.window_px * (1 - self.overlap)), 1)

    def window_for(self, height: int, width: int) -> tuple[int, int]:
        """Window (h, w) for an image: the preset's, shrunk on a side where the image is smaller.

        A side shrinks to the image side rounded up to a multiple of 32, but never below
        :data:`MIN_WINDOW_PX`, the field of view the network was trained on; so a small image is
        not padded to a large window for nothing (it still gets one window on that side).
        """
        floor = min(self.window_px, MIN_WINDOW_PX)
        return tuple(  # type: ignore[return-value]
            max(min(self.window_px, math.ceil(side / 32) * 32), floor) for side in (height, width)
        )


PRESETS: dict[str, Preset] = {
    # As published: 256 px windows (0.5 mm) at a 32 px stride, 64 windows over each pixel.
    "paper": Preset(window_px=256, overlap=0.875, sw_batch_size=8),
    # Chosen by measurement (docs/benchmarks.md, "Batch segmentation"): the paper's 256 px window
    # at a 128 px stride, 1/16 of its network work (4 windows over each pixel, not 64). Among the
    # candidates of equal cost it agreed best with "paper": a 512 px window changes the context
    # the network sees, which moved more labels than the coarser stride did.
    "fast": Preset(window_px=256, overlap=0.5, sw_batch_size=8),
}
CUDA_BATCH_FACTOR: int = 8
# Stitching memory per band: a 3000 px wide image (a 12000² mosaic) fits in one band, a 6000 px
# wide one (24000²) takes 2-3; each extra band recomputes up to a window of rows on each side.
BAND_BUDGET_MB: int = 256


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when present, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (``"paper"`` or ``"fast"``) or pass a :class:`Preset` through."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def make_inferer(
    preset: str | Preset = "fast",
    device: str | torch.device = "cpu",
    window: tuple[int, int] | None = None,
) -> SlidingWindowInferer:
    """A Gaussian-blending :class:`SlidingWindowInferer` for ``preset``.

    Windows run on ``device``; on CUDA the stitching stays there too (fast and small: one band),
    on CPU everything stays on the CPU in float32. ``window`` overrides the preset's square
    window (see :meth:`Preset.window_for`).
    """
    settings = get_preset(preset)
    device = resolve_device(device)
    on_cuda = device.type == "cuda"
    return SlidingWindowInferer(
        roi_size=window or (settings.window_px, settings.window_px),
        sw_batch_size=settings.sw_batch_size * (CUDA_BATCH_FACTOR if on_cuda else 1),
        overlap=settings.overlap,
        mode="gaussian",
        sigma_scale=settings.sigma_scale,
        padding_mode="constant",
        cval=0.0,
        sw_device=device,
        device=device,
    )


def softmax_predictor(network: nn.Module, amp: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``network`` so that it maps (B, 1, h, w) inputs in [0, 1] to float32 probabilities."""

    def predict(windows: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.float16)
            if amp and windows.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            logits = network(windows)
        return torch.softmax(logits.float(), dim=1)

    return predict


def band_rows(
    height: int, window: int, overlap: float, band_px: int
) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(r0, r1, b0, b1)``: output rows ``[r0, r1)`` computed from input rows ``[b0, b1)``.

    ``window`` is the window height. ``[b0, b1)`` spans exactly the windows of the whole-image
    grid that touch ``[r0, r1)`` (see the module docstring), so no window is computed in vain.
    """
    stride = max(int(window * (1 - overlap)), 1)
    band_px = max(band_px, stride) if height > window else height
    last_start = max(height - window, 0)  # MONAI clamps the grid's last window to the edge
    for r0 in range(0, height, band_px):
        r1 = min(r0 + band_px, height)
        first = min(((r0 - window) // stride + 1) * stride if r0 >= window else 0, last_start)
        if last_start < r1:  # the clamped last window touches the band: keep the image's end
            yield r0, r1, first, height
        else:
            yield r0, r1, first, (r1 - 1) // stride * stride + window


def auto_band_px(width: int, num_classes: int = NUM_CLASSES) -> int:
    """Rows per band so that a band's stitching buffers take about :data:`BAND_BUDGET_MB`."""
    bytes_per_row = width * (num_classes + 1) * 4  # float32 class sums and the weight map
    return max(int(BAND_BUDGET_MB * 2**20 // bytes_per_row), MIN_WINDOW_PX)


def iter_probability_bands(
    image: np.ndarray,
    network: nn.Module,
    preset: str | Preset = "fast",
    device: str | torch.device = "cpu",
    amp: bool = True,
    band_px: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Segment ``image`` band by band.

    Args:
        image: float32 (H, W) on the 0-255 scale at the working resolution (2 µm/px).
        network: eval-mode network mapping (B, 1, h, w) in [0, 1] to (B, K, h, w) logits.
        preset: a name in :data:`PRESETS` or a :class:`Preset`.
        device: where windows run (``"auto"``, ``"cpu"``, ``"cuda:0"``, ...).
        amp: float16 autocast on CUDA (ignored on CPU).
        band_px: output rows per band (default :func:`auto_band_px`); stitching memory grows
            with ``band_px × W``, not with ``H × W``.

    Yields:
        ``(r0, probabilities)``: float32 (K, h, W) probabilities of rows ``[r0, r0 + h)``.
    """
    settings = get_preset(preset)
    device = resolve_device(device)
    height, width = image.shape
    if min(height, width) < MIN_SIDE_PX:
        raise ValueError(f"image {width}×{height} px is below the {MIN_SIDE_PX} px minimum side")
    window = settings.window_for(height, width)
    inferer = make_inferer(settings, device, window)
    network = fold_batch_norms(network.to(device).eval())
    predict = softmax_predictor(network, amp)
    with torch.inference_mode():
        band_px = band_px or auto_band_px(width)
        for r0, r1, b0, b1 in band_rows(height, window[0], settings.overlap, band_px):
            rows = torch.from_numpy(np.ascontiguousarray(image[b0:b1], dtype=np.float32))
            windows_in = (rows / INTENSITY_MAX)[None, None].to(device)
            blended = inferer(windows_in, predict)
            yield r0, blended[0, :, r0 - b0 : r1 - b0].float().cpu().numpy()


def segment_image(
    image: np.ndarray,
    network: nn.Module,
    preset: str | Preset = "fast",
    device: str | torch.device = "cpu",
    amp: bool = True,
    band_px: int | None = None,
) -> np.ndarray:
    """Probabilities of every class for a whole image.

    Args:
        image: float32 (H, W) on the 0-255 scale at the working resolution (2 µm/px).
        network, preset, device, amp, band_px: as in :func:`iter_probability_bands`.

    Returns:
        float32 (K, H, W) probabilities summing to 1 over K at every pixel.
    """
    probabilities: np.ndarray | None = None
    for r0, band in iter_probability_bands(image, network, preset, device, amp, band_px):
        if probabilities is None:
            probabilities = np.empty((band.shape[0], *image.shape), dtype=np.float32)
        probabilities[:, r0 : r0 + band.shape[1]] = band
    assert probabilities is not None  # image has at least MIN_SIDE_PX rows
    return probabilities


def windows_per_pixel(preset: str | Preset) -> float:
    """How many windows cover an interior pixel: the cost of a preset relative to tiling."""
    settings = get_preset(preset)
    return (settings.window_px / settings.stride_px) ** 2


def pixel_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-pixel entropy of (K, h, w) probabilities in nats: float32 (h, w) from 0 to ln K."""
    clipped = np.clip(probabilities, 1e-12, 1.0)
    return -(probabilities * np.log(clipped)).sum(axis=0, dtype=np.float32)
