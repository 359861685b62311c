"""MED-Net diagnosis (issue 11): ablations of MED-Net's parts at equal budget on real textures.

Usage::

    python benchmarks/mednet_ablation.py /work/shared/data/textures --out /tmp/mednet_ablation \
        --png docs/mednet_ablation.png

Data: the real-texture benchmark's mosaics (``benchmarks/texture_mosaics.py``, the same builder
and defaults as the documented ``texture_bench.py`` run: 32 training-side mosaics of the ``1.3``
digitisation, 12 test mosaics of the ``1.1`` digitisation, 512 px, textures shrunk 2x). Four of
the training-side mosaics (seeded choice) validate; the rest train. ``--source kth`` builds the
second, independent set instead (six KTH-TIPS materials, shots 1-6 train, shots 7-9 test; give it
its own ``--out``). Every variant of
:data:`VARIANTS` is trained with the same budget through :func:`rcmseg.training.train` (MDSC+TV,
deep supervision for MED-Net with optional per-level weights), validated every ``--val-every``
epochs (the learning curve: validation Dice against crops seen), then its **last-epoch** weights
(no selection on the validation mosaics) are evaluated on the validation mosaics (in-domain) and
on the test mosaics (other digitisation) with the shared sliding-window path: mean Dice over
classes and fragmentation (connected components and boundary length per mm² of lesion,
:func:`rcmseg.metrics.fragmentation`, against the complete ground truth in ``labels_full/``).

Networks are width-scaled (``--width-scale``, default 0.5: about a quarter of the parameters)
so the grid fits a 2-core CPU; the ``params`` column gives the real counts.

Resumable: a finished run (``OUT/runs/NAME[@seed]/result.json``, or its copy kept in
``--results DIR`` as ``NAME[@seed].json``) is not redone, an interrupted one resumes from its last
epoch. Each run takes ``/tmp/rcmseg-cpu.lock`` (``flock``) for itself,
so other short jobs can interleave. Progress lines go to ``OUT/progress.log``; the table to
``OUT/table.md``; learning curves to ``--png``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from texture_mosaics import add_benchmark_arguments, write_benchmark_dataset  # noqa: E402

from rcmseg.classes import WORKING_MPP  # noqa: E402
from rcmseg.inference import segment_image  # noqa: E402
from rcmseg.io.atomic import copy_atomic, write_text_atomic  # noqa: E402
from rcmseg.io.dataset import Case, case_id, load_case, read_manifest  # noqa: E402
from rcmseg.losses import make_loss  # noqa: E402
from rcmseg.metrics import confusion_matrix, fragmentation, one_vs_rest  # noqa: E402
from rcmseg.networks import WIDTH_TABLES, count_parameters, get_network  # noqa: E402
from rcmseg.training import TrainConfig, train  # noqa: E402
from rcmseg.training.checkpoint import (  # noqa: E402
    export_weights,
    inference_weights,
    load_checkpoint,
)

LOCK = Path("/tmp/rcmseg-cpu.lock")
BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "rcm_mednet"
UNET_FEATURES = (32, 64, 128, 256, 384, 32)
DYNUNET_FILTERS = (32, 64, 128, 256, 336)
DEEPLAB_WIDTHS, DEEPLAB_DILATED, DEEPLAB_ASPP = (32, 64, 128, 192), (192, 192), 128
# the options of get_network("mednet_unet_in") on network="mednet_unet" (the rows name them)
MEDNET_UNET_IN: dict[str, Any] = {"prior": "none", "gate": "residual", "norm": "instance"}


@dataclass(frozen=True)
class Variant:
    """One row of the grid: a network, its options, deep-supervision weights, recipe changes.

    ``train`` overrides the common budget (e.g. ``patch_size``, ``optimizer``); ``group`` names
    the learning-curve panel.
    """

    label: str
    group: str
    # the diagnosis varies rcmseg <= 0.4's MED-Net one part at a time ("mednet" is now the
    # paper-faithful reading the diagnosis found, i.e. the deep_detached_sigmoid row)
    network: str = "mednet_legacy"
    kwargs: dict[str, Any] = field(default_factory=dict)
    level_weights: tuple[float, ...] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    # distillation: the variant whose run of the same seed teaches this one (its last-epoch
    # weights in the bundle's network_def, so it must be the bundle's network at full width)
    teacher: str | None = None


VARIANTS: dict[str, Variant] = {
    # references
    "mednet3": Variant("MED-Net 3 levels (product gate, as built)", "networks"),
    "mednet1": Variant("MED-Net 1 level", "networks", network="mednet1"),
    "unet": Variant("U-Net (BasicUNet)", "networks", network="unet"),
    "dynunet": Variant("DynUNet (nnU-Net)", "networks", network="dynunet"),
    "deeplab": Variant("DeepLab (dilated ResNet + ASPP)", "networks", network="deeplab"),
    "mednet_unet": Variant("MED-Net 3, U-Net-like levels", "networks", network="mednet_unet"),
    # the feature-sharing gate
    "gate_sigmoid": Variant("gate x*sigmoid(g)", "gate", kwargs={"gate": "sigmoid"}),
    "gate_residual": Variant("gate x*(1+sigmoid(g))", "gate", kwargs={"gate": "residual"}),
    "gate_none": Variant("no gate", "gate", kwargs={"gate": "none"}),
    # level depth and label prior
    "deeper_coarse": Variant(
        "deeper coarse levels (3/4/5 blocks)",
        "depth+prior",
        kwargs={"depth_order": "deeper_coarse"},
    ),
    "prior_none": Variant("no label prior", "depth+prior", kwargs={"prior": "none"}),
    "prior_logits": Variant("prior = logits", "depth+prior", kwargs={"prior": "logits"}),
    "prior_detached": Variant(
        "prior without gradient (detached)", "depth+prior", kwargs={"detach_prior": True}
    ),
    # deep supervision
    "ds_1_2_4": Variant("DS weights 0.25/0.5/1", "supervision", level_weights=(0.25, 0.5, 1.0)),
    "ds_finest": Variant("DS off (finest only)", "supervision", level_weights=(0.0, 0.0, 1.0)),
    # recipe
    "crop256": Variant(
        "256 px crops (batch/4: same px per step)", "recipe", train={"patch_size": 256}
    ),
    "sgd": Variant(
        "SGD 0.01 momentum 0.9", "recipe", train={"optimizer": "sgd", "learning_rate": 0.01}
    ),
    "adam_5e-4": Variant("Adam lr 5e-4", "recipe", train={"learning_rate": 5e-4}),
    "adam_5e-3": Variant("Adam lr 5e-3", "recipe", train={"learning_rate": 5e-3}),
    # combinations of what helped (filled in after the single-factor runs)
    "mednet_unet_residual": Variant(
        "MED-Net 3, U-Net levels, residual gate",
        "combined",
        network="mednet_unet",
        kwargs={"gate": "residual"},
    ),
    "deeper_noprior": Variant(
        "deeper coarse levels + no prior",
        "combined",
        kwargs={"depth_order": "deeper_coarse", "prior": "none"},
    ),
    "noprior_residual": Variant(
        "no prior + residual gate",
        "combined",
        kwargs={"prior": "none", "gate": "residual"},
    ),
    "mednet_unet_noprior_residual": Variant(
        "MED-Net 3, U-Net levels, no prior, residual gate",
        "combined",
        network="mednet_unet",
        kwargs={"prior": "none", "gate": "residual"},
    ),
    # instance norm (nnU-Net's; DynUNet was the most robust across digitisations)
    # (deeper coarse levels reach 1x1 at 128 px crops, where instance norm is undefined)
    "noprior_instance": Variant(
        "no prior + instance norm",
        "norm",
        kwargs={"prior": "none", "norm": "instance"},
    ),
    "unet_levels_noprior_instance": Variant(
        "U-Net levels, no prior, residual gate, instance norm",
        "norm",
        network="mednet_unet",
        kwargs=MEDNET_UNET_IN,
    ),
    # MED-Net with nnU-Net levels (seventh session): DynUNet's blocks inside the nesting
    "mednet_dynunet": Variant(
        "MED-Net 3, DynUNet levels, no prior, residual gate",
        "networks",
        network="mednet_dynunet",
    ),
    # the best paper-faithful MED-Net (tenth session): only choices the paper leaves open, each
    # set to what helped alone in the diagnosis (coarser levels deeper, the softmax prior passed
    # on without gradient) and the gate read three ways (raw product, Roy et al.'s sigmoid, and
    # the residual x*(1+sigmoid(g)))
    "deep_detached": Variant(
        "deeper coarse levels + detached prior (paper's readings)",
        "paper-faithful",
        kwargs={"depth_order": "deeper_coarse", "detach_prior": True},
    ),
    "deep_detached_sigmoid": Variant(
        "deeper coarse levels + detached prior + sigmoid gate",
        "paper-faithful",
        kwargs={"depth_order": "deeper_coarse", "detach_prior": True, "gate": "sigmoid"},
    ),
    "deep_detached_residual": Variant(
        "deeper coarse levels + detached prior + residual gate",
        "paper-faithful",
        kwargs={"depth_order": "deeper_coarse", "detach_prior": True, "gate": "residual"},
    ),
    # issue 13: DynUNet at a third and a quarter of the arithmetic per window (7.2 and 6.0
    # against 23.1 GFLOP per 256² window): half the widths, with or without a sixth stage
    "dynunet_lite": Variant(
        "DynUNet 6 stages 16-320 (5.7 M, 7.2 GFLOP)",
        "cheaper DynUNet",
        network="dynunet",
        kwargs={"filters": (16, 32, 64, 128, 256, 320)},
    ),
    "dynunet_half": Variant(
        "DynUNet 5 stages 16-256 (1.9 M, 6.0 GFLOP)",
        "cheaper DynUNet",
        network="dynunet",
        kwargs={"filters": (16, 32, 64, 128, 256)},
    ),
    # eleventh session (issues 11 and 13): DynUNet at half resolution (first stage stride 2,
    # logits upsampled): a quarter of the arithmetic (5.8 GFLOP per 256² window), twice the
    # field of view per stage; with nnU-Net's deep supervision; wider at half resolution
    "dynunet_s2": Variant(
        "DynUNet, stride-2 first stage (5.8 M, 5.8 GFLOP)",
        "cheaper DynUNet",
        network="dynunet",
        kwargs={"strides": (2, 2, 2, 2, 2)},
    ),
    "dynunet_s2_wide": Variant(
        "DynUNet, stride-2 first stage, 48-384 (9.5 M, 11.8 GFLOP)",
        "cheaper DynUNet",
        network="dynunet",
        kwargs={"strides": (2, 2, 2, 2, 2), "filters": (48, 96, 192, 320, 384)},
    ),
    "dynunet_ds": Variant(
        "DynUNet with deep supervision (2 auxiliary heads)",
        "networks",
        network="dynunet",
        kwargs={"deep_supervision": True},
    ),
    # twenty-fifth session: residual conv blocks (nnU-Net's residual-encoder family), the last
    # stage 320 wide so the parameters match dynunet_ds's (5.81 against 5.83 M)
    "dynunet_res_ds": Variant(
        "DynUNet with residual blocks and deep supervision (5.81 M)",
        "networks",
        network="dynunet",
        kwargs={"deep_supervision": True, "res_block": True, "filters": (32, 64, 128, 256, 320)},
    ),
    # twenty-sixth session: a third auxiliary head (1/8 scale), one level deeper than nnU-Net's
    # and MED-Net's supervision (full, 1/2, 1/4)
    "dynunet_ds3": Variant(
        "DynUNet with deep supervision (3 auxiliary heads, to 1/8)",
        "networks",
        network="dynunet",
        kwargs={"deep_supervision": True, "deep_supr_num": 3},
    ),
    # eighteenth session: nnU-Net's own deep-supervision weights (halved per level: main 1,
    # 1/2 scale 0.5, 1/4 scale 0.25) instead of equal weights
    "dynunet_ds_halved": Variant(
        "DynUNet with deep supervision, nnU-Net's weights 0.25/0.5/1",
        "networks",
        network="dynunet",
        kwargs={"deep_supervision": True},
        level_weights=(0.25, 0.5, 1.0),
    ),
    # seventeenth session: anti-aliased downsampling (a binomial blur before every strided
    # convolution), a candidate for carrying networks across digitisations
    "dynunet_ds_aa": Variant(
        "DynUNet with deep supervision, anti-aliased downsampling",
        "networks",
        network="dynunet",
        kwargs={"deep_supervision": True, "anti_alias": True},
    ),
    "dynunet_aa": Variant(
        "DynUNet, anti-aliased downsampling",
        "networks",
        network="dynunet",
        kwargs={"anti_alias": True},
    ),
}

# issue 13 (fifteenth session): a DynUNet small enough for "fast" <= 10 s on two cores (8-16-32-
# 64-128: 0.49 M parameters, 1.5 GFLOP per 256² window, 11.5 ms in bf16 against 85 ms), trained
# on the labels alone or distilled from the bundle's network (teacher: dynunet_ds, same seed)
TINY_DYNUNET: dict[str, Any] = {"filters": (8, 16, 32, 64, 128), "deep_supervision": True}
VARIANTS["dynunet_ds_tiny"] = Variant(
    "DynUNet 8-128 with deep supervision (0.49 M, 1.5 GFLOP)",
    "distillation",
    network="dynunet",
    kwargs=TINY_DYNUNET,
)


def distilled_variants(suffix: str, kwargs: dict[str, Any], note: str) -> dict[str, Variant]:
    """The small DynUNet distilled from dynunet_ds of the same seed: the teacher at unlabelled
    pixels only (``..._kd``), and also at half weight at labelled ones (``..._kd_blend``)."""
    recipes = {
        "": ("teacher at unlabelled pixels", {}),
        "_blend": ("teacher everywhere, half weight at labelled pixels", {"teacher_blend": 0.5}),
    }
    return {
        f"dynunet_ds_tiny{suffix}_kd{blend}": Variant(
            f"DynUNet 8-128{note}, distilled ({what})",
            "distillation",
            network="dynunet",
            kwargs=kwargs,
            teacher="dynunet_ds",
            train=train,
        )
        for blend, (what, train) in recipes.items()
    }


VARIANTS.update(distilled_variants("", TINY_DYNUNET, ""))
# issue 13 (sixteenth session): the same small DynUNet with batch norms, which fold into the
# convolutions for inference (the instance norms cost the tiny network as much as its convolutions)
VARIANTS.update(distilled_variants("_bn", {**TINY_DYNUNET, "norm": "batch"}, ", batch norm"))

# the final comparison's networks at three times the budget (do their curves flatten?)
LONG_RUNS: dict[str, str] = {
    "dynunet_long": "dynunet",
    "mednet_unet_in_long": "unet_levels_noprior_instance",
    "unet_long": "unet",
    "deeplab_long": "deeplab",
    "mednet1_long": "mednet1",
    "mednet3_long": "mednet3",
    # the paper-faithful MED-Net 3 (today's "mednet") against MED-Net 1 at 3x, three seeds: the
    # issue's "MED-Net 3 >= MED-Net 1 where the curves flatten" (twenty-fifth session)
    "mednet_paper_long": "deep_detached_sigmoid",
    "deeper_noprior_long": "deeper_noprior",
    "mednet_dynunet_long": "mednet_dynunet",
    # the bundle 0.5.0 default where the curves have flattened (twelfth session)
    "dynunet_ds_long": "dynunet_ds",
    # the small DynUNet of issue 13, alone and distilled (fifteenth session)
    "dynunet_ds_tiny_long": "dynunet_ds_tiny",
    "dynunet_ds_tiny_kd_long": "dynunet_ds_tiny_kd",
    "dynunet_ds_tiny_kd_blend_long": "dynunet_ds_tiny_kd_blend",
    # ... and with batch norms (sixteenth session)
    "dynunet_ds_tiny_bn_kd_long": "dynunet_ds_tiny_bn_kd",
    "dynunet_ds_tiny_bn_kd_blend_long": "dynunet_ds_tiny_bn_kd_blend",
}
# ... and at the paper's crop size (batch/4: same px per step). An epoch holds 28 crops of 256 px
# against 252 of 128 px: the 56-epoch runs see the 128 px runs' pixels (1568 crops of 256²).
EQUAL_PX_EPOCHS = 56
CROP256_RUNS: dict[str, tuple[str, dict[str, int]]] = {
    "dynunet_crop256": ("dynunet", {"patch_size": 256}),
    "mednet_unet_in_crop256": ("unet_levels_noprior_instance", {"patch_size": 256}),
    "dynunet_crop256_px": ("dynunet", {"patch_size": 256, "max_epochs": EQUAL_PX_EPOCHS}),
    "mednet_unet_in_crop256_px": (
        "unet_levels_noprior_instance",
        {"patch_size": 256, "max_epochs": EQUAL_PX_EPOCHS},
    ),
    # does the nesting pay once its coarsest level sees 64 px instead of 32? (ninth session)
    "mednet_dynunet_crop256_px": (
        "mednet_dynunet",
        {"patch_size": 256, "max_epochs": EQUAL_PX_EPOCHS},
    ),
    # the bundle 0.5.0 default at the paper's crop size (eleventh session)
    "dynunet_ds_crop256_px": ("dynunet_ds", {"patch_size": 256, "max_epochs": EQUAL_PX_EPOCHS}),
    # ... and against DynUNet at the 3x budget where the 128 px curves flattened, both trained in
    # bf16 on one CPU (nineteenth session; DynUNet's 1x rows above trained in float32)
    "dynunet_ds_crop256_long": (
        "dynunet_ds",
        {"patch_size": 256, "max_epochs": 3 * EQUAL_PX_EPOCHS},
    ),
    "dynunet_crop256_long": ("dynunet", {"patch_size": 256, "max_epochs": 3 * EQUAL_PX_EPOCHS}),
    # ... and at 5x, where the 3x curves still rose over their last third (twenty-first session)
    "dynunet_ds_crop256_5x": ("dynunet_ds", {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS}),
    "dynunet_crop256_5x": ("dynunet", {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS}),
    # "MED-Net 3 >= MED-Net 1 at that budget": the paper-faithful MED-Net and MED-Net 1 level at
    # the final comparison's budget (twenty-eighth session)
    "mednet_paper_crop256_5x": (
        "deep_detached_sigmoid",
        {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS},
    ),
    "mednet1_crop256_5x": ("mednet1", {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS}),
    # ... and the other baselines and the skip variant at that budget: is DynUNet still the best
    # baseline where the curves are flat? (twenty-ninth session)
    "unet_crop256_5x": ("unet", {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS}),
    "deeplab_crop256_5x": ("deeplab", {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS}),
    "mednet_unet_in_crop256_5x": (
        "unet_levels_noprior_instance",
        {"patch_size": 256, "max_epochs": 5 * EQUAL_PX_EPOCHS},
    ),
}


def budget_suffix(max_epochs: int | None) -> str:
    """The label's budget, as a multiple of the 128 px runs' pixels (empty at 1x)."""
    if max_epochs is None or max_epochs == EQUAL_PX_EPOCHS:
        return ""
    return f", {max_epochs // EQUAL_PX_EPOCHS}x budget"


VARIANTS.update(
    {
        name: replace(
            VARIANTS[base],
            label=f"{VARIANTS[base].label}, 256 px crops"
            + (", equal pixels" if "max_epochs" in train else "")
            + budget_suffix(train.get("max_epochs")),
            group="crop 256",
            train=train,
        )
        for name, (base, train) in CROP256_RUNS.items()
    }
)
# thirteenth session: does randomising sharpness, tone curve and contrast (beyond the paper's
# offset and speckle), or a wider zoom (the textures' correlation lengths differ by 1.2-1.4x
# between the two digitisations, beyond the paper's ±10 %), carry a network across them?
RECIPE_RUNS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # name: (base, label suffix, group, TrainConfig overrides)
    "dynunet_ds_appearance": (
        "dynunet_ds",
        "appearance augmentation",
        "appearance",
        {"augment_appearance": True},
    ),
    "dynunet_appearance": (
        "dynunet",
        "appearance augmentation",
        "appearance",
        {"augment_appearance": True},
    ),
    "dynunet_ds_zoom": ("dynunet_ds", "zoom 0.7-1.3", "zoom", {"zoom": 0.3}),
    "dynunet_zoom": ("dynunet", "zoom 0.7-1.3", "zoom", {"zoom": 0.3}),
    # eighteenth session: validate and evaluate a moving average of the weights (EMA, decay 0.99
    # per step: about the last 100 of the 400 steps at 1x weigh most)
    "dynunet_ds_ema": ("dynunet_ds", "weights averaged (EMA 0.99)", "ema", {"ema_decay": 0.99}),
    "dynunet_ema": ("dynunet", "weights averaged (EMA 0.99)", "ema", {"ema_decay": 0.99}),
    # twenty-sixth session: nnU-Net's loss is Dice + cross-entropy; the paper's MDSC+TV plus
    # K x cross-entropy on the labelled pixels (``make_loss("mdsc_tv_ce")``)
    "dynunet_ds_ce": ("dynunet_ds", "MDSC+TV + cross-entropy", "loss", {"loss": "mdsc_tv_ce"}),
    "dynunet_ce": ("dynunet", "MDSC+TV + cross-entropy", "loss", {"loss": "mdsc_tv_ce"}),
}
RECIPE_RUNS.update(
    {long: (base, "3x budget", "3x budget", {"max_epochs": 75}) for long, base in LONG_RUNS.items()}
)
VARIANTS.update(
    {
        name: replace(
            VARIANTS[base],
            label=f"{VARIANTS[base].label}, {suffix}",
            group=group,
            train={**VARIANTS[base].train, **train},
        )
        for name, (base, suffix, group, train) in RECIPE_RUNS.items()
    }
)


def _round4(value: float) -> int:
    return max(4, int(round(value / 4.0)) * 4)


def scaled_kwargs(variant: Variant, scale: float) -> dict[str, Any]:
    """The variant's network options with every width multiplied by ``scale`` (multiple of 4)."""
    kwargs = dict(variant.kwargs)
    if scale == 1.0:
        return kwargs
    name = variant.network
    if name.startswith("mednet"):
        levels = int(name[-1]) if name[-1].isdigit() else 3
        named = {"mednet_dynunet": "dynunet"}.get(name, "unet" if "_unet" in name else "fcn")
        table = WIDTH_TABLES[kwargs.get("level", named)]
        kwargs["widths"] = tuple(_round4(w * scale) for w in table[levels])
    elif name == "unet":
        kwargs["features"] = tuple(_round4(w * scale) for w in UNET_FEATURES)
    elif name == "dynunet":
        filters = kwargs.get("filters", DYNUNET_FILTERS)
        kwargs["filters"] = tuple(_round4(w * scale) for w in filters)
    elif name == "deeplab":
        kwargs["widths"] = tuple(_round4(w * scale) for w in DEEPLAB_WIDTHS)
        kwargs["dilated_widths"] = tuple(_round4(w * scale) for w in DEEPLAB_DILATED)
        kwargs["aspp_width"] = _round4(DEEPLAB_ASPP * scale)
    else:
        raise ValueError(f"no width scaling for {name}")
    return kwargs


