"""MED-Net: the multiscale encoder-decoder network of Kose et al. (Medical Image Analysis 2021).

M nested encoder-decoder levels (m = 0 finest). Level m sees the input average-pooled by 2^m
(area averaging, as the mosaics themselves are downsampled) and has n_m residual encoder blocks
(stride 2 each) and as many decoder blocks (bilinear 2x upsampling + residual block). Levels run
coarse to fine and are linked by:

1. label prior: the coarser level's softmax (``prior="softmax"``, the paper's) or its raw logits
   (``prior="logits"``), bilinearly upsampled 2x, is concatenated with the image of the next
   finer level (that level has ``in_channels + out_channels`` inputs); ``prior="none"`` drops
   the link (every level sees the image alone); ``detach_prior=True`` stops the finer levels'
   loss gradients from flowing back into the coarser level through the prior (the paper is
   silent; by default they flow);
2. feature sharing: the coarser bottleneck g, bilinearly resized to the finer level's features
   x before its last encoder block, gates them (``gate``):

   - ``"product"``: x * g, the raw product of unbounded activations (one reading of the paper,
     and the behaviour of rcmseg <= 0.3: old weights load unchanged);
   - ``"sigmoid"``: x * sigmoid(g), squeeze-and-excitation style (Roy et al. 2018, cited by the
     paper): a gate in [0, 1];
   - ``"residual"``: x * (1 + sigmoid(g)), residual attention (Wang et al. 2017): a gate in
     [1, 2] that can emphasise features but never switch them off, so the finer level's own
     path is never blocked by an untrained coarse level;
   - ``"none"``: no feature sharing (the finer level's features pass unchanged);
3. deep supervision: every level's logits are returned in training mode for the loss.

Level depth (``depth_order``; the paper's text supports both readings, see the spec):

- ``"shallower_coarse"`` (default, the paper's figure): n_m = 5 - m, coarser levels are smaller;
  every bottleneck is H/32 and the coarser bottleneck (upsampled 2x) meets the finer features
  at H/16 with the same width, as in rcmseg <= 0.3.
- ``"deeper_coarse"`` (the paper's "same architecture as the subnetwork at scale m - 1 but with
  two additional blocks"): n_m = 5 - (M - 1) + m, i.e. 3, 4, 5 blocks from fine to coarse for
  M = 3, so coarser levels are deeper and see far more context. The coarser bottleneck is then
  8x smaller than the finer features it gates (bilinearly upsampled to their size) and wider: a
  1x1 convolution projects it to their width. Inputs must be multiples of 2^(M - 1) * 32
  (128 for M = 3).

Encoder block k has the same width at every level; weights are never shared between levels.

Level type (``level``): ``"fcn"`` is the paper's FCN-32-like level (no skips inside a level);
``"unet"`` (:class:`MEDNetUNetLevel`) adds U-Net skips inside each level (the decoder block at
each size also sees the encoder output of that size, and the last one the level's input);
``"dynunet"`` (:class:`MEDNetDynUNetLevel`) builds each level from MONAI's DynUNet (nnU-Net)
blocks, whose first stage keeps the level's input size. All three keep the same nesting (prior,
gate, deep supervision); every bottleneck is at H/32 for ``"fcn"``/``"unet"``, H/16 for
``"dynunet"``.

Return types: training mode returns ``list[Tensor]`` of logits coarse to fine (level m at
(B, K, H/2^m, W/2^m)); eval mode returns the finest logits (B, K, H, W) as a plain tensor, which is
what sliding-window inference and MONAI's ``ckpt_export`` (eval mode) expect. ``forward`` is
annotated ``Tensor | list[Tensor]`` (TorchScript reads PEP 604 unions from torch 2.2), so
``torch.jit.script`` accepts both branches; a scripted module keeps the behaviour (``.train()`` and
``.eval()`` switch it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import Tensor, nn

from rcmseg.classes import NUM_CLASSES
from rcmseg.networks.blocks import (
    NEGATIVE_SLOPE,
    NORMS,
    DecoderBlock,
    ResidualBlock,
    he_normal_init,
)

FINEST_ENCODER_BLOCKS: int = 5  # five stride-2 stages: input sides must be multiples of 32
SIDE_MULTIPLE: int = 2**FINEST_ENCODER_BLOCKS

GATES: tuple[str, ...] = ("product", "sigmoid", "residual", "none")
DEPTH_ORDERS: tuple[str, ...] = ("shallower_coarse", "deeper_coarse")
PRIORS: tuple[str, ...] = ("softmax", "logits", "none")
LEVEL_KINDS: tuple[str, ...] = ("fcn", "unet", "dynunet")

Gate = Literal["product", "sigmoid", "residual", "none"]
DepthOrder = Literal["shallower_coarse", "deeper_coarse"]
Prior = Literal["softmax", "logits", "none"]
LevelKind = Literal["fcn", "unet", "dynunet"]
Norm = Literal["batch", "instance"]

# Encoder widths Enc1-Enc5 per number of levels, chosen so each network has ~6.0 M trainable
# parameters with 1 input channel and 6 classes (see tests/test_networks.py). The same widths
# serve both depth orders (the two readings use the same set of blocks).
DEFAULT_WIDTHS: dict[int, tuple[int, ...]] = {
    1: (32, 64, 128, 256, 416),  # 6.14 M
    2: (28, 56, 112, 224, 352),  # 6.00 M
    3: (28, 56, 112, 224, 320),  # 6.02 M
}
# The same for U-Net-like levels (their decoder blocks see the skips too, so they are wider).
UNET_WIDTHS: dict[int, tuple[int, ...]] = {
    1: (28, 56, 112, 224, 416),  # 5.97 M
    2: (24, 48, 104, 208, 352),  # 6.09 M
    3: (24, 48, 96, 208, 320),  # 5.89 M
}
# The same for nnU-Net-like levels (:class:`MEDNetDynUNetLevel`: two plain convolutions per
# stage, the first stage at the level's input size).
DYNUNET_WIDTHS: dict[int, tuple[int, ...]] = {
    1: (32, 64, 128, 256, 336),  # 5.83 M, MONAI's DynUNet as rcmseg.networks.dynunet builds it
    2: (32, 64, 128, 208, 304),  # 6.12 M
    3: (32, 64, 112, 208, 288),  # 6.02 M
}
# The width table each level kind picks when ``widths`` is not given.
WIDTH_TABLES: dict[str, dict[int, tuple[int, ...]]] = {
    "fcn": DEFAULT_WIDTHS,
    "unet": UNET_WIDTHS,
    "dynunet": DYNUNET_WIDTHS,
}


def level_blocks(levels: int, depth_order: str) -> list[int]:
    """Encoder blocks n_m per level, finest (m = 0) first."""
    if depth_order == "shallower_coarse":
        return [FINEST_ENCODER_BLOCKS - m for m in range(levels)]
    if depth_order == "deeper_coarse":
        return [FINEST_ENCODER_BLOCKS - (levels - 1) + m for m in range(levels)]
    raise ValueError(f"depth_order must be one of {DEPTH_ORDERS}, not {depth_order!r}")


def strided_encoders(
    in_channels: int, widths: Sequence[int], negative_slope: float, norm: str
) -> nn.ModuleList:
    """A level's encoder: one stride-2 :class:`ResidualBlock` per width (H/2 each)."""
    inputs = [in_channels, *widths[:-1]]
    return nn.ModuleList(
        ResidualBlock(c_in, c_out, 2, negative_slope, norm)
        for c_in, c_out in zip(inputs, widths, strict=True)
    )


