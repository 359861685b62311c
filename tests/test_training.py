"""The trainer on real synthetic mosaics (written by ``rcmseg.synth`` and read back from disk):
it learns, resumes exactly, splits patient-wise, augments honestly and rejects bad data sets."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rcmseg.bundle import default_bundle_dir
from rcmseg.classes import NUM_CLASSES, UNLABELLED
from rcmseg.cli.main import app
from rcmseg.errors import InputError
from rcmseg.inference import SegmentationEngine
from rcmseg.io.dataset import load_case, read_manifest
from rcmseg.losses import make_loss
from rcmseg.metrics import confusion_matrix, one_vs_rest
from rcmseg.networks import get_network
from rcmseg.synth import write_dataset
from rcmseg.training import TrainConfig, train
from rcmseg.training.augment import APPEARANCE, BatchAugment
from rcmseg.training.data import split_cases
from rcmseg.training.distill import distillation_targets, load_teacher
from rcmseg.training.loop import _batch_augment

torch.set_num_threads(2)

SMALL = {"widths": (8, 16, 32, 64, 64)}  # a narrow MED-Net: same structure, fast on a CPU
UNET = {"features": (8, 16, 32, 64, 64, 8)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 2048 px mosaics (512 px at 2 µm/px), one patient each."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=5, size=2048, seed=11, patients=5)
    return root


def quick_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "data_dir": data,
        "output_dir": out,
        "val_cases": ["synth_0004"],
        "network": "mednet2",  # crops of 64 px: a multiple of what it needs
        "network_kwargs": SMALL,
        "patch_size": 64,
        "window": 128,
        "batch_size": 4,
        "iterations_per_epoch": 2,
        "max_epochs": 3,
        "device": "cpu",
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def chance_dice(labels: np.ndarray) -> float:
    """Expected mean Dice over classes of a uniformly random prediction on these labels."""
    counts = np.bincount(labels[labels != UNLABELLED], minlength=NUM_CLASSES).astype(float)
    prevalence = counts / counts.sum()
    dice = 2 * prevalence / NUM_CLASSES / (prevalence + 1 / NUM_CLASSES)
    return float(dice.mean())


def test_short_training_learns_and_beats_chance_on_held_out_mosaic(
    dataset: Path, tmp_path: Path
) -> None:
    # Small enough for a 2-core CPU in about a minute: a narrow U-Net baseline (its skip
    # connections carry what it learns on 64 px crops over to 512 px inference windows),
    # cross-entropy (the fastest of the three losses to get going), no augmentation.
    config = quick_config(
        dataset,
        tmp_path / "run",
        network="unet",
        network_kwargs=UNET,
        loss="ce",
        augmentation="none",
        batch_size=16,
        iterations_per_epoch=10,
        max_epochs=12,
        optimizer="adam",
        learning_rate=3e-3,
        final_learning_rate=1e-3,
        val_every=6,
    )
    result = train(config)

    losses = [row["loss"] for row in result.history]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    assert result.model_path.is_file() and result.log_path.is_file()
    with result.log_path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["epoch"]) for row in rows] == list(range(1, 13))
    assert math.isnan(result.history[0]["val_dice"]) and not math.isnan(result.best_val_dice)

    # The exported weights, read weights-only into a fresh network, segment the held-out mosaic.
    network = get_network("unet", **UNET)
    network.load_state_dict(torch.load(result.model_path, weights_only=True))
    held_out = next(c for c in read_manifest(dataset) if c.mosaic.stem == "synth_0004")
    image, labels = load_case(held_out)
    prediction = SegmentationEngine(network, "fast", "cpu").labels(image)
    dice = one_vs_rest(confusion_matrix(prediction, labels))["mean_dice"]
    assert dice == pytest.approx(result.best_val_dice, abs=1e-9)
    assert dice > chance_dice(labels) + 0.05


def test_resume_after_interruption_gives_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    straight = train(quick_config(dataset, tmp_path / "straight"))
    interrupted = quick_config(dataset, tmp_path / "resumed", stop_after_epochs=1)
    assert train(interrupted).epochs_completed == 1
    resumed = train(quick_config(dataset, tmp_path / "resumed", resume=True))

    assert resumed.epochs_completed == 3
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for name in ("last", "best"):
        a = torch.load(getattr(straight, f"{name}_checkpoint"), weights_only=True)
        b = torch.load(getattr(resumed, f"{name}_checkpoint"), weights_only=True)
        assert a["epochs_done"] == b["epochs_done"]
        for key, tensor in a["network"].items():
            assert torch.equal(tensor, b["network"][key]), key
        momentum = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
        momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
        assert all(torch.equal(x, y) for x, y in zip(momentum, momentum_b, strict=True))
    assert torch.load(resumed.model_path, weights_only=True).keys() == a["network"].keys()


def test_weight_average_validates_exports_and_resumes(dataset: Path, tmp_path: Path) -> None:
    straight = train(quick_config(dataset, tmp_path / "straight", ema_decay=0.9))
    best = torch.load(straight.best_checkpoint, weights_only=True)
    exported = torch.load(straight.model_path, weights_only=True)
    assert best["ema_steps"] == 2 * best["epochs_done"]  # one update per optimiser step
    assert all(torch.equal(exported[key], best["ema_network"][key]) for key in exported)
    assert any(not torch.equal(exported[key], best["network"][key]) for key in exported)

    # The validation Dice is the averaged weights' Dice.
    network = get_network("mednet2", **SMALL)
    network.load_state_dict(exported)
    held_out = next(c for c in read_manifest(dataset) if c.mosaic.stem == "synth_0004")
    image, labels = load_case(held_out)
    prediction = SegmentationEngine(network, "fast", "cpu").labels(image)
    dice = one_vs_rest(confusion_matrix(prediction, labels))["mean_dice"]
    assert dice == pytest.approx(straight.best_val_dice, abs=1e-9)

    interrupted = quick_config(dataset, tmp_path / "resumed", ema_decay=0.9, stop_after_epochs=1)
    train(interrupted)
    resumed = train(quick_config(dataset, tmp_path / "resumed", ema_decay=0.9, resume=True))
    a = torch.load(straight.last_checkpoint, weights_only=True)
    b = torch.load(resumed.last_checkpoint, weights_only=True)
    assert a["ema_steps"] == b["ema_steps"] == 6
    assert all(torch.equal(a["ema_network"][k], b["ema_network"][k]) for k in a["ema_network"])

    with pytest.raises(InputError, match="ema_decay"):
        quick_config(dataset, tmp_path / "bad", ema_decay=1.0)


def test_different_seeds_give_different_weights(dataset: Path, tmp_path: Path) -> None:
    one = train(quick_config(dataset, tmp_path / "a", max_epochs=1, val_cases=[]))
    two = train(quick_config(dataset, tmp_path / "b", max_epochs=1, val_cases=[], seed=1))
    a = torch.load(one.model_path, weights_only=True)
    b = torch.load(two.model_path, weights_only=True)
    assert any(not torch.equal(a[key], b[key]) for key in a)
    assert math.isnan(one.best_val_dice) and one.best_epoch == 1


def test_mixed_precision_is_fp16_on_cuda_bf16_on_native_cpus_else_float32(monkeypatch) -> None:
    import rcmseg.training.loop as loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.autocast_dtype(cuda, amp=True) == torch.float16
    assert loop.autocast_dtype(cuda, amp=False) is None
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda native=native: native)
        assert loop.autocast_dtype(cpu, amp=True) == expected
        assert loop.autocast_dtype(cpu, amp=False) is None


def test_bf16_training_on_cpu_runs_in_bf16_and_keeps_float32_weights(
    monkeypatch, dataset: Path, tmp_path: Path
) -> None:
    import rcmseg.training.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    runs = {}
    for amp in (True, False):
        config = quick_config(dataset, tmp_path / str(amp), max_epochs=1, val_cases=[], amp=amp)
        result = train(config)
        assert math.isfinite(result.history[-1]["loss"])
        runs[amp] = torch.load(result.model_path, weights_only=True)
    assert all(t.dtype == torch.float32 for t in runs[True].values() if t.is_floating_point())
    # same seed, same data: only the autocast differs
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


def test_channels_last_network_trains_in_plain_layout(dataset: Path, tmp_path: Path) -> None:
    # load_bundle hands out channels-last networks; MONAI Label fine-tunes them. Their backward
    # pass crashed torch 2.14.1 on CPU, so train() must move them back to NCHW first.
    config = quick_config(dataset, tmp_path / "cl", max_epochs=1, val_cases=[])
    torch.manual_seed(config.seed)
    network = get_network(config.network, **config.network_kwargs)
    network = network.to(memory_format=torch.channels_last)
    result = train(config, network=network)
    assert all(p.is_contiguous() for p in network.parameters())
    plain = train(quick_config(dataset, tmp_path / "plain", max_epochs=1, val_cases=[]))
    a = torch.load(result.model_path, weights_only=True)
    b = torch.load(plain.model_path, weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_fold_split_keeps_patients_apart(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_dataset(root, n=6, size=256, seed=3, patients=3)
    seen_val = set()
    for fold in range(3):
        train_cases, val_cases = split_cases(root, None, None, fold, 3, seed=0)
        train_patients = {c.patient for c in train_cases}
        val_patients = {c.patient for c in val_cases}
        assert val_patients and not train_patients & val_patients
        assert len(train_cases) + len(val_cases) == 6
        seen_val |= val_patients
    assert seen_val == {"P000", "P001", "P002"}


def test_batch_augment_moves_labels_with_the_image_and_marks_outside_unlabelled() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(64.0).repeat(64, 1)[None, None].repeat(4, 1, 1, 1) * 3.0
    labels = (torch.arange(64) // 11).repeat(64, 1)[None, None].repeat(4, 1, 1, 1)

    still = BatchAugment(0, 0, 0, 0, 0, (0.0, 0.0))(images, labels, generator)
    assert torch.allclose(still[0] * 255, images, atol=1e-3)
    assert torch.equal(still[1], labels)

    flip = BatchAugment(0, 1.0, 0, 0, 0, (0.0, 0.0))(images, labels, generator)
    assert torch.equal(flip[1], labels.flip(-1).flip(-2))

    rotated_images, rotated = BatchAugment(rotate_deg=180)(images, labels, generator)
    assert 0.0 <= float(rotated_images.min()) and float(rotated_images.max()) <= 1.0
    assert set(rotated.unique().tolist()) <= set(range(6)) | {UNLABELLED}
    # A rotation of a square patch brings outside pixels into some corner unless near 0/90/180°.
    corners = rotated[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == UNLABELLED).any()

    again = BatchAugment()(images, labels, torch.Generator().manual_seed(5))
    same = BatchAugment()(images, labels, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], same[0]) and torch.equal(again[1], same[1])


def test_appearance_augmentation_changes_tone_and_sharpness_not_labels(
    dataset: Path, tmp_path: Path
) -> None:
    still = {"rotate_deg": 0, "flip_prob": 0, "zoom": 0, "shear": 0, "intensity_offset": 0}
    still["speckle_sigma"] = (0.0, 0.0)
    images = torch.rand(8, 1, 48, 48, generator=torch.Generator().manual_seed(1)) * 200 + 20
    labels = torch.randint(0, 6, (8, 1, 48, 48), generator=torch.Generator().manual_seed(2))

    tone = BatchAugment(**still, gamma=0.4)(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(tone[1], labels)
    # a tone curve keeps the order of grey levels within each patch but moves its mean
    ranks = images.flatten(1).argsort(1)
    assert (tone[0].flatten(1).gather(1, ranks).diff(1) >= -1e-4).all()
    assert (tone[0].mean((1, 2, 3)) * 255 - images.mean((1, 2, 3))).abs().max() > 5

    contrast = BatchAugment(**still, contrast=0.2)(images, labels, torch.Generator().manual_seed(0))
    spread = contrast[0].std((1, 2, 3)) * 255 / images.std((1, 2, 3))
    assert spread.min() >= 0.8 - 1e-4 and spread.max() <= 1.2 + 1e-4 and spread.std() > 0.01

    sharp = BatchAugment(**still, sharpness=0.5)(images, labels, torch.Generator().manual_seed(0))
    roughness = (sharp[0] * 255).diff(dim=-1).abs().mean((1, 2, 3))
    original = images.diff(dim=-1).abs().mean((1, 2, 3))
    assert (roughness < original).any() and (roughness > original).any()  # blurred and sharpened

    result = train(quick_config(dataset, tmp_path / "run", augment_appearance=True, max_epochs=1))
    assert result.epochs_completed == 1
    with pytest.raises(InputError, match="augment_appearance needs augmentation 'batched'"):
        quick_config(dataset, tmp_path / "x", augment_appearance=True, augmentation="per_patch")
    config = quick_config(dataset, tmp_path / "y", zoom=0.3, augment_appearance=True)
    augment = _batch_augment(config, torch.device("cpu"), seed=0).func
    assert augment.zoom == 0.3 and augment.gamma == APPEARANCE["gamma"] > 0
    with pytest.raises(InputError, match=r"zoom must be in \[0, 1\), not 1.5"):
        quick_config(dataset, tmp_path / "x", zoom=1.5)


def test_per_patch_augmentation_also_trains(dataset: Path, tmp_path: Path) -> None:
    result = train(quick_config(dataset, tmp_path / "run", augmentation="per_patch", max_epochs=1))
    assert result.epochs_completed == 1 and result.model_path.is_file()


def test_crops_the_network_cannot_take_give_a_one_line_error(dataset: Path, tmp_path: Path) -> None:
    # the 3-level MED-Net's deepest level downsamples 2^7 times: no 64 px crops for it
    with pytest.raises(InputError, match="network mednet needs crops of a multiple of 128 px"):
        train(quick_config(dataset, tmp_path / "out", network="mednet"))
    assert not (tmp_path / "out" / "model.pt").exists()


def test_bad_data_sets_give_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="manifest"):
        train(quick_config(empty, tmp_path / "out"))

    header_only = tmp_path / "header_only"
    header_only.mkdir()
    (header_only / "manifest.csv").write_text("mosaic,labels,patient,lesion,clinic\n")
    with pytest.raises(InputError, match="empty data set"):
        train(quick_config(header_only, tmp_path / "out"))

    one = tmp_path / "one"
    write_dataset(one, n=1, size=256, seed=0)
    with pytest.raises(InputError, match="'nope' is not a labelled case"):
        train(quick_config(one, tmp_path / "out", val_cases=["nope"]))
    with pytest.raises(InputError, match="no labelled training mosaic"):
        train(quick_config(one, tmp_path / "out", val_cases=["synth_0000"]))
    with pytest.raises(InputError, match=r"belong to 1 patient\(s\).*more than one patient"):
        train(quick_config(one, tmp_path / "out", val_cases=None))

    rows = (one / "manifest.csv").read_text().splitlines()
    fields = rows[1].split(",")
    fields[1] = ""  # the mosaic loses its label map
    (one / "manifest.csv").write_text("\n".join([rows[0], ",".join(fields)]) + "\n")
    with pytest.raises(InputError, match="no labelled mosaics"):
        train(quick_config(one, tmp_path / "out"))

    result = CliRunner().invoke(app, ["train", "model", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()

    for option, message in (("--network", "unknown network 'nope'"), ("--loss", "unknown loss")):
        result = CliRunner().invoke(
            app, ["train", "model", str(one), "--out", str(tmp_path / "o"), option, "nope"]
        )
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"network": "nope"}, "unknown network 'nope'"),
        ({"loss": "nope"}, "unknown loss 'nope'"),
        ({"val_preset": "nope"}, "unknown preset 'nope'"),
        ({"learning_rate": 0.0}, "learning_rate must be above 0"),
        ({"final_learning_rate": -1e-3}, "final_learning_rate must be above 0"),
        ({"level_weights": [1.0, -1.0]}, "level_weights must be non-negative"),
        ({"level_weights": [float("nan")]}, "level_weights must be non-negative"),
    ],
)
def test_bad_settings_are_refused_before_training(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        quick_config(tmp_path, tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


def test_yes_no_settings_from_a_bundle_command_line_are_read_as_meant(tmp_path):
    """`python -m monai.bundle run train.json --resume false` passes the string "false", which
    Python takes for true: the run would have resumed. Flags read such words as meant, and
    refuse a word that is neither in one line; the batch's options do the same."""
    from rcmseg.batch import BatchOptions

    config = TrainConfig(data_dir=tmp_path, output_dir=tmp_path, resume="false", amp="True")
    assert (config.resume, config.amp, config.augment_appearance) == (False, True, False)
    assert TrainConfig(data_dir=tmp_path, output_dir=tmp_path, progress="no").progress is False
    with pytest.raises(InputError, match="amp must be true or false, not 'maybe'"):
        TrainConfig(data_dir=tmp_path, output_dir=tmp_path, amp="maybe")
    options = BatchOptions(geojson="yes", resume="0", tta="off")
    assert (options.geojson, options.resume, options.tta) == (True, False, False)
    with pytest.raises(InputError, match="overlay must be true or false, not 'sure'"):
        BatchOptions(overlay="sure")


