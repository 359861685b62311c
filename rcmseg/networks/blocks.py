"""Building blocks of MED-Net: residual encoder and decoder blocks, He-normal initialisation.

All blocks are 2D and keep MONAI's (B, C, H, W) layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rcmseg.classes import NUM_CLASSES

# PyTorch/MONAI's usual slope; the paper does not give one (Keras' LeakyReLU default is 0.3).
NEGATIVE_SLOPE: float = 0.01
NORMS: tuple[str, ...] = ("batch", "instance")


class ResidualBlock(UnetResBlock):
    """He et al.'s residual block: conv3x3-BN-LeakyReLU-conv3x3-BN, plus shortcut, then LeakyReLU.

    The shortcut is a projection (1x1 conv + BN) whenever the width or the size changes, identity
    otherwise. ``stride=2`` in the first convolution (and the projection) halves H and W.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        stride: stride of the first convolution (1 or 2).
        negative_slope: slope of the leaky ReLU for negative inputs.
        norm: ``"batch"`` (default; folded into the convolutions for inference) or
            ``"instance"`` (affine instance norm, nnU-Net's: statistics of each image itself).

    Shapes: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        negative_slope: float = NEGATIVE_SLOPE,
        norm: str = "batch",
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=3,
            stride=stride,
            norm_name="batch" if norm == "batch" else ("instance", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": negative_slope}),
        )


class DecoderBlock(nn.Sequential):
    """Bilinear 2x upsampling followed by a :class:`ResidualBlock`.

    Shapes: (B, C_in, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        negative_slope: float = NEGATIVE_SLOPE,
        norm: str = "batch",
    ) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            ResidualBlock(in_channels, out_channels, 1, negative_slope, norm),
        )


def he_normal_init(module: nn.Module, negative_slope: float = NEGATIVE_SLOPE) -> None:
    """He-normal (fan-in) initialisation of every convolution in ``module``; biases to zero.

    Batch-norm layers keep PyTorch's defaults (weight 1, bias 0).
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(
                layer.weight, a=negative_slope, mode="fan_in", nonlinearity="leaky_relu"
            )
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _fold(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    """``conv`` followed by eval-mode ``norm`` as one convolution, in ``conv``'s memory format."""
    fused = fuse_conv_bn_eval(conv, norm)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
    return fused


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """An inference copy of ``network`` whose residual and plain conv blocks (MONAI's
    :class:`UnetResBlock`, :class:`UnetBasicBlock`) have each batch norm folded into the
    convolution before it (one pass over the feature map instead of two).

    Logits equal the original's up to float rounding (eval mode: batch norm is an affine map
    with the running statistics). About 1.25x faster MED-Net inference on CPU (docs/benchmarks.md).
    ``network`` itself is left untouched, so it can still be trained; a network without such
    blocks (e.g. TorchScript) is returned as it is.
    """
    blocks = (UnetResBlock, UnetBasicBlock)
    if network.training or not any(isinstance(m, blocks) for m in network.modules()):
        return network
    folded = copy.deepcopy(network)
    for block in folded.modules():
        if not isinstance(block, blocks):
            continue
        pairs = [("conv1", "norm1"), ("conv2", "norm2")]
        if hasattr(block, "conv3"):  # projection shortcut
            pairs.append(("conv3", "norm3"))
        for conv_name, norm_name in pairs:
            conv, norm = getattr(block, conv_name), getattr(block, norm_name)
            if isinstance(norm, nn.BatchNorm2d) and isinstance(conv.conv, nn.Conv2d):
                conv.conv = _fold(conv.conv, norm)
                setattr(block, norm_name, nn.Identity())
    return folded


def replace_modules(
    network: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]
) -> nn.Module:
    """Replaces, in place, each submodule for which ``replacement`` returns a module (``None``:
    keep it); replacements are not visited again. TorchScript networks are returned as they are.
    """
    if isinstance(network, torch.jit.ScriptModule):
        return network
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
    return network


class BlurredStride(nn.Module):
    """A strided convolution that sees its input low-passed first by a 3×3 binomial blur
    (reflect padding), so that subsampling no longer aliases fine texture into coarse features
    (anti-aliased downsampling, Zhang 2019, "Making convolutional networks shift-invariant
    again"). Blur and convolution commute, so this equals blurring the convolution's output
    before subsampling it, at the cost of one depthwise 3×3 pass.

    Shapes: those of ``conv``.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (torch.outer(taps, taps) / 16).expand(conv.in_channels, 1, 3, 3).clone()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        blurred = F.conv2d(padded, self.kernel.to(x.dtype), groups=self.conv.in_channels)
        return self.conv(blurred)


def blur_strided_convolutions(network: nn.Module) -> nn.Module:
    """Wraps, in place, every strided (not transposed) convolution in :class:`BlurredStride`."""

    def blurred(child: nn.Module) -> nn.Module | None:
        strided = isinstance(child, nn.Conv2d) and tuple(child.stride) != (1, 1)
        return BlurredStride(child) if strided else None

    return replace_modules(network, blurred)


def instance_norms_as_group_norms(network: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`~torch.nn.InstanceNorm2d` that keeps no running
    statistics by the equal :class:`~torch.nn.GroupNorm` with one group per channel (same
    weight and bias).

    Both normalise each image's channel over H×W with the biased variance, so outputs agree up to
    float rounding; torch's group norm has a native channels-last CPU kernel, where instance norm
    copies the feature map to contiguous and back (~2× DynUNet inference on CPU,
    docs/benchmarks.md). TorchScript networks are returned as they are.
    """

    def as_group_norm(child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.InstanceNorm2d) or child.track_running_stats:
            return None
        group = nn.GroupNorm(
            child.num_features, child.num_features, eps=child.eps, affine=child.affine
        )
        if child.affine:
            group.weight, group.bias = child.weight, child.bias
        return group.train(child.training)

    return replace_modules(network, as_group_norm)


class Float32Output(nn.Module):
    """Runs ``layer`` in float32 even inside an autocast region (:func:`edge_layers_in_float32`).

    Shapes: whatever ``layer`` maps; float32 out.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def edge_layers_in_float32(
    network: nn.Module, image_channels: int = 1, num_classes: int = NUM_CLASSES
) -> nn.Module:
    """Wraps, in place, the convolutions that read the image or write the class scores in
    :class:`Float32Output`, so that reduced-precision autocast runs only the layers between.

    bf16 keeps 8 significant bits. An image in [0, 1] is rounded by up to half a grey level, and
    the norm after the first convolution removes the mean brightness and keeps the small texture
    contrast, of which that rounding is then a large share; logits near 8 move in steps of 0.06,
    which flips the label wherever two classes nearly tie. These layers have few input or output
    channels (``image_channels``, ``image_channels + num_classes`` for MED-Net's levels that read
    the image and the coarser level's prior; ``num_classes`` out), so float32 costs well under
    1 % of a window's arithmetic (DynUNet: 0.06 of 23.1 GFLOP). TorchScript networks are returned
    as they are.
    """

    def as_float32(child: nn.Module) -> nn.Module | None:
        is_edge = isinstance(child, nn.Conv2d | nn.ConvTranspose2d) and is_edge_convolution(
            child.in_channels, child.out_channels, image_channels, num_classes
        )
        return Float32Output(child) if is_edge else None

    return replace_modules(network, as_float32)


def is_edge_convolution(
    in_channels: int, out_channels: int, image_channels: int = 1, num_classes: int = NUM_CLASSES
) -> bool:
    """Whether a convolution reads the image (``image_channels`` in, or those plus a coarser
    MED-Net level's ``num_classes`` prior) or writes the class scores (``num_classes`` out): the
    layers every reduced-precision path keeps in float32 (:func:`edge_layers_in_float32`, and
    OpenVINO's :func:`rcmseg.inference.edge_convolutions_in_float32`)."""
    reads_image = in_channels in (image_channels, image_channels + num_classes)
    return reads_image or out_channels == num_classes


def inference_copy(network: nn.Module, group_norms: bool = True) -> nn.Module:
    """An eval-mode copy of ``network`` in its fastest equal form: batch norms folded into their
    convolutions (:func:`fold_batch_norms`) and, for torch (``group_norms``), instance norms as
    group norms (:func:`instance_norms_as_group_norms`); OpenVINO runs instance norms fastest as
    they are (its MVN operation). ``network`` and its train/eval mode are left alone.
    """
    was_training = network.training
    copied = fold_batch_norms(network.eval())
    if copied is network:
        copied = copy.deepcopy(network)
    network.train(was_training)
    return (instance_norms_as_group_norms(copied) if group_norms else copied).eval()