@contextlib.contextmanager
def cpu_lock(path: Path = LOCK) -> Iterator[None]:
    """Hold the shared CPU lock (the same lock as ``flock /tmp/rcmseg-cpu.lock``)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_progress(out: Path, message: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} load {os.getloadavg()[0]:.2f} {message}"
    with open(out / "progress.log", "a") as handle:
        handle.write(line + "\n")
    print(line, flush=True)


def split(root: Path, seed: int, validation: int = 4) -> tuple[list[Case], list[Case], list[Case]]:
    """Training, validation (seeded choice among the training side's mosaics: ``usc_1.3`` or
    ``kth_shots_1-6``, the manifest's first clinic) and test (the other clinic's) cases."""
    cases = [c for c in read_manifest(root) if c.labels is not None]
    own_clinic = cases[0].clinic
    own = sorted((c for c in cases if c.clinic == own_clinic), key=lambda c: case_id(c, root))
    test = [c for c in cases if c.clinic != own_clinic]
    chosen = set(np.random.default_rng(seed).permutation(len(own))[:validation].tolist())
    val = [c for i, c in enumerate(own) if i in chosen]
    return [c for i, c in enumerate(own) if i not in chosen], val, test


def evaluate(
    network: torch.nn.Module, cases: Sequence[Case], root: Path, preset: str
) -> dict[str, float]:
    """Mean Dice over classes (pooled confusion) and pooled fragmentation of the predictions,
    with the complete ground truth's fragmentation for reference."""
    network.eval()
    matrix = np.zeros((6, 6), dtype=np.int64)
    sums = {"pred": np.zeros(3), "truth": np.zeros(3)}
    for case in cases:
        image, labels = load_case(case)
        # fp32: the tables stay comparable across machines and sessions (auto may pick bf16)
        probabilities = segment_image(image, network, preset=preset, device="cpu", precision="fp32")
        prediction = probabilities.argmax(axis=0).astype(np.uint8)
        matrix += confusion_matrix(prediction, labels)
        full = np.asarray(Image.open(root / "labels_full" / (Path(case.mosaic).stem + ".png")))
        for key, label_map in (("pred", prediction), ("truth", full)):
            f = fragmentation(label_map, WORKING_MPP)
            sums[key] += (f["components"], f["boundary_mm"], f["lesion_mm2"])
    metrics = one_vs_rest(matrix)
    result = {"dice": float(metrics["mean_dice"])}
    for key, (components, boundary, area) in sums.items():
        result[f"{key}_components_per_mm2"] = components / area if area else math.nan
        result[f"{key}_boundary_mm_per_mm2"] = boundary / area if area else math.nan
    return result


