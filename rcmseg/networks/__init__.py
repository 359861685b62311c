"""Segmentation networks: MED-Net (1-3 levels, FCN or U-Net-like levels), the paper's ~6 M
parameter baselines and MONAI's DynUNet (nnU-Net).

All networks take (B, in_channels, H, W) with H and W multiples of 32 and give logits
(B, out_channels, H, W); MED-Net in training mode gives a list of logits coarse to fine.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from rcmseg.classes import NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.networks.baselines import DeepLab, DynUNet2D, FCN32s, SegNet, dynunet, unet
from rcmseg.networks.mednet import (
    DEFAULT_WIDTHS,
    DEPTH_ORDERS,
    DYNUNET_WIDTHS,
    GATES,
    PRIORS,
    UNET_WIDTHS,
    WIDTH_TABLES,
    MEDNet,
    MEDNetUNet,
)

__all__ = [
    "DEFAULT_WIDTHS",
    "DEPTH_ORDERS",
    "DYNUNET_WIDTHS",
    "GATES",
    "NETWORK_NAMES",
    "PAPER_READING",
    "PRIORS",
    "UNET_WIDTHS",
    "WIDTH_TABLES",
    "DeepLab",
    "DynUNet2D",
    "FCN32s",
    "MEDNet",
    "MEDNetUNet",
    "SegNet",
    "count_parameters",
    "dynunet",
    "get_network",
    "side_multiple",
    "unet",
]

# The paper-faithful MED-Net: every choice the paper leaves open set by measurement (issue 11,
# docs/benchmarks.md "The paper-faithful MED-Net"): coarser levels deeper (its "two additional
# blocks" reading), the softmax label prior passed on without gradient, and the feature-sharing
# gate read as the squeeze-and-excitation sigmoid of the attention it cites (Roy et al. 2018).
# Three seeds on real textures: 0.714 / 0.324 Dice (in domain / other digitisation) against 0.359
# / 0.219 for rcmseg <= 0.4's reading, now "mednet_legacy" (it loads those weights).
PAPER_READING: dict[str, str | bool] = {
    "depth_order": "deeper_coarse",
    "detach_prior": True,
    "gate": "sigmoid",
}

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mednet": partial(MEDNet, levels=3, **PAPER_READING),
    "mednet2": partial(MEDNet, levels=2, **PAPER_READING),
    "mednet1": partial(MEDNet, levels=1),
    # rcmseg <= 0.4's MED-Net (the figure's shallower coarse levels, prior with gradient, raw
    # product gate): the architecture of bundle <= 0.3.0's weights
    "mednet_legacy": partial(MEDNet, levels=3),
    "mednet2_legacy": partial(MEDNet, levels=2),
    "unet": unet,
    "fcn": FCN32s,
    "segnet": SegNet,
    "deeplab": DeepLab,
    # issue 11: MED-Net with U-Net-like levels, and nnU-Net's architecture as a baseline
    "mednet_unet": partial(MEDNetUNet, levels=3),
    "dynunet": dynunet,
    # nnU-Net's own training setup: DynUNet with deep supervision (auxiliary heads at 1/2 and 1/4,
    # MED-Net's third idea); in eval mode the same network as "dynunet" plus two unused heads
    "dynunet_ds": partial(dynunet, deep_supervision=True),
    # issue 13: the same architecture a quarter as wide (8-16-32-64-128: 0.49 M parameters, 1.5
    # against 23.1 GFLOP per 256² window), for CPUs: the network of the rcm_lite bundle, distilled
    # from the default one (rcmseg.training.distill)
    "dynunet_tiny": partial(dynunet, filters=(8, 16, 32, 64, 128), deep_supervision=True),
    # measured winners of the issue-11 diagnosis (docs/benchmarks.md, "MED-Net diagnosis"):
    # the paper's "two additional blocks" reading (coarser levels deeper), with and without the
    # label prior
    "mednet_deep": partial(MEDNet, levels=3, depth_order="deeper_coarse"),
    "mednet_deep_noprior": partial(MEDNet, levels=3, depth_order="deeper_coarse", prior="none"),
    # the best MED-Net of the final comparison: U-Net-like levels, no label prior, residual
    # gate, instance norm (5.89 M parameters)
    "mednet_unet_in": partial(MEDNetUNet, levels=3, prior="none", gate="residual", norm="instance"),
    # MED-Net whose levels are nnU-Net's (DynUNet's blocks), with mednet_unet_in's nesting
    # (6.02 M parameters; one level of it is DynUNet itself)
    "mednet_dynunet": partial(
        MEDNet, levels=3, level="dynunet", prior="none", gate="residual", norm="instance"
    ),
}
NETWORK_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_network(
    name: str, in_channels: int = 1, out_channels: int = NUM_CLASSES, **kwargs: object
) -> nn.Module:
    """Build the network called ``name`` (one of :data:`NETWORK_NAMES`).

    ``kwargs`` go to the network's constructor (e.g. ``widths`` for MED-Net). The name and
    settings come from a config or the command line, so settings the constructor refuses
    (a wrong keyword, too few ``filters``) are an InputError naming the network.
    """
    factory = network_factory(name)
    try:
        return factory(in_channels=in_channels, out_channels=out_channels, **kwargs)
    except (TypeError, ValueError) as error:
        raise InputError(None, f"network {name!r}: {error}") from error


def network_factory(name: str) -> Callable[..., nn.Module]:
    """The constructor behind ``name`` (any case), or an InputError naming the choices (the name
    comes from a config or the command line)."""
    key = str(name).lower()
    if key not in _FACTORIES:
        raise InputError(
            None, f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}"
        )
    return _FACTORIES[key]


def side_multiple(network: nn.Module) -> int:
    """What input sides ``network`` (or the module a DDP wrapper holds) needs to be a multiple
    of, in px: MED-Net says (32, or up to 128 with deeper coarse levels); 32 otherwise."""
    return int(getattr(getattr(network, "module", network), "side_multiple", 32))


def count_parameters(network: nn.Module) -> int:
    """Number of trainable parameters of ``network``."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
