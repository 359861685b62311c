"""Sliding-window inference: Gaussian blending, banded stitching, padding, presets."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from rcmseg.classes import INTENSITY_MAX, NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.inference import (
    MIN_SIDE_PX,
    PRESETS,
    Preset,
    SegmentationEngine,
    context_span,
    pixel_entropy,
    segment_image,
    window_starts,
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
    probabilities = segment_image(image, conv_net, SMALL, precision="fp32")
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


@pytest.mark.parametrize("length", [64, 65, 100, 256, 1000, 1030, 1281])
@pytest.mark.parametrize("window, stride", [(64, 16), (256, 32), (256, 128)])
def test_window_starts_are_monai_grid(length, window, stride):
    from monai.inferers.utils import dense_patch_slices

    if length < window:
        assert window_starts(length, window, stride) == [0]
        return
    interval = window if length == window else stride
    monai = [s[0].start for s in dense_patch_slices((length,), (window,), (interval,))]
    assert window_starts(length, window, stride) == monai


@pytest.mark.parametrize("length", [256, 1000, 1030, 1281])
def test_context_spans_hold_exactly_the_windows_touching_the_pixels(length):
    window, stride = 256, 32
    starts = window_starts(length, window, stride)
    rng = np.random.default_rng(0)
    for first in [*rng.integers(0, length, 20), 0, length - 1]:
        last = int(min(length - 1, first + rng.integers(0, 300)))
        start, stop = context_span(int(first), last, length, window, stride)
        touching = [s for s in starts if s <= last and s + window > first]
        assert (start, stop) == (touching[0], touching[-1] + window)
        inside = [s for s in starts if start <= s and s + window <= stop]
        assert inside == touching  # no window computed in vain, none missing
        # MONAI's own grid on the span is the same windows, shifted
        assert [start + s for s in window_starts(stop - start, window, stride)] == touching


def test_bands_are_yielded_in_order_with_bounded_height(conv_net):
    image = random_image(300, 80, seed=2)
    engine = SegmentationEngine(conv_net, SMALL)
    starts = [(r0, band.shape) for r0, band in engine.iter_bands(image, band_px=128)]
    assert [r0 for r0, _ in starts] == [0, 128, 256]
    assert [shape[1] for _, shape in starts] == [128, 128, 44]


class PositionNet(nn.Module):
    """Logits that depend on where a pixel sits in its window: a region segmented with other
    windows than the whole image's gets other labels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        ramp_y = torch.linspace(-3, 3, height)[:, None].expand(height, width)
        ramp_x = torch.linspace(-3, 3, width)[None, :].expand(height, width)
        position = torch.stack([ramp_y, ramp_x, -ramp_y, -ramp_x, ramp_y * ramp_x, 0 * ramp_x])
        return self.conv(x) + position[None]


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_regions_equal_the_whole_image_everywhere(preset):
    engine = SegmentationEngine(PositionNet().eval(), preset)
    image = random_image(610, 547, seed=5)
    whole = engine.segment(image, probabilities=True, entropy=True)
    rng = np.random.default_rng(1)
    height, width = image.shape
    regions = [
        ((0, 20), (0, 20)),  # corner, smaller than a window
        ((height - 13, height), (width - 9, width)),  # bottom-right corner
        ((height - 300, height), (100, 400)),  # bottom edge
        ((50, 70), (width - 40, width)),  # right edge
        ((0, height), (0, width)),  # everything
    ]
    for _ in range(12):
        y0, x0 = int(rng.integers(0, height - 1)), int(rng.integers(0, width - 1))
        y1 = int(rng.integers(y0 + 1, min(height, y0 + 400) + 1))
        x1 = int(rng.integers(x0 + 1, min(width, x0 + 400) + 1))
        regions.append(((y0, y1), (x0, x1)))
    for rows, cols in regions:
        part = engine.segment(image, rows, cols, probabilities=True, entropy=True, band_px=97)
        region = (slice(*rows), slice(*cols))
        np.testing.assert_array_equal(part.labels, whole.labels[region], err_msg=f"{rows} {cols}")
        np.testing.assert_allclose(
            part.probabilities, whole.probabilities[(slice(None), *region)], atol=1e-5
        )
        np.testing.assert_allclose(part.entropy, whole.entropy[region], atol=1e-5)