def finished_result(args: argparse.Namespace, run_name: str) -> Path | None:
    """The finished run's result: OUT/runs/NAME[@seed]/result.json, else its kept copy in
    ``--results`` (so a study whose OUT was lost does not train its finished runs again)."""
    candidates = [args.out / "runs" / run_name / "result.json"]
    if args.results is not None:
        candidates.append(args.results / f"{run_name}.json")
    return next((path for path in candidates if path.is_file()), None)


def run_variant(
    name: str, variant: Variant, seed: int, args: argparse.Namespace, data: Path
) -> dict[str, Any]:
    """Train and evaluate one variant (or read its finished result)."""
    run_name = name if seed == args.seed else f"{name}@{seed}"
    run_dir = args.out / "runs" / run_name
    done = run_dir / "result.json"
    finished = finished_result(args, run_name)
    if finished is not None:
        return json.loads(finished.read_text())
    train_cases, val_cases, test_cases = split(data, args.seed)
    kwargs = scaled_kwargs(variant, args.width_scale)
    budget: dict[str, Any] = {
        "max_epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "batch_size": args.batch_size,
        "patch_size": args.patch,
        "optimizer": args.optimizer,
        "learning_rate": args.lr,
    }
    budget.update(variant.train)
    if budget["patch_size"] != args.patch:  # same pixels per optimiser step
        ratio = (budget["patch_size"] / args.patch) ** 2
        budget["batch_size"] = max(1, int(round(args.batch_size / ratio)))
    budget.setdefault("final_learning_rate", budget["learning_rate"] / 10)
    if variant.teacher is not None:
        budget.update(teacher_of(variant.teacher, seed, args, data, run_dir))
    config = TrainConfig(
        data_dir=data,
        output_dir=run_dir / "train",
        train_cases=[case_id(c, data) for c in train_cases],
        val_cases=[case_id(c, data) for c in val_cases],
        network=variant.network,
        network_kwargs=kwargs,
        window=2 * budget["patch_size"],
        window_overlap=0.5,
        augmentation=args.augmentation,
        val_every=args.val_every,
        val_preset=args.preset,
        threads=args.threads,
        device="cpu",
        seed=seed,
        resume=True,
        progress=False,
        amp=args.amp,
        **budget,
    )
    with cpu_lock():
        log_progress(args.out, f"start {run_name}")
        started = time.perf_counter()
        loss = make_loss(config.loss, level_weights=variant.level_weights)
        result = train(config, loss_function=loss)
        trained = time.perf_counter() - started
        network = get_network(variant.network, **kwargs)
        network.load_state_dict(inference_weights(load_checkpoint(result.last_checkpoint)))
        in_domain = evaluate(network, val_cases, data, args.preset)
        other = evaluate(network, test_cases, data, args.preset)
        seconds = time.perf_counter() - started
    crops, curve = 0, []
    for row in result.history:
        crops += int(row["patches"])
        if math.isfinite(row["val_dice"]):
            curve.append((crops, float(row["val_dice"])))
    summary = {
        "name": name,
        "seed": seed,
        "label": variant.label,
        "group": variant.group,
        "network": variant.network,
        "network_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "level_weights": variant.level_weights,
        "train": {k: v for k, v in config.to_dict().items() if k in budget},
        "params": count_parameters(network),
        "crops": crops,
        "final_loss": float(result.history[-1]["dice_term"]),
        "curve": curve,
        "in_domain": in_domain,
        "other": other,
        "amp": args.amp,
        "train_seconds": round(trained, 1),
        "seconds": round(seconds, 1),
    }
    # atomic: a run killed while writing must not leave a result that counts as finished
    write_text_atomic(done, json.dumps(summary, indent=1) + "\n")
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        copy_atomic(done, args.results / f"{run_name}.json")
    log_progress(
        args.out,
        f"done {run_name}: in-domain Dice {in_domain['dice']:.3f}, other {other['dice']:.3f}, "
        f"{seconds:.0f} s",
    )
    return summary


