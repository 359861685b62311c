"""Building blocks of MED-Net: residual encoder and decoder blocks, He-normal initialisation.

All blocks are 2D and keep MONAI's (B, C, H, W) layout.
"""

from __future__ import annotations

from monai.networks.blocks.dynunet_block import UnetResBlock
from torch import nn

# PyTorch/MONAI's usual slope; the paper does not give one (Keras' LeakyReLU default is 0.3).
NEGATIVE_SLOPE: float = 0.01


class ResidualBlock(UnetResBlock):
    """He et al.'s residual block: conv3x3-BN-LeakyReLU-conv3x3-BN, plus shortcut, then LeakyReLU.

    The shortcut is a projection (1x1 conv + BN) whenever the width or the size changes, identity
    otherwise. ``stride=2`` in the first convolution (and the projection) halves H and W.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        stride: stride of the first convolution (1 or 2).
        negative_slope: slope of the leaky ReLU for negative inputs.

    Shapes: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        negative_slope: float = NEGATIVE_SLOPE,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=3,
            stride=stride,
            norm_name="batch",
            act_name=("leakyrelu", {"inplace": True, "negative_slope": negative_slope}),
        )


class DecoderBlock(nn.Sequential):
    """Bilinear 2x upsampling followed by a :class:`ResidualBlock`.

    Shapes: (B, C_in, H, W) -> (B, C_out, 2H, 2W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, negative_slope: float = NEGATIVE_SLOPE
    ) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            ResidualBlock(in_channels, out_channels, stride=1, negative_slope=negative_slope),
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