def test_tta_averages_the_eight_flips_and_rotations(conv_net):
    image = random_image(96, 80, seed=4)
    plain = SegmentationEngine(conv_net, SMALL).probabilities(image)
    tta = SegmentationEngine(conv_net, SMALL, tta=True).probabilities(image)
    np.testing.assert_allclose(tta.sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(plain, tta, atol=1e-3)
    # a network equivariant to flips and rotations gets nothing from TTA
    symmetric = nn.Conv2d(1, NUM_CLASSES, 1).eval()
    np.testing.assert_allclose(
        SegmentationEngine(symmetric, SMALL, tta=True).probabilities(image),
        SegmentationEngine(symmetric, SMALL).probabilities(image),
        atol=1e-5,
    )


def test_engine_leaves_the_callers_network_as_it_was():
    network = get_network("mednet1").train()
    SegmentationEngine(network, "fast")
    assert network.training
    assert all(p.is_contiguous() for p in network.parameters())  # not moved to channels-last


@pytest.mark.parametrize(
    "device, message",
    [("bogus", "unknown device 'bogus'"), ("meta", "rcmseg runs on cpu or cuda")],
)
def test_bad_devices_are_one_line_input_errors(device, message, conv_net):
    with pytest.raises(InputError, match=message):
        SegmentationEngine(conv_net, SMALL, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(conv_net):
    with pytest.raises(InputError, match="no CUDA GPU"):
        SegmentationEngine(conv_net, SMALL, device="cuda")


def test_precision_fp16_on_cpu_is_refused_and_bf16_agrees(conv_net):
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        SegmentationEngine(conv_net, SMALL, precision="fp16")
    image = random_image(96, 80, seed=6)
    fp32 = SegmentationEngine(conv_net, SMALL, precision="fp32").probabilities(image)
    bf16 = SegmentationEngine(conv_net, SMALL, precision="bf16").probabilities(image)
    assert bf16.dtype == np.float32  # stitching stays float32
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_reduced_precision_keeps_the_image_and_class_layers_in_float32(conv_net):
    from rcmseg.networks.blocks import Float32Output

    def edges(precision: str) -> int:
        model = SegmentationEngine(conv_net, SMALL, precision=precision).model
        return sum(isinstance(module, Float32Output) for module in model.modules())

    assert edges("fp32") == 0  # nothing to protect, the float32 graph stays as it is
    assert edges("bf16") == 2  # the conv reading the image and the one writing the classes
    assert not any(isinstance(module, Float32Output) for module in conv_net.modules())


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, conv_net, native):
    import rcmseg.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: native)
    expected = "bf16" if native else "fp32"
    assert inference.resolve_precision("auto", torch.device("cpu")) == expected
    engine = SegmentationEngine(conv_net, SMALL, precision="auto")
    assert engine.precision == expected
    assert expected in engine.describe()
    # a bundle that sets amp false runs float32 under auto, and says why where it matters
    assert inference.resolve_precision("auto", torch.device("cpu"), amp=False) == "fp32"
    assert inference.resolve_precision("bf16", torch.device("cpu"), amp=False) == "bf16"
    strict = SegmentationEngine(conv_net, SMALL, precision="auto", amp=False)
    assert strict.precision == "fp32"
    assert ("amp false" in strict.describe()) == native


def test_an_image_smaller_than_a_window_is_padded_and_segmented(conv_net):
    image = random_image(40, 50)
    probabilities = segment_image(image, conv_net, SMALL)
    assert probabilities.shape == (NUM_CLASSES, 40, 50)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_an_image_below_the_minimum_side_is_refused(conv_net):
    with pytest.raises(InputError, match=f"{MIN_SIDE_PX} px minimum"):
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


def test_openvino_backend_gives_the_torch_labels(conv_net):
    image = random_image(200, 150, seed=8)
    torch_maps = SegmentationEngine(conv_net, SMALL, precision="fp32").segment(image, entropy=True)
    engine = SegmentationEngine(conv_net, SMALL, precision="fp32", backend="openvino")
    assert "OpenVINO" in engine.describe()
    maps = engine.segment(image, entropy=True)
    assert (maps.labels == torch_maps.labels).mean() > 0.999
    np.testing.assert_allclose(maps.entropy, torch_maps.entropy, atol=1e-3)
    # regions equal the whole image with this backend too (dynamic batch and window sizes)
    part = engine.segment(image, (150, 200), (20, 90))
    np.testing.assert_array_equal(part.labels, maps.labels[150:200, 20:90])