def teacher_of(
    name: str, seed: int, args: argparse.Namespace, data: Path, run_dir: Path
) -> dict[str, Any]:
    """TrainConfig settings that distil from variant ``name``'s run of ``seed`` (trained first
    when missing): the repository's bundle with that run's last-epoch weights."""
    teacher = VARIANTS[name]
    bundle_network = get_network("dynunet_ds")
    if scaled_kwargs(teacher, args.width_scale) != {"deep_supervision": True}:
        raise SystemExit(f"teacher {name} is not the bundle's network at this width")
    run_variant(name, teacher, seed, args, data)
    run_name = name if seed == args.seed else f"{name}@{seed}"
    last = args.out / "runs" / run_name / "train" / "checkpoints" / "last.pt"
    weights = run_dir / "teacher.pt"
    if not weights.is_file():
        state = inference_weights(load_checkpoint(last))
        bundle_network.load_state_dict(state)  # fails loudly if the teacher is not the bundle's
        weights.parent.mkdir(parents=True, exist_ok=True)
        export_weights(state, weights)
    return {"teacher": BUNDLE, "teacher_weights": weights}


def level_dice(
    name: str, args: argparse.Namespace, data: Path, cases: Sequence[Case]
) -> list[float]:
    """Mean Dice of each MED-Net level's own output (coarse to fine, bilinearly upsampled to
    full size) on whole ``cases``, last-epoch weights, batch norms in eval mode: how much each
    level learned. One forward pass per mosaic (sides are multiples of 32)."""
    variant = VARIANTS[name]
    network = get_network(variant.network, **scaled_kwargs(variant, args.width_scale))
    checkpoint = args.out / "runs" / name / "train" / "checkpoints" / "last.pt"
    network.load_state_dict(inference_weights(load_checkpoint(checkpoint)))
    network.train()
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    matrices: list[np.ndarray] = []
    with torch.no_grad():
        for case in cases:
            image, labels = load_case(case)
            outputs = network(torch.from_numpy(image / 255.0).float()[None, None])
            outputs = outputs if isinstance(outputs, list) else [outputs]
            if not matrices:
                matrices = [np.zeros((6, 6), dtype=np.int64) for _ in outputs]
            for index, logits in enumerate(outputs):
                full = torch.nn.functional.interpolate(
                    logits, size=image.shape, mode="bilinear", align_corners=False
                )
                prediction = full.argmax(1)[0].numpy().astype(np.uint8)
                matrices[index] += confusion_matrix(prediction, labels)
    return [float(one_vs_rest(m)["mean_dice"]) for m in matrices]