def decoder_widths(widths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Input and output widths of the decoder blocks, deepest first: they mirror the encoder,
    and the last one (back at the level's input size) keeps ``widths[0]``."""
    outputs = [*reversed(widths[:-1]), widths[0]]
    return [widths[-1], *outputs[:-1]], outputs


class FeatureGate(nn.Module):
    """Feature sharing: the coarser bottleneck ``g`` gates the finer features ``x``.

    Args:
        mode: ``"product"`` x*g, ``"sigmoid"`` x*sigmoid(g), ``"residual"`` x*(1+sigmoid(g)).
        gate_channels: channels of g; projected by a 1x1 convolution when they differ from
            ``channels`` (identity otherwise, so a "product" gate has no parameters).
        channels: channels of x.

    ``forward(x (B, C, h, w), g (B, C_g, h', w'))`` -> (B, C, h, w); g is projected, then
    bilinearly resized to (h, w).
    """

    def __init__(self, mode: str, gate_channels: int, channels: int) -> None:
        super().__init__()
        if mode not in ("product", "sigmoid", "residual"):
            raise ValueError(f"gate must be one of {GATES}, not {mode!r}")
        self.mode = mode
        self.projection: nn.Module = (
            nn.Identity()
            if gate_channels == channels
            else nn.Conv2d(gate_channels, channels, kernel_size=1)
        )

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        gate = self.projection(gate)
        gate = F.interpolate(gate, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.mode == "sigmoid":
            return x * torch.sigmoid(gate)
        if self.mode == "residual":
            return x * (1.0 + torch.sigmoid(gate))
        return x * gate


class GatedLevel(nn.Module):
    """What the levels share: ``encoders`` (stride-2 stages), the ``gate`` that lets the coarser
    bottleneck gate the input of encoder ``gate_index``, and ``decoders`` (each subclass builds
    them)."""

    def encode(self, x: Tensor, gate: Tensor | None, skips: bool = True) -> list[Tensor]:
        """Every encoder's output for input x, the last being the level's bottleneck; only the
        bottleneck when not ``skips`` (a level without skips then frees each stage's output as
        soon as the next one is computed)."""
        outputs: list[Tensor] = []
        features = x
        last = len(self.encoders) - 1
        for index, encoder in enumerate(self.encoders):
            if index == self.gate_index and gate is not None:
                features = self.gate(features, gate)
            features = encoder(features)
            if skips or index == last:
                outputs.append(features)
        return outputs

    def decode(self, skips: list[Tensor]) -> Tensor:
        """Decode from ``skips[-1]`` (the bottleneck): decoder j, deepest first, upsamples and
        takes ``skips[-2 - j]``, the skip of the size it upsamples to."""
        features = skips[-1]
        for index, decoder in enumerate(self.decoders):
            features = decoder(features, skips[-2 - index])
        return features


class MEDNetLevel(GatedLevel):
    """One encoder-decoder level of MED-Net, FCN-32 like (no skips inside the level).

    Args:
        in_channels: input channels (image, plus the coarser level's K probabilities if any).
        out_channels: number of classes K.
        widths: encoder block widths, one per encoder block (stride 2 each).
        negative_slope: leaky ReLU slope.
        gate: how the coarser bottleneck gates this level (see :class:`FeatureGate`), or
            ``"none"``.
        gate_channels: channels of the coarser bottleneck (``None``: ``widths[-2]``, the
            shallower-coarse case, or no coarser level).
        norm: ``"batch"`` or ``"instance"`` (see :class:`ResidualBlock`).

    ``forward(x, gate)``: x (B, C_in, h, w), gate None or the coarser bottleneck
    (B, gate_channels, h', w'). Returns (logits (B, K, h, w), bottleneck
    (B, widths[-1], h/2^n, w/2^n)) with n = len(widths).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        negative_slope: float = NEGATIVE_SLOPE,
        gate: str = "product",
        gate_channels: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.encoders = strided_encoders(in_channels, widths, negative_slope, norm)
        decoder_inputs, decoder_outputs = decoder_widths(widths)
        self.decoders = nn.Sequential(
            *(
                DecoderBlock(c_in, c_out, negative_slope, norm)
                for c_in, c_out in zip(decoder_inputs, decoder_outputs, strict=True)
            )
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.gate_index = len(widths) - 1  # the gate multiplies the input of the last encoder
        self.gate = _make_gate(gate, gate_channels, widths)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        bottleneck = self.encode(x, gate, skips=False)[-1]
        return self.head(self.decoders(bottleneck)), bottleneck


class SkipDecoderBlock(nn.Module):
    """Bilinear 2x upsampling, concatenation with a skip, then a :class:`ResidualBlock`.

    Shapes: x (B, C_in, H, W), skip (B, C_skip, 2H, 2W) -> (B, C_out, 2H, 2W).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        negative_slope: float = NEGATIVE_SLOPE,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        channels = in_channels + skip_channels
        self.block = ResidualBlock(channels, out_channels, 1, negative_slope, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class MEDNetUNetLevel(GatedLevel):
    """One U-Net-like level: the encoder of :class:`MEDNetLevel`, decoder blocks with skips.

    Decoder block j (deepest first) upsamples 2x and concatenates the encoder output of that size;
    the last one (back at the level's input size) concatenates the level's input (image and
    prior). Same arguments, gate and return values as :class:`MEDNetLevel`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        negative_slope: float = NEGATIVE_SLOPE,
        gate: str = "product",
        gate_channels: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.encoders = strided_encoders(in_channels, widths, negative_slope, norm)
        decoder_inputs, decoder_outputs = decoder_widths(widths)
        skip_channels = [*reversed(widths[:-1]), in_channels]
        self.decoders = nn.ModuleList(
            SkipDecoderBlock(c_in, c_skip, c_out, negative_slope, norm)
            for c_in, c_skip, c_out in zip(
                decoder_inputs, skip_channels, decoder_outputs, strict=True
            )
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.gate_index = len(widths) - 1
        self.gate = _make_gate(gate, gate_channels, widths)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # the level's input is the last decoder's skip
        skips = [x] + self.encode(x, gate)
        return self.head(self.decode(skips)), skips[-1]


class MEDNetDynUNetLevel(GatedLevel):
    """One nnU-Net-like level, built from MONAI's DynUNet blocks: stage k is two plain
    conv3x3-norm-LeakyReLU (:class:`~monai.networks.blocks.dynunet_block.UnetBasicBlock`),
    stride 1 for the first stage (which keeps the level's input size) and 2 for the others;
    each decoder stage upsamples by a 2x2 transposed convolution, concatenates the encoder output
    of that size and applies two convolutions
    (:class:`~monai.networks.blocks.dynunet_block.UnetUpBlock`); a 1x1 convolution gives the
    logits. This is :func:`rcmseg.networks.dynunet`'s architecture inside MED-Net's nesting.

    Same arguments, gate and return values as :class:`MEDNetLevel`, except that a level with n
    widths has n stages but n - 1 downsamplings: bottleneck (B, widths[-1], h/2^(n-1),
    w/2^(n-1)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int],
        negative_slope: float = NEGATIVE_SLOPE,
        gate: str = "product",
        gate_channels: int | None = None,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        norm_name = "batch" if norm == "batch" else ("instance", {"affine": True})
        act_name = ("leakyrelu", {"inplace": True, "negative_slope": negative_slope})
        inputs = [in_channels, *widths[:-1]]
        self.encoders = nn.ModuleList(
            UnetBasicBlock(2, c_in, c_out, 3, 1 if k == 0 else 2, norm_name, act_name)
            for k, (c_in, c_out) in enumerate(zip(inputs, widths, strict=True))
        )
        self.decoders = nn.ModuleList(
            UnetUpBlock(2, widths[k + 1], widths[k], 3, 2, 2, norm_name, act_name)
            for k in reversed(range(len(widths) - 1))
        )
        self.head = UnetOutBlock(2, widths[0], out_channels)
        self.gate_index = len(widths) - 1
        self.gate = _make_gate(gate, gate_channels, widths)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
        skips = self.encode(x, gate)
        return self.head(self.decode(skips)), skips[-1]


class NoGate(nn.Module):
    """The gate of a level without feature sharing: x passes unchanged (no parameters)."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return x


def _make_gate(gate: str, gate_channels: int | None, widths: Sequence[int]) -> nn.Module:
    """The level's :class:`FeatureGate` (:class:`NoGate` for ``"none"``)."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, not {gate!r}")
    if gate == "none" or len(widths) < 2:
        return NoGate()
    channels = widths[-2]
    return FeatureGate(gate, channels if gate_channels is None else gate_channels, channels)


LEVEL_CLASSES: dict[str, type[nn.Module]] = {
    "fcn": MEDNetLevel,
    "unet": MEDNetUNetLevel,
    "dynunet": MEDNetDynUNetLevel,
}


class MEDNet(nn.Module):
    """Multiscale encoder-decoder network (MED-Net) with ``levels`` nested levels.

    Args:
        in_channels: image channels (1 for RCM).
        out_channels: number of classes K.
        levels: number of levels M (1, 2 or 3; the paper uses 3).
        widths: encoder block widths Enc1-Enc5, shared by all levels (a level with n blocks uses
            the first n). ``None`` picks :data:`DEFAULT_WIDTHS` (``level="fcn"``),
            :data:`UNET_WIDTHS` (``level="unet"``) or :data:`DYNUNET_WIDTHS`
            (``level="dynunet"``) for ``levels`` (~6.0 M parameters).
        negative_slope: leaky ReLU slope.
        gate: feature sharing, ``"product"`` (default, rcmseg <= 0.3), ``"sigmoid"``,
            ``"residual"`` or ``"none"`` (module docstring).
        depth_order: ``"shallower_coarse"`` (default) or ``"deeper_coarse"``.
        prior: label prior, ``"softmax"`` (default, the paper's), ``"logits"`` or ``"none"``.
        level: ``"fcn"`` (default, the paper's), ``"unet"`` (skips inside each level) or
            ``"dynunet"`` (nnU-Net levels; widths :data:`DYNUNET_WIDTHS`).
        detach_prior: pass the prior on without gradient (default False: gradients flow).
        norm: ``"batch"`` (default, the paper's) or ``"instance"`` (nnU-Net's; per-image
            statistics, more robust to a change of digitisation, not folded for inference).

    Input (B, in_channels, H, W) with H and W multiples of :attr:`side_multiple` (32; 64 or 128
    with ``deeper_coarse``), intensities scaled to [0, 1].
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
        gate: Gate = "product",
        depth_order: DepthOrder = "shallower_coarse",
        prior: Prior = "softmax",
        level: LevelKind = "fcn",
        detach_prior: bool = False,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        if levels not in (1, 2, 3):
            raise ValueError(f"MED-Net has 1, 2 or 3 levels, got {levels}.")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, not {gate!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, not {prior!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        if level not in LEVEL_KINDS:
            raise ValueError(f"level must be one of {LEVEL_KINDS}, not {level!r}")
        widths = tuple(WIDTH_TABLES[level][levels] if widths is None else widths)
        if len(widths) != FINEST_ENCODER_BLOCKS:
            raise ValueError(f"widths needs {FINEST_ENCODER_BLOCKS} entries, got {len(widths)}.")
        blocks = level_blocks(levels, depth_order)  # finest first
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_levels = levels
        self.widths = widths
        self.gate_mode = gate
        self.depth_order = depth_order
        self.prior_mode = prior
        self.level_kind = level
        self.detach_prior = detach_prior
        self.norm = norm
        self.side_multiple = max(2**m * 2 ** blocks[m] for m in range(levels))
        self.input_scales = [2**m for m in reversed(range(levels))]  # coarse to fine
        level_class = LEVEL_CLASSES[level]
        modules = []
        for m in reversed(range(levels)):  # coarse to fine
            coarsest = m == levels - 1
            level_in = in_channels if coarsest or prior == "none" else in_channels + out_channels
            gate_channels = None if coarsest else widths[blocks[m + 1] - 1]
            modules.append(
                level_class(
                    level_in,
                    out_channels,
                    widths[: blocks[m]],
                    negative_slope=negative_slope,
                    gate="none" if coarsest else gate,
                    gate_channels=gate_channels,
                    norm=norm,
                )
            )
        self.levels = nn.ModuleList(modules)
        he_normal_init(self, negative_slope)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        side = self.side_multiple
        if x.shape[-2] % side != 0 or x.shape[-1] % side != 0:
            raise ValueError(f"MED-Net input height and width must be multiples of {side}.")
        outputs: list[Tensor] = []
        prior: Tensor | None = None
        gate: Tensor | None = None
        for index, level in enumerate(self.levels):
            scale = self.input_scales[index]
            image = F.avg_pool2d(x, scale) if scale > 1 else x
            if prior is not None:
                prior = F.interpolate(prior, scale_factor=2.0, mode="bilinear", align_corners=False)
                image = torch.cat([image, prior], dim=1)
            logits, bottleneck = level(image, gate)
            if self.gate_mode != "none":
                gate = bottleneck
            if index < self.num_levels - 1 and self.prior_mode != "none":
                prior = torch.softmax(logits, dim=1) if self.prior_mode == "softmax" else logits
                if self.detach_prior:
                    prior = prior.detach()
            outputs.append(logits)
        if self.training:
            return outputs
        return outputs[-1]


class MEDNetUNet(MEDNet):
    """MED-Net whose levels are U-Net-like encoder-decoders with skips (:class:`MEDNetUNetLevel`),
    ~6 M parameters with :data:`UNET_WIDTHS`; same nesting, options and outputs as
    :class:`MEDNet` (``level="unet"``)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = NUM_CLASSES,
        levels: int = 3,
        widths: Sequence[int] | None = None,
        negative_slope: float = NEGATIVE_SLOPE,
        gate: Gate = "product",
        depth_order: DepthOrder = "shallower_coarse",
        prior: Prior = "softmax",
        detach_prior: bool = False,
        norm: Norm = "batch",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            levels,
            widths,
            negative_slope,
            gate=gate,
            depth_order=depth_order,
            prior=prior,
            level="unet",
            detach_prior=detach_prior,
            norm=norm,
        )
