"""The segmentation engine: sliding-window inference at the working resolution (2 µm/px).

The one inference path of rcmseg: ``rcmseg batch``, the bundle's ``inference.json``, the MONAI
Label infer task (whole mosaics and regions), ``rcmseg evaluate`` and training validation all
segment through a :class:`SegmentationEngine`.

Windows are blended with MONAI's :class:`~monai.inferers.SlidingWindowInferer` in Gaussian mode:
each window's softmax probabilities are weighted by a Gaussian (σ = ``sigma_scale`` × window side)
and the weighted sum is normalised per pixel, as in MED-Net (Kose et al. 2021). On a side where
the image is smaller than the preset's window, the window shrinks to the image (rounded up to a
multiple of 32, at least 256 px, the training field of view); an image smaller than that is
padded with zeros (black, i.e. "outside the mosaic").

Regions and bands: MONAI puts windows at multiples of the stride along each axis and one last
window flush with the image's end (:func:`window_starts`, the one grid function). To segment the
pixels ``[first, last]`` of an axis exactly as a whole-image run would, the engine runs MONAI on
the span from the first grid window that reaches ``first`` to the end of the last grid window
that reaches ``last`` (:func:`context_span`): MONAI's grid on that span is then the whole-image
grid's windows touching the pixels, at the same positions, so the result equals the whole-image
result up to float rounding. Whole images are stitched in horizontal bands of rows this way, so
only one band of probabilities is held; regions (MONAI Label requests) use the same spans.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import math
import os
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from rcmseg.classes import INTENSITY_MAX, NUM_CLASSES
from rcmseg.errors import InputError, as_flag, os_reason, read_flags
from rcmseg.io.atomic import copy_atomic
from rcmseg.networks.blocks import edge_layers_in_float32, inference_copy, is_edge_convolution
from rcmseg.transforms import window_starts  # the one window grid (MONAI's)

# Smallest accepted side at the working resolution: 32 px = 64 µm, one stride of MED-Net's finest
# level and a few cells across; a smaller field holds no recognisable pattern.
MIN_SIDE_PX: int = 32
MIN_WINDOW_PX: int = 256  # MED-Net's training patch side (0.5 mm): windows never shrink below it
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
BACKENDS: tuple[str, ...] = ("torch", "openvino")
OPENVINO_MISSING = "--backend openvino needs the openvino extra: pip install 'rcmseg[openvino]'"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Preset:
    """Sliding-window settings, in pixels at the working resolution (2 µm/px).

    Attributes:
        window_px: side of the square window fed to the network (a multiple of 32).
        overlap: fraction of a window shared by neighbours; stride = window × (1 − overlap).
        sigma_scale: Gaussian σ as a fraction of the window side (MONAI's ``sigma_scale``); the
            paper's "variance half of the patch size" is ambiguous, MONAI's default 0.125 is used.
        sw_batch_size: windows per forward pass on CPU; CUDA uses ``CUDA_BATCH_FACTOR`` times more.
        mode: MONAI's blending mode, ``"gaussian"`` (the paper's) or ``"constant"``.
    """

    window_px: int
    overlap: float
    sigma_scale: float = 0.125
    sw_batch_size: int = 4
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        if self.window_px < MIN_SIDE_PX or self.window_px % 32:
            raise InputError(None, f"window {self.window_px} px must be a multiple of 32 px")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(None, f"window overlap {self.overlap} must lie in [0, 1)")
        if self.mode not in ("gaussian", "constant"):
            raise InputError(None, f"blending mode {self.mode!r}: use 'gaussian' or 'constant'")

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

    def describe(self) -> str:
        """Short text for records and reports, e.g. ``"256 px windows, stride 128 px"``."""
        return f"{self.window_px} px windows, stride {self.stride_px} px"

    @classmethod
    def from_inferer(cls, inferer: SlidingWindowInferer) -> Preset:
        """The settings of a MONAI :class:`SlidingWindowInferer` (square ``roi_size``)."""
        roi = tuple(int(side) for side in np.atleast_1d(inferer.roi_size))
        if len(set(roi)) != 1:
            raise InputError(None, f"inferer roi_size {list(roi)} must be square")
        overlap = float(np.atleast_1d(inferer.overlap)[0])
        return cls(
            window_px=roi[0],
            overlap=overlap,
            sigma_scale=float(np.atleast_1d(inferer.sigma_scale)[0]),
            sw_batch_size=int(inferer.sw_batch_size),
            mode=str(getattr(inferer.mode, "value", inferer.mode)),
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
    """``"auto"`` → the first CUDA device when present, else CPU; anything else as given.

    Raises:
        InputError: an unknown device name, or a CUDA device on a machine without one.
    """
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            None, f"unknown device {str(device)!r}: use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device {str(device)!r}: this machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(None, f"device {str(device)!r}: this machine has {count} CUDA GPU(s)")
    elif resolved.type != "cpu":
        raise InputError(None, f"device {str(device)!r}: rcmseg runs on cpu or cuda")
    return resolved


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container
    CPU set), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (default :func:`usable_cores`) and one inter-op
    thread; return the count. More threads than cores oversubscribe: a busy machine then slows
    a run far more than its fair share."""
    check_threads(threads)
    count = usable_cores() if threads is None else int(threads)
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # settable only before the first parallel work
        torch.set_num_interop_threads(1)
    return count