def rescore_zoomed(
    names: Sequence[str], seeds: Sequence[int], zooms: Sequence[float], args: argparse.Namespace
) -> str:
    """Other-digitisation Dice of finished runs on test sets whose textures are enlarged by each
    of ``zooms`` (a scale-matched test: how much of the gap between the digitisations is
    scale). Datasets go to ``OUT/data_zoom<Z>``, results to each run's ``other_zoom<Z>.json``;
    returns a Markdown table (mean ± sd over seeds)."""
    columns = " | ".join(f"other, test zoom {z:g}" for z in (1.0, *zooms))
    lines = [
        f"| variant | seeds | {columns} |",
        "|---|---:|" + "---:|" * (len(zooms) + 1),
    ]
    for name in names:
        variant = VARIANTS[name]
        per_zoom: list[list[float]] = [[] for _ in (1.0, *zooms)]
        for seed in seeds:
            run_dir = args.out / "runs" / (name if seed == args.seed else f"{name}@{seed}")
            finished = run_dir / "result.json"
            if not finished.is_file():
                continue
            per_zoom[0].append(json.loads(finished.read_text())["other"]["dice"])
            for column, zoom in enumerate(zooms, start=1):
                scored = run_dir / f"other_zoom{zoom:g}.json"
                if not scored.is_file():
                    data = args.out / f"data_zoom{zoom:g}"
                    with cpu_lock():
                        write_benchmark_dataset(args, data, test_zoom=zoom)
                        network = get_network(
                            variant.network, **scaled_kwargs(variant, args.width_scale)
                        )
                        last = run_dir / "train" / "checkpoints" / "last.pt"
                        network.load_state_dict(inference_weights(load_checkpoint(last)))
                        metrics = evaluate(network, split(data, args.seed)[2], data, args.preset)
                    scored.write_text(json.dumps(metrics, indent=1) + "\n")
                per_zoom[column].append(json.loads(scored.read_text())["dice"])
        if per_zoom[0]:
            cells = " | ".join(_mean_sd(values) for values in per_zoom)
            lines.append(f"| `{name}` | {len(per_zoom[0])} | {cells} |")
    return "\n".join(lines)


