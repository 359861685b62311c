"""Train a MONAI bundle's network through the bundle's own ``configs/train.json``.

The bundle's config defines the network, loss and optimiser settings and calls
:func:`rcmseg.training.train` (its ``run`` expression), so ``rcmseg train bundle``,
``python -m monai.bundle run --config_file configs/train.json`` and ``torchrun ... -m monai.bundle
run --config_file "['train.json','multi_gpu_train.json']"`` all train the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rcmseg.errors import InputError, errors_to_caller, input_error_in
from rcmseg.training.config import TrainResult

TRAIN_CONFIG = Path("configs/train.json")
METADATA = Path("configs/metadata.json")
LOGGING = Path("configs/logging.conf")
# TrainConfig fields that belong to one run (data, folders, split, device), not to the recipe.
RUN_FIELDS = frozenset(
    {
        "data_dir",
        "output_dir",
        "export_path",
        "train_cases",
        "val_cases",
        "fold",
        "num_folds",
        "label_remap",
        "device",
        "resume",
        "stop_after_epochs",
        "progress",
        "num_workers",
        # A teacher trained on the whole data set has seen every held-out fold: cv and study
        # train the student's network on the labels alone, or its figures would leak them.
        "teacher",
        "teacher_weights",
        "teacher_blend",
    }
)


def bundle_train_settings(bundle_dir: str | Path | None = None) -> dict[str, Any]:
    """The training recipe of a bundle's ``configs/train.json`` as TrainConfig fields.

    Network, loss, optimiser, schedule, patch sampling, augmentation, AMP and workers, as the
    bundle's ``train_config`` resolves them; run-specific fields (``RUN_FIELDS``) are left out, so
    ``rcmseg cv`` and ``rcmseg study`` train every fold the way the bundle trains (but without a
    distillation teacher, which would have seen the held-out folds).
    ``bundle_dir=None`` reads the bundled ``rcm_mednet``.

    Raises:
        InputError: the folder has no ``train.json`` or it does not resolve to a TrainConfig.
    """
    from monai.bundle import ConfigParser

    from rcmseg.bundle import default_bundle_dir
    from rcmseg.training.config import TrainConfig

    root = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    config_file = root / TRAIN_CONFIG
    if not config_file.is_file():
        raise InputError(config_file, "missing: the bundle has no training config")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(root)
    config = resolve_train_config(parser, config_file)
    if not isinstance(config, TrainConfig):
        raise InputError(config_file, "train_config is not an rcmseg.training.TrainConfig")
    settings = {k: v for k, v in config.to_dict().items() if k not in RUN_FIELDS}
    settings.update(network_settings(parser, config_file))
    return settings


def network_settings(parser: Any, config_file: Path) -> dict[str, Any]:
    """``network`` and ``network_kwargs`` of the bundle's ``network_def`` (resolved values), so
    that any change of ``network_def`` reaches ``cv``/``study`` as it reaches ``train bundle``."""
    raw = parser.get("network_def")
    if not isinstance(raw, dict) or not str(raw.get("_target_", "")).endswith("get_network"):
        raise InputError(
            config_file, "network_def must call rcmseg.networks.get_network for cv and study"
        )
    kwargs = {
        key: parser.get_parsed_content(f"network_def#{key}")
        for key in raw
        if not key.startswith("_") and key not in ("in_channels", "out_channels")
    }
    return {"network": str(kwargs.pop("name")), "network_kwargs": kwargs}


def with_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with command-line ``overrides`` on top. A recipe's own ``lr_scheduler`` was
    set up for its epochs and rate: when ``--epochs`` or ``--lr`` change them, the paper's
    exponential decay (``learning_rate`` → ``final_learning_rate``) replaces it."""
    merged = {**recipe, **overrides}
    if {"max_epochs", "learning_rate"} & set(overrides):
        merged["lr_scheduler"] = None
    return merged


