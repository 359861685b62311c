"""Real-texture benchmark: MED-Net 3/2/1 levels, the baselines and the default, same budget.

Usage::

    python benchmarks/texture_bench.py /work/shared/data/textures --out /tmp/texture_bench

Builds partially labelled multi-region mosaics from six real Brodatz textures
(``benchmarks/texture_mosaics.py``): training mosaics from the USC-SIPI ``1.3`` digitisation,
test mosaics from the ``1.1`` digitisation (Scenario 2 with the digitisation as the group). Every
variant is trained with the same budget through ``rcmseg.training.train`` and evaluated on the
test mosaics with the shared inference path (``rcmseg.evaluation``); the comparison table goes
to ``OUT/study/comparison.md`` and wall-clock times to ``OUT/study/timings.json``. Resumable: a
finished variant is not retrained. The data stays where it is; nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from texture_mosaics import (  # noqa: E402
    add_benchmark_arguments,
    clinic_groups,
    describe,
    texture_names,
    write_benchmark_dataset,
)

from rcmseg.evaluation.cv import SplitSettings, case_id, load_trained_network  # noqa: E402
from rcmseg.evaluation.evaluate import evaluate_cases  # noqa: E402
from rcmseg.evaluation.study import STUDIES, Variant, parameter_count, run_study  # noqa: E402
from rcmseg.io.dataset import read_manifest  # noqa: E402
from rcmseg.splits import read_folds  # noqa: E402

VARIANTS = (
    "mednet",
    "mednet2",
    "mednet1",
    "unet",
    "fcn",
    "segnet",
    "deeplab",
    "dynunet",
    "dynunet_ds",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_benchmark_arguments(
        parser,
        train_mosaics=16,
        test_mosaics=6,
        size=512,
        shrink=2,
        epochs=4,
        iterations=6,
        batch_size=8,
        # 128 px: the paper-faithful MED-Net's coarsest level needs crops of a multiple of 128
        patch=128,
        lr=1e-3,
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/rcmseg_texture_bench"))
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="network[:loss] per variant (default: MED-Net 3/2/1, baselines, dynunet_ds)",
    )
    parser.add_argument(
        "--preset", default="fast", help="inference preset (fast: 256 px windows, 50 %% overlap)"
    )
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def in_domain_table(
    variants: list[Variant],
    data: Path,
    study_dir: Path,
    preset: str,
    device: str,
    source: str = "usc",
) -> str:
    """Each variant's trained model on its validation mosaics (the training digitisation).

    The study tests on the other digitisation; this second table separates what a network
    learned about the textures from how it copes with the change of scan.
    """
    import torch

    _settings, folds = read_folds(study_dir / "folds.json")
    cases = {case_id(c, data): c for c in read_manifest(data)}
    names = texture_names(source)
    lines = [
        "| network | params | " + " | ".join(names) + " | mean Dice |",
        "|:---|---:|" + "---:|" * (len(names) + 1),
    ]
    for variant in variants:
        fold_dir = study_dir / variant.name / "fold_0"
        network = load_trained_network(
            variant.network,
            dict(variant.network_kwargs),
            fold_dir / "train" / "model.pt",
            torch.device(device),
        )
        evaluation = evaluate_cases(
            network,
            [cases[i] for i in folds[0].validation],
            data,
            fold_dir / "in_domain",
            preset=preset,
            device=device,
            overlays=0,
            title=f"{variant.name}: validation mosaics (training digitisation)",
            progress=False,
        )
        dice = evaluation.pooled()["dice"]
        millions = parameter_count(variant) / 1e6
        lines.append(
            f"| {variant.name} | {millions:.2f} M | "
            + " | ".join(f"{d:.2f}" for d in dice[:-1])
            + f" | {dice[-1]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    data, study_dir = args.out / "data", args.out / "study"
    write_benchmark_dataset(args, data)
    print(describe(args.source))
    variants = [Variant.parse(v) for v in args.variants]
    test_group = clinic_groups(args.source)[1]
    split = SplitSettings(scenario="groups", test_groups=[test_group], seed=args.seed)
    budget = {
        "max_epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "batch_size": args.batch_size,
        "patch_size": args.patch,
        "window": 2 * args.patch,
        "window_overlap": 0.5,
        "optimizer": args.optimizer,
        "learning_rate": args.lr,
        "final_learning_rate": args.lr / 10,
        "val_every": args.epochs,
        "val_preset": args.preset,
        "threads": args.threads,
        "seed": args.seed,
    }

    def study(chosen: list[Variant]) -> None:
        run_study(
            chosen,
            data,
            study_dir,
            split,
            budget,
            device=args.device,
            preset=args.preset,
            progress=False,
            title="Real-texture benchmark",
        )

    timings_file = study_dir / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for variant in variants:  # one at a time, to time each
        if variant.name in timings:
            continue
        start = time.perf_counter()
        study([variant])
        timings[variant.name] = round(time.perf_counter() - start, 1)
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")
        print(f"{variant.name}: {timings[variant.name]} s", flush=True)
    study(variants)  # all finished: this writes the comparison of them all
    print((study_dir / "comparison.md").read_text())
    in_domain = in_domain_table(variants, data, study_dir, args.preset, args.device, args.source)
    (study_dir / "in_domain.md").write_text(in_domain)
    print("Dice on the validation mosaics (training digitisation):")
    print(in_domain)
    print("wall-clock seconds per variant (train + validate + test):", timings)


if __name__ == "__main__":
    assert set(VARIANTS) <= {v.network for v in STUDIES["paper"]}
    main()