def paired_report(results: dict[str, list[dict[str, Any]]]) -> str:
    """How flat each variant's seed-mean learning curve ends, and each variant against the first
    one paired by seed: the figures the study's verdicts rest on (Markdown bullets).

    Flatness: the seed-mean validation Dice's gain over the last third of the crops and its range
    over the last five validations. Pairs: in-domain and other-digitisation Dice differences per
    shared seed, and at how many validations the seed-mean curve is at or above the first's."""
    lines: list[str] = []
    means: dict[str, np.ndarray] = {}
    for name, runs in results.items():
        curves = [np.array(r["curve"], dtype=float) for r in runs]
        if not curves or any(len(c) != len(curves[0]) for c in curves):
            continue
        crops = curves[0][:, 0]
        mean = np.mean([c[:, 1] for c in curves], axis=0)
        means[name] = mean
        third = int(np.searchsorted(crops, crops[-1] * 2 / 3, side="right")) - 1
        lines.append(
            f"- `{name}` ({len(runs)} seeds): seed-mean validation Dice "
            f"{mean[-1] - mean[third]:+.3f} over the last third "
            f"(from {crops[third]:.0f} crops), last five {mean[-5:].min():.3f}-"
            f"{mean[-5:].max():.3f}"
        )
    names = list(results)
    first = {run["seed"]: run for run in results[names[0]]} if names else {}
    for name in names[1:]:
        pairs = [(first[r["seed"]], r) for r in results[name] if r["seed"] in first]
        if not pairs:
            continue
        cells = []
        for table in ("in_domain", "other"):
            diffs = [a[table]["dice"] - b[table]["dice"] for a, b in pairs]
            cells.append(
                f"{table} {np.mean(diffs):+.3f} (" + " / ".join(f"{d:+.3f}" for d in diffs) + ")"
            )
        ahead = ""
        if names[0] in means and name in means and len(means[name]) == len(means[names[0]]):
            at_or_above = int(np.sum(means[names[0]] >= means[name]))
            ahead = f"; `{names[0]}` at or above at {at_or_above} of {len(means[name])} validations"
        seeds = "/".join(str(a["seed"]) for a, _ in pairs)
        lines.append(
            f"- `{names[0]}` minus `{name}`, paired by seed {seeds}: " + ", ".join(cells) + ahead
        )
    return "\n".join(lines) + "\n" if lines else ""


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def write_table(results: dict[str, list[dict[str, Any]]], path: Path) -> str:
    """Markdown table, one row per variant (mean ± sd over seeds when there are several)."""
    lines = [
        "| variant | params | crops seen | in-domain Dice | other-digitisation Dice "
        "| components / mm² (in-domain; truth) | boundary mm / mm² (in-domain; truth) "
        "| last loss | s |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        first = runs[0]
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        comp = [r["in_domain"]["pred_components_per_mm2"] for r in runs]
        bound = [r["in_domain"]["pred_boundary_mm_per_mm2"] for r in runs]
        lines.append(
            f"| `{name}`: {first['label']}{seeds} | {first['params'] / 1e6:.2f} M "
            f"| {first['crops']} | {_mean_sd([r['in_domain']['dice'] for r in runs])} "
            f"| {_mean_sd([r['other']['dice'] for r in runs])} "
            f"| {np.mean(comp):.0f} ({first['in_domain']['truth_components_per_mm2']:.0f}) "
            f"| {np.mean(bound):.1f} ({first['in_domain']['truth_boundary_mm_per_mm2']:.1f}) "
            f"| {np.mean([r['final_loss'] for r in runs]):.2f} "
            f"| {np.mean([r['seconds'] for r in runs]):.0f} |"
        )
    table = "\n".join(lines) + "\n"
    path.write_text(table)
    return table


PALETTE = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
]