def check_threads(threads: int | None) -> None:
    """Refuse a ``--threads`` below 1 (``None``: the default, fine)."""
    if threads is not None and int(threads) < 1:
        raise InputError(None, f"--threads {threads}: at least 1 thread is needed")


def cpu_threads(threads: int) -> str:
    """``1 CPU thread``, ``2 CPU threads``: how runs say what they compute on."""
    return f"{threads} CPU thread{'s' if threads != 1 else ''}"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo): only
    there does bf16 pay on a CPU; elsewhere it is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_precision(precision: str, device: torch.device, amp: bool = True) -> str:
    """The precision the network runs in: ``auto`` → bf16 on CUDA GPUs that support it, fp16 on
    older ones, bf16 on CPUs that compute it natively (:func:`cpu_has_native_bf16`), fp32 on
    other CPUs, and fp32 everywhere for a network whose bundle sets ``"amp": false`` in its
    ``inference.json`` (``amp``); stitching is always float32.

    ``auto`` picks the fastest precision whose labels stay >= 99.5 % equal to float32's. Both
    backends keep the convolutions that read the image or write the class scores in float32
    (:func:`~rcmseg.networks.blocks.edge_layers_in_float32`, :func:`edge_convolutions_in_float32`):
    the default bundle's bf16 labels were then 99.6-99.9 % equal to fp32 with torch and with
    OpenVINO (docs/benchmarks.md), at equal mean Dice. A narrow network's labels can be more
    sensitive: ``rcm_lite``'s were 98.4-99.7 % equal, so its bundle sets ``amp`` false and
    runs bf16 only when asked (``--precision bf16``).

    Raises:
        InputError: an unknown precision, or fp16 on a CPU.
    """
    if precision not in PRECISIONS:
        raise InputError(None, f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "auto":
        if not amp:
            return "fp32"
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise InputError(None, "precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU")
    return precision


def get_preset(preset: str | Preset, presets: dict[str, Preset] | None = None) -> Preset:
    """Look a preset up by name in ``presets`` (default :data:`PRESETS`) or pass one through."""
    if isinstance(preset, Preset):
        return preset
    table = PRESETS if presets is None else presets
    if preset not in table:
        raise InputError(None, f"unknown preset {preset!r}; choose one of {', '.join(table)}")
    return table[preset]


def preset_name(settings: Preset, presets: dict[str, Preset] | None = None) -> str:
    """The name under which ``presets`` (default :data:`PRESETS`) holds ``settings``, else
    ``"custom"``: the bundle's ``inferer`` and ``--preset fast`` describe the same run alike."""
    table = PRESETS if presets is None else presets
    return next((name for name, preset in table.items() if preset == settings), "custom")


def check_settings(
    preset: str | Preset = "fast",
    precision: str = "auto",
    device: str | torch.device = "cpu",
    presets: dict[str, Preset] | None = None,
    backend: str = "torch",
    tta: object = False,
    amp: object = True,
) -> None:
    """Refuse an unknown preset, precision, device or backend (fp16 on a CPU, OpenVINO on a GPU
    or not installed: :func:`check_backend`), or a ``tta`` or ``amp`` that is not yes or no
    (:func:`rcmseg.errors.as_flag`), before any work; the
    bundle configs call it first, through :func:`rcmseg.errors.or_exit`, so that a bad override
    is one line rather than MONAI's traceback from inside a component.

    Raises:
        InputError: the first bad setting.
    """
    get_preset(preset, presets)
    as_flag(tta, "tta")
    as_flag(amp, "amp")
    target = resolve_device(device)
    resolve_precision(precision, target)
    check_backend(backend, target)


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse an unknown backend, and OpenVINO off the CPU or not installed.

    Raises:
        InputError: the problem, in one line.
    """
    if backend not in BACKENDS:
        raise InputError(None, f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "openvino":
        if device.type != "cpu":
            raise InputError(None, "--backend openvino runs on the CPU; use --device cpu")
        if importlib.util.find_spec("openvino") is None:
            raise InputError(None, OPENVINO_MISSING)


def preset_inferer(
    preset: str = "fast",
    roi_size: int | tuple[int, int] | None = None,
    overlap: float | None = None,
    sigma_scale: float | None = None,
    sw_batch_size: int | None = None,
    mode: str | None = None,
) -> SlidingWindowInferer:
    """A Gaussian :class:`SlidingWindowInferer` with a preset's settings, any of them overridden.

    The bundle's ``inference.json`` builds its ``inferer`` with this, so ``--preset paper`` and
    MONAI overrides such as ``--inferer#overlap 0.75`` both reach the engine.
    """
    settings = get_preset(preset)
    side = roi_size if roi_size is not None else settings.window_px
    return SlidingWindowInferer(
        roi_size=(side, side) if isinstance(side, int) else tuple(side),
        sw_batch_size=settings.sw_batch_size if sw_batch_size is None else sw_batch_size,
        overlap=settings.overlap if overlap is None else overlap,
        mode=settings.mode if mode is None else mode,
        sigma_scale=settings.sigma_scale if sigma_scale is None else sigma_scale,
        padding_mode="constant",
        cval=0.0,
    )


def context_span(first: int, last: int, length: int, window: int, stride: int) -> tuple[int, int]:
    """Pixels ``[start, stop)`` of an axis to run MONAI on so that pixels ``first..last`` come out
    exactly as in a whole-axis run: from the first grid window that reaches ``first`` to the end
    of the last grid window that reaches ``last`` (see the module docstring)."""
    if length <= window:
        return 0, length  # one (padded) window covers the axis
    touching = [
        s for s in window_starts(length, window, stride) if s <= last and s + window > first
    ]
    return touching[0], touching[-1] + window


def auto_band_px(width: int, num_classes: int = NUM_CLASSES) -> int:
    """Rows per band so that a band's stitching buffers take about :data:`BAND_BUDGET_MB`."""
    bytes_per_row = width * (num_classes + 1) * 4  # float32 class sums and the weight map
    return max(int(BAND_BUDGET_MB * 2**20 // bytes_per_row), MIN_WINDOW_PX)


def pixel_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Per-pixel entropy of (K, h, w) probabilities in nats: float32 (h, w) from 0 to ln K."""
    clipped = np.clip(probabilities, 1e-12, 1.0)
    return -(probabilities * np.log(clipped)).sum(axis=0, dtype=np.float32)


def windows_per_pixel(preset: str | Preset) -> float:
    """How many windows cover an interior pixel: the cost of a preset relative to tiling."""
    settings = get_preset(preset)
    return (settings.window_px / settings.stride_px) ** 2


class OpenVINONetwork:
    """``network`` converted once to an OpenVINO model, with the softmax over classes in the
    graph, and compiled for the CPU with a static shape per window size: (``batch_size``, 1, h,
    w) float32 in, class probabilities out. Under bf16 the convolutions that read the image or
    write the class scores stay float32, as under torch's autocast
    (:func:`edge_convolutions_in_float32`).

    Nothing is kept on disk unless ``cache_dir`` is given on purpose (the conversion passes
    through a scratch folder that is removed): then the converted model is kept there as
    OpenVINO IR (``<key>.xml``/``.bin``, the key a hash of the network's architecture and weights,
    of the torch and OpenVINO versions and of :data:`OPENVINO_IR_FORMAT`) and later runs read it
    instead of converting again (about 2 s of tracing for ``rcm_lite``'s network).

    Static shapes let OpenVINO's CPU plugin plan its activation memory once: with the bundle's
    DynUNet and batches of 8 windows of 256² it grew by 257 MB against 437 MB with a dynamic
    batch and window (docs/benchmarks.md). Shorter batches are padded with empty windows (an
    image ends on at most one), longer ones split. At most :attr:`MAX_SHAPES` window shapes stay
    compiled (two: a non-square window and its 90° turn under TTA).
    """

    MAX_SHAPES = 2

    def __init__(
        self,
        network: nn.Module,
        precision: str,
        batch_size: int,
        window: tuple[int, int],
        cache_dir: str | Path | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise InputError(None, f"--backend openvino runs fp32 or bf16, not {precision}")
        try:
            import openvino
        except ImportError:
            raise InputError(None, OPENVINO_MISSING) from None
        self._openvino = openvino
        self.batch_size = batch_size
        self._hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        # the softmax in the graph runs in OpenVINO's threads: ~0.6 ms less per 256² window
        with_softmax = nn.Sequential(network, nn.Softmax(dim=1))
        self.cached = False
        cache = None if cache_dir is None else Path(cache_dir)
        self._model = self._load(with_softmax, window, cache)
        self._compiled: dict[tuple[int, int], object] = {}
        # the preset's window now, so that the precision it runs is known at start
        self.precision = openvino_precision(self.compiled(window))

    def _convert(self, network: nn.Module, window: tuple[int, int]) -> object:
        with torch.no_grad():
            return self._openvino.convert_model(
                network.to(memory_format=torch.contiguous_format).eval(),
                example_input=torch.zeros(1, 1, *window),
                input=[self._openvino.PartialShape([-1, 1, -1, -1])],
            )

    def _load(self, network: nn.Module, window: tuple[int, int], cache_dir: Path | None) -> object:
        """The converted model with its edge convolutions kept float32
        (:func:`edge_convolutions_in_float32`, a mark only the IR reader takes, so the model goes
        through IR in a scratch folder). With ``cache_dir`` the IR is kept there and read back by
        later runs: the ``.bin`` is moved into place before the ``.xml``, so a present ``.xml``
        always has its whole ``.bin`` (two runs filling the cache at once write equal files)."""
        core = self._openvino.Core()
        if cache_dir is not None:
            key = network_cache_key(network, self._openvino.__version__, OPENVINO_IR_FORMAT)
            xml = cache_dir / f"{key}.xml"
            if xml.is_file():
                self.cached = True
                return core.read_model(xml)
        model = self._convert(network, window)
        where = cache_dir if cache_dir is not None else Path(tempfile.gettempdir())
        try:
            where.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=where, prefix=".converting-") as scratch:
                written = Path(scratch) / "network.xml"
                self._openvino.save_model(model, written, compress_to_fp16=False)
                marked = edge_convolutions_in_float32(written.read_text(encoding="utf-8"))
                if cache_dir is None:
                    weights = written.with_suffix(".bin").read_bytes()
                    return core.read_model(marked.encode(), weights)
                written.write_text(marked, encoding="utf-8")
                copy_atomic(written.with_suffix(".bin"), xml.with_suffix(".bin"))
                copy_atomic(written, xml)
        except OSError as error:
            what = "keep the converted network" if cache_dir else "convert the network (scratch)"
            raise InputError(where, f"cannot {what} here: {os_reason(error)}") from None
        return core.read_model(xml)

    def compiled(self, window: tuple[int, int]) -> object:
        """The model compiled for (``batch_size``, 1, *window*) inputs, on as many threads as
        torch has (:func:`configure_threads`)."""
        window = (int(window[0]), int(window[1]))
        if window not in self._compiled:
            if len(self._compiled) >= self.MAX_SHAPES:
                self._compiled.pop(next(iter(self._compiled)))
            self._model.reshape([self.batch_size, 1, *window])
            # as many threads as torch was given (configure_threads: the usable cores, or
            # --threads); left alone, OpenVINO takes every core of the machine
            settings = {
                "INFERENCE_PRECISION_HINT": self._hint,
                "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            }
            self._compiled[window] = self._openvino.compile_model(self._model, "CPU", settings)
        return self._compiled[window]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Class probabilities (B, K, h, w) float32 of ``windows`` (B, 1, h, w) float32, any B."""
        compiled = self.compiled(windows.shape[2:])
        probabilities = []
        for first in range(0, windows.shape[0], self.batch_size):
            batch = windows[first : first + self.batch_size]
            count = batch.shape[0]
            if count < self.batch_size:
                padding = np.zeros((self.batch_size - count, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, padding])
            probabilities.append(np.asarray(compiled(batch)[0], dtype=np.float32)[:count])
        return np.concatenate(probabilities)


# The IR runtime attribute that keeps a node in its own precision (float32) when OpenVINO's CPU
# plugin runs the rest in bf16; its Python API cannot set it, the IR reader does. Bump the format
# when the marks change, so that kept conversions are made again.
_KEEP_FLOAT32 = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
OPENVINO_IR_FORMAT = "edges-float32-1"


def edge_convolutions_in_float32(
    ir_xml: str, image_channels: int = 1, num_classes: int = NUM_CLASSES
) -> str:
    """OpenVINO IR (the ``.xml`` text) with the convolutions that read the image or write the
    class scores (:func:`~rcmseg.networks.blocks.is_edge_convolution`, by their weights' shape)
    marked to stay float32 under a bf16 inference precision, as torch's autocast path keeps them
    (:func:`~rcmseg.networks.blocks.edge_layers_in_float32`). Unmarked, OpenVINO ran them in bf16
    and the default bundle's labels were 99.2 % equal to float32's on real textures; marked,
    99.6 % (docs/benchmarks.md). Under float32 the marks change nothing."""
    root = ElementTree.fromstring(ir_xml)
    for layer in root.iter("layer"):
        kind = layer.get("type")
        if kind not in ("Convolution", "ConvolutionBackpropData"):
            continue
        weight_port = layer.find("input").findall("port")[1]
        dims = [int(dim.text) for dim in weight_port.findall("dim")]
        if len(dims) < 2:
            continue
        # weights are (out, in, kh, kw), a transposed convolution's (in, out, kh, kw)
        out_channels, in_channels = dims[:2] if kind == "Convolution" else dims[1::-1]
        if is_edge_convolution(in_channels, out_channels, image_channels, num_classes):
            rt_info = layer.find("rt_info")
            if rt_info is None:
                rt_info = ElementTree.SubElement(layer, "rt_info")
            ElementTree.SubElement(rt_info, "attribute", _KEEP_FLOAT32)
    return ElementTree.tostring(root, encoding="unicode")


def network_cache_key(network: nn.Module, *versions: str) -> str:
    """A hex digest of ``network``'s architecture (its module tree), weights and buffers, and
    ``versions`` (plus torch's): networks that differ in any of them get different keys."""
    digest = hashlib.sha256(repr(network).encode())
    for version in (torch.__version__, *versions):
        digest.update(version.encode())
    for name, tensor in network.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:32]


def openvino_precision(compiled: object) -> str:
    """The precision a compiled OpenVINO model really runs in (``fp32`` or ``bf16``): on a CPU
    without native bf16 OpenVINO takes a bf16 hint and silently runs float32."""
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(ran, ran)


def dihedral_mean(
    predict: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor
) -> torch.Tensor:
    """Test-time augmentation: mean of ``predict`` over the 8 flips/90° rotations of ``windows``
    (B, C, h, w), each result turned back; the network must be fully convolutional."""
    total = torch.zeros((), device=windows.device)
    for turns in range(4):
        for flip in (False, True):
            view = torch.rot90(windows, turns, dims=(2, 3))
            view = torch.flip(view, dims=(3,)) if flip else view
            out = predict(view)
            out = torch.flip(out, dims=(3,)) if flip else out
            total = total + torch.rot90(out, -turns, dims=(2, 3))
    return total / 8


@dataclass
class SegmentationMaps:
    """Per-pixel results of an image or region at the working resolution, and per-class sums.

    ``labels`` uint8 (h, w); ``counts`` (K,) pixels per winning class; ``confidence_sums`` (K,) sum
    of the winning probability per class; ``probabilities`` float32 (K, h, w) and ``entropy``
    float32 (h, w) in nats only when asked for (they are the only full-size float arrays).
    """

    labels: np.ndarray
    counts: np.ndarray
    confidence_sums: np.ndarray
    probabilities: np.ndarray | None = None
    entropy: np.ndarray | None = None

    @classmethod
    def empty(
        cls, height: int, width: int, num_classes: int, probabilities: bool, entropy: bool
    ) -> SegmentationMaps:
        return cls(
            labels=np.empty((height, width), dtype=np.uint8),
            counts=np.zeros(num_classes, dtype=np.int64),
            confidence_sums=np.zeros(num_classes, dtype=np.float64),
            probabilities=(
                np.empty((num_classes, height, width), np.float32) if probabilities else None
            ),
            entropy=np.empty((height, width), np.float32) if entropy else None,
        )

    def add_band(self, row: int, band: np.ndarray) -> None:
        """Store the (K, h, w) probabilities of rows ``row .. row + h`` and update the sums."""
        rows = slice(row, row + band.shape[1])
        # torch's max over classes: winner (first on ties, as argmax) and its probability in one
        # threaded pass; numpy's argmax over the first axis took 0.9 s on a 12000² mosaic
        confidence, winner = torch.from_numpy(band).max(dim=0)
        labels = winner.numpy().astype(np.uint8)
        num_classes = band.shape[0]
        self.labels[rows] = labels
        self.counts += np.bincount(labels.ravel(), minlength=num_classes)
        self.confidence_sums += np.bincount(
            labels.ravel(), weights=confidence.numpy().ravel(), minlength=num_classes
        )
        if self.probabilities is not None:
            self.probabilities[:, rows] = band
        if self.entropy is not None:
            self.entropy[rows] = pixel_entropy(band)


@dataclass
class SegmentationEngine:
    """A network ready to segment images, built once and shared by every caller.

    Batch norms are folded into the convolutions and, for torch, instance norms become group
    norms once (:func:`~rcmseg.networks.blocks.inference_copy`; the given network is left as it
    is), the copy is moved to ``device`` in channels-last layout (about 2x faster convolutions on
    CPU) and runs in ``precision`` under autocast, all but the layers that read the image or
    write the class scores, which stay float32
    (:func:`~rcmseg.networks.blocks.edge_layers_in_float32`); stitching stays float32.

    Args:
        network: maps (B, 1, h, w) in [0, 1] to (B, K, h, w) logits (eval mode is set on the copy).
        preset: a name in ``presets`` (default :data:`PRESETS`) or a :class:`Preset`.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
        precision: one of :data:`PRECISIONS` (see :func:`resolve_precision`).
        tta: average the probabilities of the 8 flips/90° rotations of every window (8x cost).
        presets: named presets to look ``preset`` up in (a bundle's, say).
        backend: ``"torch"``, or ``"openvino"`` (CPU only, extra ``rcmseg[openvino]``): the
            folded network converted once, in memory, to an OpenVINO model compiled for the
            preset's batch and window (:class:`OpenVINONetwork`), run at ``precision`` (fp32 or
            bf16) by OpenVINO's CPU plugin.
        openvino_cache: a folder to keep the converted OpenVINO model in and reuse on later runs
            (:class:`OpenVINONetwork`); ``None``: convert in memory, write nothing.
        amp: whether ``precision="auto"`` may pick a reduced precision for this network (a
            bundle's ``inference.json`` ``amp``; :func:`resolve_precision`).
    """

    network: nn.Module
    preset: str | Preset = "fast"
    device: str | torch.device = "cpu"
    precision: str = "auto"
    tta: bool = False
    presets: dict[str, Preset] | None = None
    backend: str = "torch"
    openvino_cache: str | Path | None = None
    amp: bool = True
    settings: Preset = field(init=False)
    model: nn.Module = field(init=False, repr=False)
    precision_note: str = field(init=False, default="")

    def __post_init__(self) -> None:
        read_flags(self)
        self.settings = get_preset(self.preset, self.presets)
        self.preset_name = (
            self.preset
            if isinstance(self.preset, str)
            else preset_name(self.settings, self.presets)
        )
        self.device = resolve_device(self.device)
        asked = self.precision
        self.precision = resolve_precision(asked, self.device, self.amp)
        if self.precision != resolve_precision(asked, self.device):  # say why auto chose fp32
            self.precision_note = " (auto: the bundle sets amp false)"
        model = inference_copy(self.network, group_norms=self.backend != "openvino")
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self._openvino: OpenVINONetwork | None = None
        check_backend(self.backend, self.device)
        if self.backend == "openvino":
            window = (self.settings.window_px, self.settings.window_px)
            self._openvino = OpenVINONetwork(
                self.model,
                self.precision,
                self.settings.sw_batch_size,
                window,
                cache_dir=self.openvino_cache,
            )
            ran = self._openvino.precision
            if ran != self.precision:  # record what ran, not what was asked
                asked = self.precision
                self.precision_note = f" ({asked} asked; OpenVINO has no {asked} on this CPU)"
                self.precision = ran
        elif self.precision in _AUTOCAST_DTYPES:
            edge_layers_in_float32(self.model)
            if self.device.type == "cpu" and self.precision == "bf16" and not cpu_has_native_bf16():
                # torch emulates bf16 without AVX512-BF16/AMX: measured 8.2x slower than fp32
                self.precision_note = " (emulated: no native bf16 on this CPU, slower than fp32)"

    def describe(self, with_device: bool = True) -> str:
        """What segments, e.g. ``"fast (256 px windows, stride 128 px), fp32, cpu"``."""
        tta = ", 8-fold TTA" if self.tta else ""
        where = f", {self.device}" if with_device else ""
        backend = ", OpenVINO" if self.backend == "openvino" else ""
        settings = self.settings.describe()
        precision = f"{self.precision}{self.precision_note}"
        return f"{self.preset_name} ({settings}), {precision}{backend}{tta}{where}"

    def _predict(self, windows: torch.Tensor) -> torch.Tensor:
        if self._openvino is not None:
            return torch.from_numpy(self._openvino(windows.contiguous().numpy()))
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        autocast = (
            torch.autocast(device_type=windows.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.model(windows.contiguous(memory_format=torch.channels_last))
        return torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def window_probabilities(self, windows: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, h, w) float32 of a batch of windows (B, 1, h, w) in [0, 1]
        on the engine's device, as the sliding window sees them (precision, backend, TTA)."""
        return self._predictor()(windows)

    def _predictor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.tta:
            return lambda windows: dihedral_mean(self._predict, windows)
        return self._predict

    def _inferer(self, window: tuple[int, int]) -> SlidingWindowInferer:
        on_cuda = self.device.type == "cuda"
        return SlidingWindowInferer(
            roi_size=window,
            sw_batch_size=self.settings.sw_batch_size * (CUDA_BATCH_FACTOR if on_cuda else 1),
            overlap=self.settings.overlap,
            mode=self.settings.mode,
            sigma_scale=self.settings.sigma_scale,
            padding_mode="constant",
            cval=0.0,
            sw_device=self.device,
            device=self.device,
        )

    def band_count(self, height: int, width: int, band_px: int | None = None) -> int:
        """How many bands :meth:`iter_bands` takes for an image (progress bars)."""
        return math.ceil(height / (band_px or auto_band_px(width)))

    def iter_bands(
        self,
        image: np.ndarray,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        band_px: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Probabilities of ``image[rows, cols]`` band by band, as a whole-image run gives them.

        Args:
            image: float32 (H, W) on the 0-255 scale at the working resolution (2 µm/px).
            rows, cols: the region ``[start, stop)`` per axis (default: the whole image).
            band_px: output rows per band (default :func:`auto_band_px`); stitching memory grows
                with ``band_px × W``, not with ``H × W``.

        Yields:
            ``(r0, probabilities)``: float32 (K, h, w) of region rows ``[r0, r0 + h)`` (``r0``
            counted from the region's first row), columns ``cols``.
        """
        height, width = image.shape
        if min(height, width) < MIN_SIDE_PX:
            raise InputError(
                None, f"image {width}×{height} px is below the {MIN_SIDE_PX} px minimum side"
            )
        y0, y1 = rows or (0, height)
        x0, x1 = cols or (0, width)
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise InputError(None, f"region rows {y0}..{y1}, columns {x0}..{x1} outside the image")
        window = self.settings.window_for(height, width)
        stride = self.settings.stride_px
        inferer = self._inferer(window)
        predict = self._predictor()
        c0, c1 = context_span(x0, x1 - 1, width, window[1], stride)
        band_px = max(band_px or auto_band_px(width), 1)
        with torch.inference_mode():
            for r0 in range(y0, y1, band_px):
                r1 = min(r0 + band_px, y1)
                b0, b1 = context_span(r0, r1 - 1, height, window[0], stride)
                block = np.ascontiguousarray(image[b0:b1, c0:c1], dtype=np.float32)
                tensor = (torch.from_numpy(block) / INTENSITY_MAX)[None, None].to(self.device)
                blended = inferer(tensor, predict)
                band = blended[0, :, r0 - b0 : r1 - b0, x0 - c0 : x1 - c0]
                yield r0 - y0, band.float().cpu().numpy()

    def segment(
        self,
        image: np.ndarray,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        probabilities: bool = False,
        entropy: bool = False,
        band_px: int | None = None,
        on_band: Callable[[], None] | None = None,
    ) -> SegmentationMaps:
        """Labels (and, when asked, probabilities and entropy) of an image or a region of it.

        A region's maps equal the same pixels of the whole image's maps. ``on_band`` is called
        after each band (progress).
        """
        y0, y1 = rows or (0, image.shape[0])
        x0, x1 = cols or (0, image.shape[1])
        maps: SegmentationMaps | None = None
        for r0, band in self.iter_bands(image, rows, cols, band_px):
            if maps is None:
                maps = SegmentationMaps.empty(
                    y1 - y0, x1 - x0, band.shape[0], probabilities, entropy
                )
            maps.add_band(r0, band)
            if on_band is not None:
                on_band()
        assert maps is not None  # a region has at least one row
        return maps

    def probabilities(self, image: np.ndarray, band_px: int | None = None) -> np.ndarray:
        """float32 (K, H, W) class probabilities of a whole image (sum 1 over K per pixel)."""
        maps = self.segment(image, probabilities=True, band_px=band_px)
        assert maps.probabilities is not None
        return maps.probabilities

    def labels(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W) class indices of a whole image."""
        return self.segment(image).labels


def segment_image(
    image: np.ndarray,
    network: nn.Module,
    preset: str | Preset = "fast",
    device: str | torch.device = "cpu",
    band_px: int | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """Probabilities float32 (K, H, W) of a whole image: a one-off :class:`SegmentationEngine`."""
    engine = SegmentationEngine(network, preset, device, precision=precision)
    return engine.probabilities(image, band_px=band_px)
