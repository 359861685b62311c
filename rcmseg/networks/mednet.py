"""MED-Net: the multiscale encoder-decoder network of Kose et al. (Medical Image Analysis 2021).

M nested encoder-decoder levels (m = 0 finest). Level m sees the input average-pooled by 2^m
(area averaging, as the mosaics themselves are downsampled) and has 5 - m residual encoder
blocks (stride 2 each) and as many decoder blocks (bilinear 2x upsampling + residual block), so
every level's bottleneck is H/32 x W/32. Levels run coarse to fine and are linked by:

1. label prior: the coarser level's softmax, bilinearly upsampled 2x, is concatenated with the
   image of the next finer level (that level has ``in_channels + out_channels`` inputs);
2. feature sharing: the coarser bottleneck, bilinearly upsampled 2x, multiplies element-wise the
   finer level's features after its encoder block of the same size (H/16), before its last
   encoder block;
3. deep supervision: every level's logits are returned in training mode for the loss.

Return types: training mode returns ``list[Tensor]`` of logits coarse to fine (level m at
(B, K, H/2^m, W/2^m)); eval mode returns the finest logits (B, K, H, W) as a plain tensor, which is
what sliding-window inference and MONAI's ``ckpt_export`` (eval mode) expect. ``forward`` is
annotated ``Tensor | list[Tensor]`` (TorchScript reads PEP 604 unions from torch 2.2), so
``torch.jit.script`` accepts both branches; a scripted module keeps the behaviour (``.train()`` and
``.eval()`` switch it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcmseg.classes import NUM_CLASSES
from rcmseg.networks.blocks import NEGATIVE_SLOPE, DecoderBlock, ResidualBlock, he_normal_init

FINEST_ENCODER_BLOCKS: int = 5  # five stride-2 stages: input sides must be multiples of 32
SIDE_MULTIPLE: int = 2**FINEST_ENCODER_BLOCKS

# Encoder widths Enc1-Enc5 per number of levels, chosen so each network has ~6.0 M trainable
# parameters with 1 input channel and 6 classes (see tests/test_networks.py).
DEFAULT_WIDTHS: dict[int, tuple[int, ...]] = {
    1: (32, 64, 128, 256, 416),  # 6.14 M
    2: (28, 56, 112, 224, 352),  # 6.00 M
    3: (28, 56, 112, 224, 320),  # 6.02 M
}


class MEDNetLevel(nn.Module):
    """One encoder-decoder level of MED-Net, FCN-32 like (no skips inside the level).

    Args:
        in_channels: input channels (image, plus the coarser level's K probabilities if any).
        out_channels: number of classes K.
        widths: encoder block widths, one per encoder block (stride 2 each).
        negative_slope: leaky ReLU slope.

    ``forward(x, gate)``: x (B, C_in, h, w), gate None or the coarser bottleneck
    (B, widths[-2], h/2^n/2, w/2^n/2) with n = len(widths). Returns (logits (B, K, h, w),
    bottleneck (B, widths[-1], h/2^n, w/2^n)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        negative_slope: float = NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        encoder_inputs = [in_channels, *widths[:-1]]
        self.encoders = nn.ModuleList(
            ResidualBlock(c_in, c_out, stride=2, negative_slope=negative_slope)
            for c_in, c_out in zip(encoder_inputs, widths, strict=True)
        )
        # Decoders mirror the encoders; the last one (back at full size) keeps widths[0].
        decoder_outputs = [*reversed(widths[:-1]), widths[0]]
        decoder_inputs = [widths[-1], *decoder_outputs[:-1]]
        self.decoders = nn.Sequential(
            *(
                DecoderBlock(c_in, c_out, negative_slope=negative_slope)
                for c_in, c_out in zip(decoder_inputs, decoder_outputs, strict=True)
            )
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.gate_index = len(widths) - 1  # the gate multiplies the input of the last encoder

    def forward(self, x: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = x
        for index, encoder in enumerate(self.encoders):
            if index == self.gate_index and gate is not None:
                features = features * F.interpolate(
                    gate, scale_factor=2.0, mode="bilinear", align_corners=False
                )
            features = encoder(features)
        bottleneck = features
        return self.head(self.decoders(bottleneck)), bottleneck


class MEDNet(nn.Module):
    """Multiscale encoder-decoder network (MED-Net) with ``levels`` nested levels.

    Args:
        in_channels: image channels (1 for RCM).
        out_channels: number of classes K.
        levels: number of levels M (1, 2 or 3; the paper uses 3).
        widths: encoder block widths Enc1-Enc5, shared by all levels (level m uses the first
            5 - m). ``None`` picks :data:`DEFAULT_WIDTHS` for ``levels`` (~6.0 M parameters).
        negative_slope: leaky ReLU slope.

    Input (B, in_channels, H, W) with H and W multiples of 32 (intensities scaled to [0, 1]).
    Training mode: list of M logits tensors coarse to fine, level m (B, K, H/2^m, W/2^m).
    Eval mode: finest logits (B, K, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        levels: int = 3,
        widths: Sequence[int] | None = None,
        negative_slope: float = NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        if levels not in (1, 2, 3):
            raise ValueError(f"MED-Net has 1, 2 or 3 levels, got {levels}.")
        widths = tuple(DEFAULT_WIDTHS[levels] if widths is None else widths)
        if len(widths) != FINEST_ENCODER_BLOCKS:
            raise ValueError(f"widths needs {FINEST_ENCODER_BLOCKS} entries, got {len(widths)}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_levels = levels
        self.widths = widths
        self.side_multiple = SIDE_MULTIPLE
        self.input_scales = [2**m for m in reversed(range(levels))]  # coarse to fine
        # Coarse to fine: the coarsest level gets the image alone, the others image + prior.
        self.levels = nn.ModuleList(
            MEDNetLevel(
                in_channels if m == levels - 1 else in_channels + out_channels,
                out_channels,
                widths[: FINEST_ENCODER_BLOCKS - m],
                negative_slope=negative_slope,
            )
            for m in reversed(range(levels))
        )
        he_normal_init(self, negative_slope)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        side = self.side_multiple
        if x.shape[-2] % side != 0 or x.shape[-1] % side != 0:
            raise ValueError("MED-Net input height and width must be multiples of 32.")
        outputs: list[Tensor] = []
        prior: Tensor | None = None
        gate: Tensor | None = None
        for index, level in enumerate(self.levels):
            scale = self.input_scales[index]
            image = F.avg_pool2d(x, scale) if scale > 1 else x
            if prior is not None:
                prior = F.interpolate(prior, scale_factor=2.0, mode="bilinear", align_corners=False)
                image = torch.cat([image, prior], dim=1)
            logits, gate = level(image, gate)
            if index < self.num_levels - 1:
                prior = torch.softmax(logits, dim=1)
            outputs.append(logits)
        if self.training:
            return outputs
        return outputs[-1]