def with_variant(recipe: dict[str, Any], network: str, loss: str) -> dict[str, Any]:
    """``recipe`` training ``network`` with ``loss``: the recipe's network widths and TV weight γ
    apply only to the recipe's own network and loss (an ablation loss keeps its default γ = 0)."""
    options = {**recipe, "network": network, "loss": loss}
    if network != recipe.get("network"):
        options.pop("network_kwargs", None)
    if loss != recipe.get("loss"):
        options.pop("tv_weight", None)
    return options


def train_bundle(
    bundle_dir: str | Path,
    data_dir: str | Path,
    resume: bool = False,
    **overrides: Any,
) -> TrainResult:
    """Run ``bundle_dir/configs/train.json`` on the dataset ``data_dir``.

    Args:
        bundle_dir: the bundle folder; the best weights go to its ``models/model.pt``, the run
            (checkpoints, ``train_log.csv``) to its ``runs/train``.
        data_dir: dataset root holding ``manifest.csv``.
        resume: continue from the bundle's last checkpoint when there is one.
        overrides: train.json ids and values, e.g. ``epochs=2``, ``fold=1``, ``device="cpu"``,
            ``iterations_per_epoch=5``.

    Raises:
        InputError: the folder is not a bundle with a ``train.json``, or the data set is bad.
    """
    from monai.bundle import ConfigWorkflow

    root = Path(bundle_dir)
    config_file = root / TRAIN_CONFIG
    if not config_file.is_file():
        raise InputError(config_file, "missing: the bundle has no training config")
    if not (Path(data_dir) / "manifest.csv").is_file():
        raise InputError(data_dir, "no manifest.csv here: not a data set (see `rcmseg synth`)")
    if "device" in overrides:
        from rcmseg.inference import resolve_device

        overrides["device"] = resolve_device(overrides["device"])
    # MONAI's notes on the workflow type and the logging file are not the user's concern
    workflow_log = logging.getLogger("monai.bundle.workflows")
    level = workflow_log.level
    workflow_log.setLevel(logging.ERROR)
    try:
        workflow = ConfigWorkflow(
            config_file=str(config_file),
            meta_file=str(root / METADATA) if (root / METADATA).is_file() else None,
            logging_file=str(root / LOGGING) if (root / LOGGING).is_file() else False,
            workflow_type=None,
            bundle_root=str(root),
            dataset_dir=str(data_dir),
            resume=resume,
            **overrides,
        )
    finally:
        workflow_log.setLevel(level)
    with errors_to_caller():  # no process-wide hook (input_errors_in_one_line) in a caller
        workflow.initialize()
    # every component "run" uses, so that a config error is one line before training starts
    used = [key for key in ("network", "loss") if workflow.parser.get(key) is not None]
    resolve_train_config(workflow.parser, config_file, also=used)
    with errors_to_caller():  # train.json's run says a bad data set in one line and exits...
        try:
            results = workflow.run()
        except Exception as error:  # ... here the InputError is raised, not wrapped by MONAI
            cause = input_error_in(error)
            if cause is None:
                raise
            raise InputError(cause.path, cause.problem) from error
    workflow.finalize()
    return results[0]


def resolve_train_config(parser: Any, config_file: Path, also: Sequence[str] = ()) -> Any:
    """The parser's resolved ``train_config`` (and the ids in ``also``, resolved after it), or an
    InputError naming ``config_file``: the InputError a component raised (MONAI wraps it in a
    RuntimeError), else MONAI's own error (an unknown ``_target_``, a bad reference or
    expression, a constructor's ValueError)."""
    resolved: dict[str, Any] = {}
    key = "imports"
    try:
        for key in ("imports", "train_config", *also):
            resolved[key] = parser.get_parsed_content(key)
    except Exception as error:  # MONAI raises several types for a bad config
        cause = input_error_in(error)
        if cause is not None:
            raise InputError(cause.path or config_file, cause.problem) from error
        raise InputError(config_file, f"{key} does not resolve: {error}") from error
    return resolved["train_config"]
