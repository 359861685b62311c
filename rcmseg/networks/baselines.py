"""The paper's baselines at ~6 M trainable parameters: U-Net, FCN-32s, SegNet and DeepLab, and
MONAI's DynUNet (the nnU-Net architecture) at the same size.

Each returns logits (B, K, H, W) for input (B, C, H, W), in training and eval mode alike; H and W
must be multiples of 32 (five 2x downsamplings in FCN and SegNet). Widths are chosen so each
network lands within 10 % of MED-Net-3's 6.02 M parameters (1 input channel, 6 classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, SimpleASPP
from monai.networks.nets import BasicUNet, DynUNet
from torch import Tensor, nn

from rcmseg.classes import NUM_CLASSES
from rcmseg.networks.blocks import blur_strided_convolutions, he_normal_init


def unet(
    in_channels: int = 1,
    out_channels: int = NUM_CLASSES,
    features: Sequence[int] = (32, 64, 128, 256, 384, 32),
) -> nn.Module:
    """MONAI's :class:`~monai.networks.nets.BasicUNet` with batch norm, ~6 M parameters."""
    network = BasicUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        features=tuple(features),
        norm=("batch", {"affine": True}),
    )
    he_normal_init(network)
    return network


class DynUNet2D(nn.Module):
    """MONAI's :class:`~monai.networks.nets.DynUNet` (nnU-Net architecture) in 2D, ~6 M
    parameters: kernel 3 everywhere, strides (1, 2, 2, 2, 2), instance norm, leaky ReLU 0.01
    (nnU-Net's choices), plain (non-residual) conv blocks unless ``res_block``,
    transposed-convolution upsampling.

    Args:
        in_channels: image channels.
        out_channels: number of classes K.
        filters: widths of the resolution stages, finest first (default 32-64-128-256-336:
            5.8 M parameters).
        strides: stride of each stage; default 1 for the first and 2 for every other stage. A
            first stride of 2 runs the whole network at half the input's resolution (a quarter
            of the arithmetic; the first convolution still reads every pixel) and bilinearly
            upsamples the logits back to the input size.
        deep_supervision: in training mode, return a list of logits: the ``deep_supr_num``
            auxiliary heads (coarsest first, bilinearly upsampled to full size by MONAI) and the
            main output last, like MED-Net's coarse-to-fine list; eval mode always returns the
            main logits alone.
        deep_supr_num: auxiliary heads when ``deep_supervision``.
        norm: ``"instance"`` (nnU-Net's: each window's own statistics) or ``"batch"`` (running
            statistics, folded into the convolutions for inference: no normalisation pass left,
            for networks so narrow that the norms cost as much as the convolutions).
        anti_alias: blur the input of every strided convolution with a 3×3 binomial filter
            (:class:`~rcmseg.networks.blocks.BlurredStride`), so that downsampling does not alias
            fine texture (same parameters, one depthwise pass more per downsampling).
        res_block: a residual encoder (MONAI's ``UnetResBlock`` in every encoder stage: two 3×3
            convolutions plus an identity, or a 1×1 projection where the width or stride
            changes; the decoder stays plain), as in nnU-Net's residual-encoder variants; same
            widths, ~2 % more parameters.

    Shapes: (B, C, H, W) -> (B, K, H, W) (H, W multiples of the product of ``strides``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        filters: Sequence[int] = (32, 64, 128, 256, 336),
        strides: Sequence[int] | None = None,
        deep_supervision: bool = False,
        deep_supr_num: int = 2,
        norm: str = "instance",
        anti_alias: bool = False,
        res_block: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("instance", "batch"):
            raise ValueError(f"norm must be 'instance' or 'batch', not {norm!r}")
        if strides is None:
            strides = (1,) + (2,) * (len(filters) - 1)
        if len(filters) != len(strides):
            raise ValueError("filters and strides need one entry per stage")
        # MONAI's DynUNet fails on fewer stages with an IndexError deep in its builder
        fewest = deep_supr_num + 2 if deep_supervision else 3
        if len(filters) < fewest:
            heads = f" for {deep_supr_num} deep-supervision heads" if deep_supervision else ""
            raise ValueError(f"filters needs at least {fewest} stages{heads}, got {len(filters)}")
        self.deep_supervision = deep_supervision
        self.upsample_output = strides[0] > 1
        self._arguments = (in_channels, out_channels, tuple(filters), tuple(strides))
        self._norm = norm
        self._anti_alias = anti_alias
        self._res_block = res_block
        self.net = DynUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * len(strides),
            strides=list(strides),
            upsample_kernel_size=list(strides[1:]),
            filters=list(filters),
            norm_name=(norm, {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        if anti_alias:
            blur_strided_convolutions(self.net)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        out = self.net(x)
        if self.training and self.deep_supervision:
            return self._supervised_outputs(out, x)
        return self._to_input_size(out, x)

    def _supervised_outputs(self, out: Tensor, x: Tensor) -> list[Tensor]:
        """MONAI's stacked (B, 1 + deep_supr_num, K, H, W) outputs (main first, then finer to
        coarser) as a list coarsest first, main last, each at the input size."""
        # MONAI keeps the auxiliary outputs in a list on the module: empty it, or the graph it
        # holds stays alive and the network cannot be deep-copied (inference copies).
        for index in range(len(self.net.heads)):
            self.net.heads[index] = torch.zeros(1)
        heads = [self._to_input_size(h, x) for h in torch.unbind(out, dim=1)]
        return heads[1:][::-1] + heads[:1]

    def __prepare_scriptable__(self) -> DynUNet2D:
        """What ``torch.jit.script`` (and so MONAI's ``ckpt_export``) compiles: MONAI's deeply
        supervised DynUNet cannot be scripted, and its auxiliary heads only serve training, so a
        deeply supervised network is scripted as the same network without them (same weights,
        same eval outputs)."""
        if not self.deep_supervision:
            return self
        plain = DynUNet2D(
            *self._arguments,
            norm=self._norm,
            anti_alias=self._anti_alias,
            res_block=self._res_block,
        )
        state = {
            key: value
            for key, value in self.state_dict().items()
            if "deep_supervision_heads" not in key and "super_head" not in key
        }
        plain.load_state_dict(state)
        return plain.train(self.training)

    def _to_input_size(self, logits: Tensor, x: Tensor) -> Tensor:
        """Logits bilinearly upsampled to the input's size (a no-op at first stride 1)."""
        if not self.upsample_output:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def dynunet(
    in_channels: int = 1,
    out_channels: int = NUM_CLASSES,
    filters: Sequence[int] = (32, 64, 128, 256, 336),
    deep_supervision: bool = False,
    strides: Sequence[int] | None = None,
    norm: str = "instance",
    anti_alias: bool = False,
    res_block: bool = False,
    deep_supr_num: int = 2,
) -> nn.Module:
    """:class:`DynUNet2D` with nnU-Net's defaults at ~6 M parameters."""
    return DynUNet2D(
        in_channels,
        out_channels,
        filters,
        strides=strides,
        deep_supervision=deep_supervision,
        deep_supr_num=deep_supr_num,
        norm=norm,
        anti_alias=anti_alias,
        res_block=res_block,
    )


def _conv_bn_relu(in_channels: int, out_channels: int, dilation: int = 1) -> Convolution:
    """3x3 convolution, batch norm, ReLU; keeps H and W."""
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        dilation=dilation,
        act="relu",
        norm="batch",
    )