def plot_curves(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation Dice against crops seen, one panel per group (each with the MED-Net 3 and
    U-Net references, dashed), drawn with PIL (no matplotlib here)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)  # at size 10 a space is 2 px wide
    groups: list[str] = []
    for runs in results.values():
        if runs[0]["group"] not in groups:
            groups.append(runs[0]["group"])
    references = [n for n in ("mednet3", "unet") if n in results]
    reference_colours = {"mednet3": (160, 160, 160), "unet": (60, 60, 60)}
    panel_w, panel_h, cols = 520, 380, min(3, len(groups))
    rows = -(-len(groups) // cols)
    canvas = Image.new("RGB", (cols * panel_w, rows * panel_h), "white")
    draw = ImageDraw.Draw(canvas)
    max_crops = max(p[0] for runs in results.values() for r in runs for p in r["curve"]) or 1
    for index, group in enumerate(groups):
        x0, y0 = (index % cols) * panel_w, (index // cols) * panel_h
        left, top, right, bottom = x0 + 50, y0 + 30, x0 + panel_w - 170, y0 + panel_h - 40
        draw.text(
            (x0 + 50, y0 + 8), f"{group}: validation Dice vs crops seen", fill="black", font=font
        )
        for tick in np.linspace(0, 1, 6):
            y = bottom - tick * (bottom - top)
            draw.line((left - 4, y, left, y), fill="black")
            draw.line((left, y, right, y), fill=(230, 230, 230))
            draw.text((x0 + 18, y - 6), f"{tick:.1f}", fill="black", font=font)
        for tick in np.linspace(0, max_crops, 5):
            x = left + tick / max_crops * (right - left)
            draw.line((x, bottom, x, bottom + 4), fill="black")
            draw.text((x - 12, bottom + 8), f"{tick:.0f}", fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((right - 60, bottom + 22), "crops seen", fill="black", font=font)
        members = [n for n, runs in results.items() if runs[0]["group"] == group]
        names = references + [n for n in members if n not in references]
        for rank, name in enumerate(names):
            colour = reference_colours.get(name, PALETTE[rank % len(PALETTE)])
            dashed = name in references and group != "networks"
            for run in results[name]:
                points = [
                    (left + c / max_crops * (right - left), bottom - d * (bottom - top))
                    for c, d in run["curve"]
                ]
                if dashed:
                    for a, b in zip(points[:-1], points[1:], strict=True):
                        mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                        draw.line((a, mid), fill=colour, width=2)
                elif len(points) > 1:
                    draw.line(points, fill=colour, width=2)
                for x, y in points:
                    draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
            ly = top + 14 * rank
            draw.line((right + 8, ly + 6, right + 24, ly + 6), fill=colour, width=3)
            draw.text((right + 28, ly), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_arguments(
        parser,
        train_mosaics=32,
        test_mosaics=12,
        size=512,
        shrink=2,
        epochs=25,
        iterations=18,
        batch_size=16,
        patch=128,
        lr=2e-3,
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/mednet_ablation"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: --seed")
    parser.add_argument("--augmentation", default="batched")
    parser.add_argument("--width-scale", type=float, default=0.5)
    parser.add_argument("--val-every", type=int, default=3)
    parser.add_argument("--preset", default="fast")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train in mixed precision (bf16 on CPUs with native bf16); the tables are float32",
    )
    parser.add_argument("--png", type=Path, default=None, help="learning curves PNG")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="keep a copy of each finished run's result here (NAME[@seed].json) and count the "
        "runs found here as finished",
    )
    parser.add_argument("--report-only", action="store_true", help="no training, just report")
    parser.add_argument(
        "--rescore-zoom",
        nargs="*",
        type=float,
        default=[],
        help="evaluate the finished runs again on test sets with textures enlarged this much",
    )
    parser.add_argument(
        "--level-dice",
        nargs="*",
        default=[],
        help="finished MED-Net variants whose per-level Dice (in-domain) to print",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    needs_data = not args.report_only or args.level_dice
    if needs_data and not (data / "manifest.csv").is_file():
        with cpu_lock():
            write_benchmark_dataset(args, data)
    seeds = args.seeds or [args.seed]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    for seed in seeds:  # seed-major: an interrupted study has every network at the first seeds
        for name in args.variants:
            run_name = name if seed == args.seed else f"{name}@{seed}"
            if (args.report_only or args.rescore_zoom) and not finished_result(args, run_name):
                continue
            results[name].append(run_variant(name, VARIANTS[name], seed, args, data))
    results = {name: runs for name, runs in results.items() if runs}
    if args.rescore_zoom:
        print(rescore_zoomed(args.variants, seeds, args.rescore_zoom, args))
        return
    table = write_table(results, args.out / "table.md")
    print(table)
    print(paired_report(results))
    if args.png is not None and results:
        plot_curves(results, args.png)
    if args.level_dice:
        _train, val_cases, _test = split(data, args.seed)
        with cpu_lock():
            for name in args.level_dice:
                dice = level_dice(name, args, data, val_cases)
                print(
                    f"{name}: Dice per level, coarse to fine: "
                    + ", ".join(f"{d:.2f}" for d in dice)
                )


if __name__ == "__main__":
    main()