def test_openvino_network_pads_and_splits_batches_for_its_static_shape(conv_net):
    """Compiled per window shape with a fixed batch: any number of windows gives the torch
    probabilities, and only the last two window shapes stay compiled."""
    from rcmseg.inference import OpenVINONetwork

    runtime = OpenVINONetwork(conv_net, "fp32", batch_size=4, window=(64, 64))
    for count in (1, 4, 7):
        windows = torch.rand(count, 1, 64, 64, generator=torch.Generator().manual_seed(count))
        with torch.no_grad():
            expected = torch.softmax(conv_net(windows), dim=1).numpy()
        np.testing.assert_allclose(runtime(windows.numpy()), expected, atol=1e-5)
    for window in ((64, 96), (96, 64)):
        assert runtime(np.zeros((2, 1, *window), np.float32)).shape == (2, 6, *window)
    assert sorted(runtime._compiled) == [(64, 96), (96, 64)]


def test_openvino_runs_instance_norms_as_they_are_with_the_torch_labels():
    """OpenVINO gets the instance norms themselves (its MVN operation, faster than the group
    norms torch runs them as), with the labels torch gives."""
    from rcmseg.networks import get_network

    torch.manual_seed(0)
    network = get_network("dynunet", filters=(8, 16, 16, 32, 32)).eval()
    image = random_image(160, 130, seed=9)
    torch_engine = SegmentationEngine(network, SMALL, precision="fp32")
    engine = SegmentationEngine(network, SMALL, precision="fp32", backend="openvino")
    operations = {op.get_type_name() for op in engine._openvino._model.get_ordered_ops()}
    assert "MVN" in operations and "GroupNormalization" not in operations
    assert any(isinstance(m, torch.nn.GroupNorm) for m in torch_engine.model.modules())
    labels = engine.segment(image).labels
    assert (labels == torch_engine.segment(image).labels).mean() > 0.999


def test_openvino_cache_keeps_the_converted_network_only_when_asked(conv_net, tmp_path):
    """With a cache folder the converted model is written once (IR .xml and .bin, no scratch
    left) and read back by later runs with equal outputs; other weights get another entry;
    without one, nothing is written."""
    from rcmseg.inference import OpenVINONetwork

    windows = np.random.default_rng(3).random((2, 1, 64, 64), dtype=np.float32)
    cache = tmp_path / "cache"
    first = OpenVINONetwork(conv_net, "fp32", batch_size=2, window=(64, 64), cache_dir=cache)
    assert not first.cached
    entries = sorted(path.suffix for path in cache.iterdir())
    assert entries == [".bin", ".xml"]
    again = OpenVINONetwork(conv_net, "fp32", batch_size=2, window=(64, 64), cache_dir=cache)
    assert again.cached
    np.testing.assert_array_equal(again(windows), first(windows))

    retrained = copy.deepcopy(conv_net)
    with torch.no_grad():
        retrained[0].bias += 0.5
    other = OpenVINONetwork(retrained, "fp32", batch_size=2, window=(64, 64), cache_dir=cache)
    assert not other.cached and len(list(cache.glob("*.xml"))) == 2
    assert not np.array_equal(other(windows), first(windows))

    engine = SegmentationEngine(conv_net, SMALL, precision="fp32", backend="openvino")
    assert not engine._openvino.cached and len(list(cache.iterdir())) == 4
    assert not list(tmp_path.glob("*.xml"))

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(InputError, match="cannot keep the converted network here"):
        OpenVINONetwork(conv_net, "fp32", batch_size=2, window=(64, 64), cache_dir=blocked)


