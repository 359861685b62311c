"""Find and load the MONAI bundle that ``rcmseg batch`` segments with.

A bundle is a folder ``configs/metadata.json`` + ``configs/inference.json`` + ``models/model.pt``
(MONAI Bundle specification). The network comes from ``network_def`` in ``inference.json`` (so
``monai.bundle run``, ``ckpt_export`` and rcmseg build the same network) and its weights from
``models/model.pt`` (or the ``ckpt_path`` given), loaded with ``torch.load(weights_only=True)``:
no pickled code is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape
from torch import nn

from rcmseg.classes import CLASS_NAMES, WORKING_MPP
from rcmseg.errors import InputError
from rcmseg.inference import PRESETS, Preset, SegmentationEngine, cpu_threads, resolve_device
from rcmseg.io.mosaics import pixel_size

BUNDLE_ENV_VAR = "RCMSEG_BUNDLE"
METADATA_FILE = Path("configs/metadata.json")
INFERENCE_FILE = Path("configs/inference.json")
WEIGHTS_FILE = Path("models/model.pt")


@dataclass(frozen=True, eq=False)  # identity hash: one engine cache entry per load
class LoadedBundle:
    """A bundle ready to segment.

    Attributes:
        root: the bundle folder.
        network: the network in eval mode with the bundle's weights, on ``device``.
        device: where the network lives.
        name: bundle name (``metadata.json`` ``name``, else the folder name).
        version: bundle version (``metadata.json`` ``version``).
        model: network class and a short hash of the weights, e.g. ``MEDNet@1a2b3c4d5e6f``.
        class_names: output channel names in channel order (``channel_def`` of ``pred``).
        working_mpp: µm/px at which the network sees mosaics.
        presets: sliding-window presets (rcmseg's, overridden by ``inference.json`` ``presets``).
        intended_use: the bundle's statement of what its weights are fit for.
        amp: whether ``precision="auto"`` may run the network in reduced precision
            (``inference.json`` ``amp``, default true; :func:`rcmseg.inference.resolve_precision`).
    """

    root: Path
    network: nn.Module
    device: torch.device
    name: str
    version: str
    model: str
    class_names: tuple[str, ...]
    working_mpp: float
    presets: dict[str, Preset]
    intended_use: str
    amp: bool = True

    def engine(
        self,
        preset: str | Preset = "fast",
        precision: str = "auto",
        tta: bool = False,
        backend: str = "torch",
        openvino_cache: str | Path | None = None,
    ) -> SegmentationEngine:
        """A :class:`~rcmseg.inference.SegmentationEngine` for this bundle's network."""
        return SegmentationEngine(
            self.network,
            preset,
            self.device,
            precision=precision,
            tta=tta,
            presets=self.presets,
            backend=backend,
            openvino_cache=openvino_cache,
            amp=self.amp,
        )

    def start_lines(self, engine: SegmentationEngine, threads: int) -> list[str]:
        """What a run says once when it starts (rich markup): what the weights are fit for, and
        how it segments (:func:`segmenting_with`)."""
        intended = (
            f"[yellow]{escape(f'{self.name} {self.version}:')}[/] {escape(self.intended_use)}"
        )
        segmenting = escape(segmenting_with(engine, threads))
        return [intended, segmenting] if self.intended_use else [segmenting]


def segmenting_with(engine: SegmentationEngine, threads: int) -> str:
    """``segmenting with fast (256 px windows, stride 128 px), fp32, cpu, 2 CPU threads``."""
    where = f", {cpu_threads(threads)}" if engine.device.type == "cpu" else ""
    return f"segmenting with {engine.describe()}{where}"


# the shipped bundles: next to the rcmseg package in a source tree (editable install)
BUNDLES_DIR = Path(__file__).resolve().parent.parent / "bundles"


def default_bundle_dir() -> Path:
    """The bundle used when none is given: ``$RCMSEG_BUNDLE``, else ``bundles/rcm_mednet``
    (``bundles/rcm_lite`` is its small, distilled counterpart for CPUs)."""
    override = os.environ.get(BUNDLE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return BUNDLES_DIR / "rcm_mednet"


def read_json(path: Path) -> dict:
    """Read a JSON object, turning a missing or malformed file into an :class:`InputError`."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "missing: not a MONAI bundle (see --bundle)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not readable JSON ({error})") from None
    if not isinstance(content, dict):
        raise InputError(path, "expected a JSON object")
    return content


def channel_names(metadata: dict, path: Path) -> tuple[str, ...]:
    """Output class names, in channel order, from ``network_data_format.outputs.pred``."""
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        return tuple(channel_def[key] for key in sorted(channel_def, key=int))
    except (KeyError, TypeError, ValueError):
        raise InputError(path, "no network_data_format.outputs.pred.channel_def") from None


def build_network(root: Path) -> nn.Module:
    """Instantiate ``network_def`` from the bundle's ``inference.json`` (and its metadata)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / INFERENCE_FILE))
    parser.read_meta(str(root / METADATA_FILE))
    parser["bundle_root"] = str(root)
    try:
        return parser.get_parsed_content("network_def")
    except Exception as error:  # a config error: report it as the user's input
        raise InputError(root / INFERENCE_FILE, f"cannot build network_def ({error})") from None


def load_weights(network: nn.Module, path: Path) -> str:
    """Load a weights-only state dict into ``network``; return a short SHA-256 of the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "missing: no such weights file") from None
    except Exception as error:  # pickle with code, truncated zip, not a torch file
        raise InputError(path, f"not a weights-only PyTorch state dict ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a checkpoint that nests the weights
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        problem = str(error).splitlines()[0]
        raise InputError(path, f"weights do not fit network_def ({problem})") from None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def bundle_presets(inference_config: dict) -> dict[str, Preset]:
    """rcmseg's presets, with any ``presets`` block of ``inference.json`` overriding them."""
    presets = dict(PRESETS)
    for name, settings in inference_config.get("presets", {}).items():
        presets[name] = Preset(**settings)
    return presets


def load_bundle(
    bundle_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    network: nn.Module | None = None,
    ckpt_path: str | Path | None = None,
    working_mpp: float | None = None,
) -> LoadedBundle:
    """Load a bundle's network with its weights, in eval mode on ``device``.

    Args:
        bundle_dir: the bundle folder; ``None`` for :func:`default_bundle_dir`.
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
        network: the network to load the weights into (``inference.json`` passes its parsed
            ``network_def``, so MONAI overrides of it count); default: built from the file.
        ckpt_path: the weights (default ``models/model.pt``; ``--ckpt_path`` in MONAI's CLI).
        working_mpp: µm/px the network sees (default ``working_mpp`` of ``inference.json``).

    Raises:
        InputError: a missing or malformed bundle file, missing weights, or weights that do not
            fit the network.
    """
    root = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    if root.is_file():  # e.g. a bundle downloaded as a .zip
        raise InputError(root, "is a file, not a bundle folder; unpack it and pass the folder")
    if not root.is_dir():
        raise InputError(root, "bundle folder not found")
    metadata = read_json(root / METADATA_FILE)
    inference_config = read_json(root / INFERENCE_FILE)
    target = resolve_device(device)
    network = network if network is not None else build_network(root)
    weights = Path(ckpt_path) if ckpt_path is not None else root / WEIGHTS_FILE
    weights_hash = load_weights(network, weights)
    class_names = channel_names(metadata, root / METADATA_FILE)
    if len(class_names) != len(CLASS_NAMES):
        raise InputError(root / METADATA_FILE, f"{len(class_names)} output classes, expected 6")
    if working_mpp is None:
        working_mpp = inference_config.get("working_mpp", WORKING_MPP)
    if pixel_size(working_mpp) is None:  # also a word from MONAI's command line
        raise InputError(root / INFERENCE_FILE, f"working_mpp {working_mpp} must be above 0")
    amp = inference_config.get("amp", True)
    if not isinstance(amp, bool):
        raise InputError(root / INFERENCE_FILE, f"amp must be true or false, not {amp!r}")
    return LoadedBundle(
        root=root,
        network=network.to(target).eval(),
        device=target,
        name=str(metadata.get("name", root.name)),
        version=str(metadata.get("version", "unknown")),
        model=f"{type(network).__name__}@{weights_hash}",
        class_names=class_names,
        working_mpp=float(working_mpp),
        presets=bundle_presets(inference_config),
        intended_use=str(metadata.get("intended_use", "")),
        amp=amp,
    )