def test_level_weights_reach_the_loss(tmp_path):
    """TrainConfig.level_weights weights the deep-supervision outputs (coarse to fine)."""
    from rcmseg.training.config import TrainConfig

    config = TrainConfig(data_dir=tmp_path, output_dir=tmp_path, level_weights=[0.25, 0.5, 1.0])
    assert config.to_dict()["level_weights"] == [0.25, 0.5, 1.0]
    from rcmseg.losses import make_loss

    loss = make_loss(config.loss, gamma=config.tv_weight, level_weights=config.level_weights)
    logits = [torch.randn(1, 6, 8 * 2**m, 8 * 2**m) for m in range(3)]
    labels = torch.randint(0, 6, (1, 1, 32, 32))
    weighted = float(loss(logits, labels))
    plain = float(make_loss(config.loss, gamma=config.tv_weight)(logits, labels))
    assert weighted < plain  # the two coarse terms count less


def test_distillation_targets_keep_labels_and_take_the_teacher_elsewhere() -> None:
    teacher = torch.softmax(torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.randint(0, 6, (2, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    labels[:, :, :3] = UNLABELLED
    one_hot = torch.nn.functional.one_hot(labels.clamp(max=5)[:, 0], 6).permute(0, 3, 1, 2)
    labelled = (labels != UNLABELLED).expand(-1, 6, -1, -1)

    plain = distillation_targets(labels, teacher, blend=0.0)
    assert torch.equal(plain[labelled], one_hot.float()[labelled])
    assert torch.equal(plain[~labelled], teacher[~labelled])
    half = distillation_targets(labels, teacher, blend=0.5)
    assert torch.allclose(half[labelled], (0.5 * one_hot + 0.5 * teacher)[labelled])
    assert torch.allclose(half.sum(1), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="blend"):
        distillation_targets(labels, teacher, blend=1.5)


def test_a_bundle_teaches_where_the_expert_labelled_nothing(dataset: Path, tmp_path: Path) -> None:
    # the real bundle (DynUNet with its demo weights) teaches a narrow MED-Net
    config = quick_config(dataset, tmp_path / "run", teacher=default_bundle_dir(), max_epochs=1)
    teacher = load_teacher(config.teacher, torch.device("cpu"))
    augment = _batch_augment(config, torch.device("cpu"), seed=0, teacher=teacher)
    images = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    labels = torch.full((4, 1, 64, 64), UNLABELLED)
    labels[:, :, :16] = 2
    inputs, targets = augment(images, labels)
    assert targets.shape == (4, NUM_CLASSES, 64, 64) and targets.dtype == torch.float32
    expected = teacher.engine.window_probabilities(inputs)
    # the rotated-in border is unlabelled too: compare where the augmented labels say "none"
    _, moved = _batch_augment(config, torch.device("cpu"), seed=0)(images, labels)
    unlabelled = (moved == UNLABELLED).expand(-1, NUM_CLASSES, -1, -1)
    assert unlabelled.any() and torch.allclose(targets[unlabelled], expected[unlabelled])
    assert torch.equal(targets[:, 2][moved[:, 0] == 2], torch.ones(int((moved == 2).sum())))

    # with no label at all, the labels alone give no gradient; the teacher's targets do
    network = get_network("mednet2", **SMALL)
    loss = make_loss("mdsc_tv", gamma=0.0)
    blank = torch.full((4, 1, 64, 64), UNLABELLED)
    loss(network(inputs), blank).backward()
    assert all(p.grad is None or not p.grad.any() for p in network.parameters())
    network.zero_grad()
    _, taught = teacher(inputs, blank)
    loss(network(inputs), taught).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())

    result = train(config)
    assert result.epochs_completed == 1 and result.model_path.is_file()
    with pytest.raises(InputError, match="teacher_weights needs a teacher bundle"):
        quick_config(dataset, tmp_path / "x", teacher_weights=tmp_path / "w.pt")
    with pytest.raises(InputError, match=r"teacher_blend must be in \[0, 1\]"):
        quick_config(dataset, tmp_path / "x", teacher=default_bundle_dir(), teacher_blend=2)
    with pytest.raises(InputError, match="bundle folder not found"):
        train(quick_config(dataset, tmp_path / "x", teacher=tmp_path / "none"))


def test_train_model_cli_distils_a_small_network_from_a_bundle(
    dataset: Path, tmp_path: Path
) -> None:
    options = ["--epochs", "1", "--iterations", "1", "--batch-size", "2", "--patch-size", "64"]
    options += ["--device", "cpu", "--no-progress", "--network", "dynunet_tiny"]
    bundle = str(default_bundle_dir())
    taught = CliRunner().invoke(
        app,
        ["train", "model", str(dataset), "--out", str(tmp_path / "run"), *options]
        + ["--teacher", bundle, "--teacher-blend", "0.5"],
    )
    assert taught.exit_code == 0, taught.output
    assert "best validation Dice" in taught.output
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    get_network("dynunet_tiny").load_state_dict(state)  # the student's weights, not the teacher's

    missing = CliRunner().invoke(
        app,
        ["train", "model", str(dataset), "--out", str(tmp_path / "x"), *options]
        + ["--teacher", str(tmp_path / "nowhere")],
    )
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: bundle folder not found"
    )


def test_train_model_cli_says_what_it_trains_on_stderr_and_its_result_on_stdout(
    dataset: Path, tmp_path: Path
) -> None:
    options = ["--epochs", "2", "--iterations", "1", "--batch-size", "2", "--patch-size", "64"]
    options += ["--device", "cpu", "--network", "dynunet_tiny", "--threads", "2"]
    result = CliRunner().invoke(
        app, ["train", "model", str(dataset), "--out", str(tmp_path / "run"), *options]
    )
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # the bar and the log are on stderr
    assert line.startswith("2 epochs; best validation Dice")
    assert re.search(
        r"^training dynunet_tiny \(0\.49 M parameters\) on \d+ training and \d+ validation "
        r"mosaics; cpu, (fp32|bf16), 2 CPU threads$",
        result.stderr,
        re.MULTILINE,
    ), result.stderr
    for epoch in (1, 2):  # once each, above the bar
        assert len(re.findall(rf"^epoch {epoch}: loss ", result.stderr, re.MULTILINE)) == 1


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_keeps_the_last_epoch_and_says_how_to_resume(
    dataset: Path, tmp_path: Path, stop: str, signal_when
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster scheduler's time limit) while training: exit 130 or
    143, no traceback, one line naming the kept checkpoint and --resume, which then goes on
    from that epoch."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "rcmseg.cli.main", "train", "model", str(dataset)]
    command += ["--out", str(out), "--iterations", "1", "--batch-size", "2", "--patch-size", "64"]
    command += ["--device", "cpu", "--no-progress", "--network", "dynunet_tiny"]
    command += ["--val-every", "50"]
    process = subprocess.Popen(
        [*command, "--epochs", "500"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as at a terminal, even when the tests run in a background job, which ignores SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    last = out / "checkpoints" / "last.pt"
    output = signal_when(process, last.is_file, getattr(signal, stop))
    assert process.returncode == 128 + getattr(signal, stop), output
    assert "Traceback" not in output
    assert f"interrupted: the last finished epoch is kept in {last}" in " ".join(output.split())
    done = torch.load(last, weights_only=False)["epochs_done"]
    assert 1 <= done < 500
    resumed = CliRunner().invoke(
        app, ["train", "model", str(dataset), *command[6:], "--epochs", str(done + 1), "--resume"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert f"{done + 1} epochs;" in resumed.output