def _vgg_stage(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """``convs`` conv-BN-ReLU layers at one size."""
    widths = [in_channels] + [out_channels] * convs
    return nn.Sequential(*(_conv_bn_relu(a, b) for a, b in pairwise(widths)))


class FCN32s(nn.Module):
    """FCN-32s style network: VGG-like encoder (5 stages, max-pooled), conv "fc" layers, a 1x1
    classifier at H/32, and one bilinear 32x upsampling back to the input size.

    Args:
        in_channels: image channels.
        out_channels: number of classes K.
        widths: widths of the five encoder stages.
        convs_per_stage: conv-BN-ReLU layers per stage.
        head_width: width of the two 3x3 "fully connected" convolutions at H/32.

    Shapes: (B, C, H, W) -> (B, K, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128, 256, 256),
        convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
        head_width: int = 384,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = in_channels
        for width, convs in zip(widths, convs_per_stage, strict=True):
            stages += [_vgg_stage(previous, width, convs), nn.MaxPool2d(2)]
            previous = width
        self.encoder = nn.Sequential(*stages)
        self.head = nn.Sequential(
            _conv_bn_relu(previous, head_width),
            _conv_bn_relu(head_width, head_width),
            nn.Conv2d(head_width, out_channels, kernel_size=1),
        )
        self.upsample = nn.Upsample(scale_factor=32.0, mode="bilinear", align_corners=False)
        he_normal_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.head(self.encoder(x)))


class SegNet(nn.Module):
    """SegNet style encoder-decoder: the decoder upsamples with max-unpooling, reusing the
    encoder's pooling indices (no skip connections of features).

    Args:
        in_channels: image channels.
        out_channels: number of classes K.
        widths: widths of the five encoder stages (the decoder mirrors them).
        convs_per_stage: conv-BN-ReLU layers per stage.

    Shapes: (B, C, H, W) -> (B, K, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128, 256, 256),
        convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    ) -> None:
        super().__init__()
        inputs = [in_channels, *widths[:-1]]
        self.encoders = nn.ModuleList(
            _vgg_stage(a, b, n) for a, b, n in zip(inputs, widths, convs_per_stage, strict=True)
        )
        # Decoder stages mirror the encoder stages, deepest first: each maps widths[i] back to
        # its encoder's input width (widths[0] for the shallowest; the classifier maps it to K).
        decoder_outputs = [widths[0], *widths[:-1]]
        mirrored = zip(decoder_outputs, widths, convs_per_stage, strict=True)
        self.decoders = nn.ModuleList(_vgg_stage(b, a, n) for a, b, n in reversed(list(mirrored)))
        self.classifier = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        he_normal_init(self)

    def forward(self, x: Tensor) -> Tensor:
        indices: list[Tensor] = []
        sizes: list[list[int]] = []
        for encoder in self.encoders:
            x = encoder(x)
            sizes.append(x.shape[-2:])
            x, index = F.max_pool2d_with_indices(x, kernel_size=2, stride=2)
            indices.append(index)
        for decoder in self.decoders:
            x = F.max_unpool2d(x, indices.pop(), kernel_size=2, stride=2, output_size=sizes.pop())
            x = decoder(x)
        return self.classifier(x)


