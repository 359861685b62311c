"""Segmentation networks: MED-Net (1-3 levels) and the paper's ~6 M parameter baselines.

All networks take (B, in_channels, H, W) with H and W multiples of 32 and give logits
(B, out_channels, H, W); MED-Net in training mode gives a list of logits coarse to fine.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from rcmseg.classes import NUM_CLASSES
from rcmseg.networks.baselines import DeepLab, FCN32s, SegNet, unet
from rcmseg.networks.mednet import DEFAULT_WIDTHS, MEDNet

__all__ = [
    "DEFAULT_WIDTHS",
    "NETWORK_NAMES",
    "DeepLab",
    "FCN32s",
    "MEDNet",
    "SegNet",
    "count_parameters",
    "get_network",
    "unet",
]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mednet": partial(MEDNet, levels=3),
    "mednet2": partial(MEDNet, levels=2),
    "mednet1": partial(MEDNet, levels=1),
    "unet": unet,
    "fcn": FCN32s,
    "segnet": SegNet,
    "deeplab": DeepLab,
}
NETWORK_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_network(
    name: str, in_channels: int = 1, out_channels: int = NUM_CLASSES, **kwargs: object
) -> nn.Module:
    """Build the network called ``name`` (one of :data:`NETWORK_NAMES`).

    ``kwargs`` go to the network's constructor (e.g. ``widths`` for MED-Net).
    """
    key = name.lower()
    if key not in _FACTORIES:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}")
    return _FACTORIES[key](in_channels=in_channels, out_channels=out_channels, **kwargs)


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters of ``network``."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
