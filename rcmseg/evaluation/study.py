"""Studies: several variants (network × loss) cross-validated on the same folds, one table.

The paper's comparisons are presets: ``levels`` (MED-Net with 3, 2 and 1 levels), ``losses``
(cross-entropy, soft Dice, MDSC+TV), ``baselines`` (MED-Net against U-Net, FCN, SegNet, DeepLab)
and ``paper`` (all of them). Every variant gets the same fold assignment (``OUT/folds.json``), the
same training budget and the same inference preset, so the table compares like with like.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rcmseg.classes import CLASS_NAMES
from rcmseg.errors import InputError
from rcmseg.evaluation import report
from rcmseg.evaluation.cv import CVResult, SplitSettings, prepare_folds, run_cv
from rcmseg.io.atomic import write_csv_atomic
from rcmseg.losses import LOSS_NAMES
from rcmseg.networks import NETWORK_NAMES, count_parameters, get_network
from rcmseg.training import TrainConfig, check_patch_size
from rcmseg.training.bundle import with_variant

NETWORKS = NETWORK_NAMES


@dataclass(frozen=True)
class Variant:
    """One row of a study: a network of :func:`rcmseg.networks.get_network` and a loss."""

    network: str
    loss: str = "mdsc_tv"
    network_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.network}-{self.loss}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``network`` or ``network:loss`` (e.g. ``mednet1``, ``unet:ce``)."""
        network, _, loss = text.strip().partition(":")
        variant = cls(network.strip().lower(), (loss.strip().lower() or "mdsc_tv"))
        if variant.network not in NETWORKS:
            raise InputError(
                None,
                f"unknown network {variant.network!r} in variant {text!r}; "
                f"choose from {', '.join(NETWORKS)}",
            )
        if variant.loss not in LOSS_NAMES:
            raise InputError(
                None,
                f"unknown loss {variant.loss!r} in variant {text!r}; "
                f"choose from {', '.join(LOSS_NAMES)}",
            )
        return variant


STUDIES: dict[str, tuple[Variant, ...]] = {
    "levels": (Variant("mednet"), Variant("mednet2"), Variant("mednet1")),
    "losses": (Variant("mednet", "ce"), Variant("mednet", "dice"), Variant("mednet")),
    "baselines": (
        Variant("mednet"),
        Variant("unet"),
        Variant("fcn"),
        Variant("segnet"),
        Variant("deeplab"),
        Variant("dynunet"),  # nnU-Net's architecture: the bundle's network in 0.4
        Variant("dynunet_ds"),  # ... trained with deep supervision: the bundle's since 0.5.0
        Variant("mednet_unet_in"),  # U-Net-like levels (docs/benchmarks.md)
        Variant("mednet_dynunet"),  # DynUNet levels in MED-Net's nesting
    ),
}
STUDIES["paper"] = tuple(
    dict.fromkeys(STUDIES["levels"] + STUDIES["baselines"] + STUDIES["losses"])
)


def parameter_count(variant: Variant) -> int:
    """Trainable parameters of the variant's network (6 output classes, 1 input channel)."""
    return count_parameters(get_network(variant.network, **variant.network_kwargs))


def run_study(
    variants: Sequence[Variant],
    data_dir: str | Path,
    out_dir: str | Path,
    split: SplitSettings | None = None,
    train_options: dict[str, Any] | None = None,
    preset: str = "fast",
    device: str = "auto",
    remap: dict[int, int] | None = None,
    overlays: int = 1,
    title: str = "Study",
    progress: bool = True,
) -> dict[str, CVResult]:
    """Cross-validate every variant on one shared fold assignment; write the comparison table.

    Each variant runs in ``OUT/<network>-<loss>/`` (resumable like ``rcmseg cv``); the table goes
    to ``OUT/comparison.md`` and ``OUT/comparison.csv``.
    """
    if not variants:
        raise InputError(None, "a study needs at least one variant")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InputError(None, f"variants repeat: {', '.join(names)}")
    # every variant's crop size is checked before the first one trains for an hour
    patch_size = (train_options or {}).get("patch_size", TrainConfig.patch_size)
    for variant in variants:
        network = get_network(variant.network, **variant.network_kwargs)
        check_patch_size(network, variant.network, patch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split or SplitSettings()
    prepare_folds(Path(data_dir), out, split, remap)
    results = {}
    for variant in variants:
        options = with_variant(train_options or {}, variant.network, variant.loss)
        options["network_kwargs"] = dict(variant.network_kwargs)
        results[variant.name] = run_cv(
            data_dir,
            out / variant.name,
            split,
            options,
            preset=preset,
            device=device,
            remap=remap,
            overlays=overlays,
            folds_file=out / "folds.json",
            title=f"{title}: {variant.name}",
            progress=progress,
        )
    write_comparison(out, variants, results, title, split, train_options or {}, preset)
    return results


def comparison_rows(
    variants: Sequence[Variant], results: dict[str, CVResult]
) -> tuple[list[str], list[list[str]], list[list[object]]]:
    """Header, Markdown and CSV rows: Dice per class, then mean sensitivity/specificity/Dice."""
    header = [
        "variant",
        "parameters",
        *[f"Dice {c}" for c in CLASS_NAMES],
        "mean sensitivity",
        "mean specificity",
        "mean Dice",
    ]
    md_rows, csv_rows = [], []
    for variant in variants:
        means, stds = results[variant.name].summary()
        params = parameter_count(variant)
        cells = [(float(means["dice"][i]), float(stds["dice"][i])) for i in range(len(CLASS_NAMES))]
        cells += [(float(means[m][-1]), float(stds[m][-1])) for m in report.METRICS]
        md_rows.append(
            [variant.name, f"{params / 1e6:.2f} M"] + [report.format_value(m, s) for m, s in cells]
        )
        csv_rows.append(
            [variant.name, params] + [report.csv_number(v) for cell in cells for v in cell]
        )
    return header, md_rows, csv_rows


def write_comparison(
    out: Path,
    variants: Sequence[Variant],
    results: dict[str, CVResult],
    title: str,
    split: SplitSettings,
    train_options: dict[str, Any],
    preset: str,
) -> None:
    header, md_rows, csv_rows = comparison_rows(variants, results)
    csv_header = header[:2] + [f"{h}{suffix}" for h in header[2:] for suffix in ("", " sd")]
    write_csv_atomic(out / "comparison.csv", csv_header, csv_rows)
    best = max(
        variants, key=lambda v: np.nan_to_num(results[v.name].summary()[0]["dice"][-1], nan=-1.0)
    )
    folds = len(next(iter(results.values())).evaluations)
    budget = ", ".join(f"{k}={v}" for k, v in train_options.items() if k != "progress")
    lines = [
        f"# {title}",
        "",
        f"Split: {json.dumps(split.to_json())}; {folds} fold(s). Training budget (same for "
        f"every variant): {budget or 'TrainConfig defaults'}; inference preset `{preset}`.",
        "Dice per class and means over classes, pooled per fold over the test mosaics' "
        "labelled pixels; mean ± sd over folds where there are several.",
        "",
        report.markdown_table(header, md_rows),
        "",
        f"Best mean Dice: `{best.name}`.",
        "",
        "Per-variant reports: " + ", ".join(f"[{v.name}]({v.name}/report.md)" for v in variants),
        "",
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