def test_openvino_keeps_the_edge_convolutions_float32_under_bf16(tmp_path):
    """The convolutions that read the image or write the class scores are marked in the IR (a
    transposed one by its own weight layout) and, where OpenVINO runs bf16, run float32 while the
    layers between run bf16, as torch's autocast path keeps them."""
    from rcmseg.inference import OpenVINONetwork, openvino_precision

    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 16, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, NUM_CLASSES, 1),
    ).eval()
    runtime = OpenVINONetwork(network, "bf16", batch_size=2, window=(64, 64), cache_dir=tmp_path)
    kept = next(tmp_path.glob("*.xml")).read_text(encoding="utf-8")
    assert kept.count('name="DisablePrecisionConversion"') == 2

    compiled = runtime.compiled((64, 64))
    ran = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in ("Convolution", "Deconvolution"):
            names = info["originalLayersNames"].astype(str)
            ran[names.split("/")[0]] = info["runtimePrecision"].astype(str)
    edges = {"__module.0.0", "__module.0.6"}
    assert edges <= set(ran)
    if openvino_precision(compiled) == "bf16":
        assert {name: ran[name] for name in edges} == dict.fromkeys(edges, "f32")
        assert {ran[name] for name in set(ran) - edges} == {"bf16"}
    with torch.no_grad():
        windows = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
        expected = torch.softmax(network(windows), dim=1).numpy()
    np.testing.assert_allclose(runtime(windows.numpy()), expected, atol=0.02)


def test_openvino_runs_on_the_threads_torch_was_given(conv_net):
    """`--threads N` (configure_threads) holds for OpenVINO too: its compiled model runs on as
    many threads as torch has, not on every core of the machine."""
    from rcmseg.inference import OpenVINONetwork

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runtime = OpenVINONetwork(conv_net, "fp32", batch_size=2, window=(64, 64))
        assert runtime.compiled((64, 64)).get_property("INFERENCE_NUM_THREADS") == 1
    finally:
        torch.set_num_threads(before)


def test_network_cache_key_follows_weights_of_any_dtype(conv_net):
    from rcmseg.inference import network_cache_key

    key = network_cache_key(conv_net, "v1")
    assert key == network_cache_key(copy.deepcopy(conv_net), "v1")
    assert key != network_cache_key(conv_net, "v2")
    assert network_cache_key(copy.deepcopy(conv_net).to(torch.bfloat16), "v1") != key


def test_unknown_backend_is_one_line(conv_net):
    with pytest.raises(InputError, match="unknown backend 'tensorrt'; choose torch, openvino"):
        SegmentationEngine(conv_net, SMALL, backend="tensorrt")


def test_backend_settings_are_checked_before_any_work(monkeypatch):
    """`check_backend` (batch, evaluate, the bundle configs and `rcmseg label serve` call it
    before loading anything): OpenVINO only on the CPU, and only when installed."""
    import importlib.util

    import rcmseg.inference as inference

    inference.check_backend("torch", torch.device("cuda"))
    with pytest.raises(InputError, match="unknown backend 'onnx'"):
        inference.check_settings("fast", "auto", "cpu", backend="onnx")
    with pytest.raises(InputError, match="runs on the CPU; use --device cpu"):
        inference.check_backend("openvino", torch.device("cuda"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "openvino" else real_find_spec(name, *args),
    )
    with pytest.raises(
        InputError, match=r"needs the openvino extra: pip install 'rcmseg\[openvino\]'"
    ):
        inference.check_backend("openvino", torch.device("cpu"))


def test_openvino_records_the_precision_it_really_runs(conv_net):
    """OpenVINO takes a bf16 hint on a CPU without bf16 and runs float32: the engine (and so
    mosaics.csv and the label TIFF) must say float32 then, and why."""
    from rcmseg.inference import openvino_precision

    engine = SegmentationEngine(conv_net, SMALL, precision="bf16", backend="openvino")
    ran = openvino_precision(engine._openvino.compiled((64, 64)))
    assert ran in ("fp32", "bf16")
    assert engine.precision == ran
    if ran == "fp32":
        assert "fp32 (bf16 asked; OpenVINO has no bf16 on this CPU)" in engine.describe()
    else:
        assert engine.precision_note == ""


def test_bf16_on_a_cpu_without_it_says_it_is_emulated(monkeypatch, conv_net):
    import rcmseg.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    engine = SegmentationEngine(conv_net, SMALL, precision="bf16")
    assert engine.precision == "bf16"  # asked for explicitly: run it, but say what it costs
    assert "bf16 (emulated: no native bf16 on this CPU" in engine.describe()
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert SegmentationEngine(conv_net, SMALL, precision="bf16").precision_note == ""