class DeepLab(nn.Module):
    """DeepLab style network: strided residual encoder down to H/8, dilated residual stages that
    keep H/8, MONAI's :class:`SimpleASPP`, a 1x1 classifier and bilinear 8x upsampling.

    Args:
        in_channels: image channels.
        out_channels: number of classes K.
        widths: widths of the stem and the three strided residual stages (H/2 .. H/8).
        dilated_widths: widths of the dilated residual stages (H/8).
        dilations: dilation of each dilated stage.
        aspp_width: channels of each of the four ASPP branches.
        aspp_dilations: dilations of the four ASPP branches.

    Shapes: (B, C, H, W) -> (B, K, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        widths: Sequence[int] = (32, 64, 128, 192),
        dilated_widths: Sequence[int] = (192, 192),
        dilations: Sequence[int] = (2, 4),
        aspp_width: int = 128,
        aspp_dilations: Sequence[int] = (1, 6, 12, 18),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, widths[0])]
        for a, b in pairwise(widths):
            layers.append(_residual_stage(a, b, stride=2))
        previous = widths[-1]
        for width, dilation in zip(dilated_widths, dilations, strict=True):
            layers.append(_residual_stage(previous, width, dilation=dilation))
            previous = width
        self.encoder = nn.Sequential(*layers)
        self.aspp = SimpleASPP(
            spatial_dims=2,
            in_channels=previous,
            conv_out_channels=aspp_width,
            kernel_sizes=(1, 3, 3, 3),
            dilations=tuple(aspp_dilations),
            norm_type="batch",
            acti_type="relu",
        )
        self.classifier = nn.Conv2d(4 * aspp_width, out_channels, kernel_size=1)
        self.output_stride = 2 ** (len(widths) - 1)
        he_normal_init(self)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.aspp(self.encoder(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _residual_stage(
    in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """Two MONAI residual units (conv-BN-ReLU x2 + projection shortcut); the first one strides."""
    return nn.Sequential(
        ResidualUnit(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=stride,
            subunits=2,
            act="relu",
            norm="batch",
            dilation=dilation,
        ),
        ResidualUnit(
            spatial_dims=2,
            in_channels=out_channels,
            out_channels=out_channels,
            subunits=2,
            act="relu",
            norm="batch",
            dilation=dilation,
        ),
    )
