"""Training through the bundle's own configs: ``rcmseg train bundle`` on a copy of the bundle, and
two real CPU processes under ``torchrun`` with ``multi_gpu_train.json`` (gloo backend)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rcmseg.bundle import default_bundle_dir, load_bundle
from rcmseg.cli.main import app
from rcmseg.errors import InputError
from rcmseg.synth import write_dataset
from rcmseg.training.bundle import train_bundle

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 1024 px mosaics (256 px at 2 µm/px), two patients."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=4, size=1024, seed=5, patients=2)
    return root


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A copy of the repository's bundle without its weights and runs (never trained in place)."""
    copy = tmp_path / "rcm_mednet"
    shutil.copytree(default_bundle_dir(), copy, ignore=shutil.ignore_patterns("runs", "model.pt"))
    return copy


def test_train_bundle_cli_writes_model_and_log_into_the_bundle(bundle: Path, dataset: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "bundle",
            str(bundle),
            "--data",
            str(dataset),
            "--epochs",
            "1",
            "--iterations",
            "1",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best validation Dice" in result.output
    weights = bundle / "models" / "model.pt"
    assert weights.is_file()
    log = (bundle / "runs" / "train" / "train_log.csv").read_text().splitlines()
    assert len(log) == 2 and log[0].startswith("epoch,loss")
    # The bundle loads its new weights through its own inference.json network_def.
    loaded = load_bundle(bundle, "cpu")
    state = torch.load(weights, weights_only=True)
    for key, tensor in loaded.network.state_dict().items():
        assert torch.equal(tensor.cpu(), state[key]), key


def test_train_bundle_rejects_bad_input(bundle: Path, dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest"):
        train_bundle(bundle, tmp_path)
    (bundle / "configs" / "train.json").unlink()
    with pytest.raises(InputError, match="train.json"):
        train_bundle(bundle, dataset)
    result = CliRunner().invoke(app, ["train", "bundle", str(bundle), "--data", str(dataset)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("loss", "nope", "unknown loss 'nope'; choose one of mdsc_tv, dice, ce, mdsc_tv_ce"),
        ("network_def", "nope", "unknown network 'nope'"),
        ("optimizer", {"_target_": "torch.optim.Nope"}, "torch.optim.Nope"),
        # a constructor's own error: too few DynUNet stages, named with the network
        ("network_def", {"filters": [8, 16]}, "network 'dynunet.*': filters needs at least 4"),
    ],
)
def test_a_bad_name_in_train_json_is_one_line_naming_the_config(
    bundle: Path, dataset: Path, key: str, value: str | dict, message: str
) -> None:
    config_file = bundle / "configs" / "train.json"
    config = json.loads(config_file.read_text())
    if isinstance(value, str):
        config[key]["name"] = value
    elif key == "network_def":
        config[key].update(value)
    else:
        config[key] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match=message) as raised:
        train_bundle(bundle, dataset, epochs=1, iterations_per_epoch=1, device="cpu")
    assert raised.value.path == config_file
    result = CliRunner().invoke(
        app, ["train", "bundle", str(bundle), "--data", str(dataset), "--device", "cpu"]
    )
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert str(config_file) in result.output
    assert not (bundle / "models" / "model.pt").exists()


def monai_bundle_train(bundle: Path, data: Path, *args: str) -> list[str]:
    """``python -m monai.bundle run`` on the bundle's train.json, as a user types it."""
    config = str(bundle / "configs" / "train.json")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config]
    return [*command, "--bundle_root", str(bundle), "--dataset_dir", str(data), *args]


def test_a_bad_data_set_is_one_line_on_every_training_route(bundle: Path, tmp_path: Path) -> None:
    """A manifest whose mosaic is missing, found when training starts: train_bundle() raises the
    InputError, `rcmseg train bundle` says it in one line naming the manifest and nothing else
    (exit status 2), and `python -m monai.bundle run` ends with that line, not MONAI's traceback
    of the config expression that failed."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.csv").write_text(
        "mosaic,labels,patient,lesion,clinic\nnowhere.tif,nowhere.labels.tif,p1,l1,c1\n"
    )
    line = f"error: {data / 'manifest.csv'}: line 2: mosaic nowhere.tif does not exist"
    with pytest.raises(InputError, match="nowhere.tif does not exist") as raised:
        train_bundle(bundle, data, epochs=1, device="cpu")
    assert raised.value.path == data / "manifest.csv"
    cli = [sys.executable, "-m", "rcmseg.cli.main", "train", "bundle", str(bundle)]
    said = subprocess.run(
        [*cli, "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert said.returncode == 2, said.stdout[-3000:]
    assert said.stdout.strip().splitlines() == [line]  # nothing of MONAI's workflow notes
    done = subprocess.run(
        monai_bundle_train(bundle, data, "--device", "$torch.device('cpu')"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in done.stderr
    assert not (bundle / "models" / "model.pt").exists()


@pytest.mark.parametrize("route", ["rcmseg", "monai.bundle"])
def test_sigterm_to_bundle_training_keeps_the_last_epoch(
    bundle: Path, dataset: Path, route: str, signal_when
) -> None:
    """A cluster's time limit (SIGTERM) while a bundle trains, through `rcmseg train bundle` or
    `python -m monai.bundle run`: exit 143 without a traceback, and one line naming the last
    finished epoch's checkpoint, which is kept (the command's line also says how to resume)."""
    import signal

    config_file = bundle / "configs" / "train.json"
    config = json.loads(config_file.read_text())
    config["patch"] = {"size": 64, "window": 128, "window_overlap": 0.5}
    config["val_every"] = 100
    config_file.write_text(json.dumps(config))
    if route == "rcmseg":
        command = [sys.executable, "-m", "rcmseg.cli.main", "train", "bundle", str(bundle)]
        command += ["--data", str(dataset), "--epochs", "500", "--iterations", "1"]
        command += ["--batch-size", "2", "--workers", "0", "--device", "cpu"]
    else:
        command = monai_bundle_train(bundle, dataset, "--epochs", "500", "--num_workers", "0")
        command += ["--iterations_per_epoch", "1", "--batch_size", "2"]
        command += ["--device", "$torch.device('cpu')"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = bundle / "runs" / "train" / "checkpoints" / "last.pt"
    output = signal_when(process, last.is_file, signal.SIGTERM)
    assert process.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert 1 <= torch.load(last, weights_only=False)["epochs_done"] < 500
    kept = f"interrupted: the last finished epoch is kept in {last}"
    assert kept in " ".join(output.split()), output[-3000:]
    if route == "rcmseg":  # the command's own line, with how to go on
        assert "run the same command with --resume to go on" in output, output[-3000:]


def test_torchrun_two_cpu_processes_train_identical_weights(
    bundle: Path, dataset: Path, tmp_path: Path
) -> None:
    """Real ``torchrun`` + ``monai.bundle run`` with train.json + multi_gpu_train.json on gloo."""
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    # A third config file on top: a narrow network, small patches, and a finalize step that
    # saves every rank's final state so the test can compare them.
    test_config = tmp_path / "test_overrides.json"
    test_config.write_text(
        json.dumps(
            {
                "network_def": {
                    "_target_": "rcmseg.networks.get_network",
                    "name": "mednet2",
                    "widths": [8, 16, 32, 64, 64],
                },
                "patch": {"size": 64, "window": 128, "window_overlap": 0.5},
                "finalize": [
                    "$torch.save(@network_def.state_dict(), "
                    f"'{ranks}/rank' + os.environ['RANK'] + '.pt')",
                    "$dist.destroy_process_group()",
                ],
            }
        )
    )
    configs = [str(bundle / "configs" / name) for name in ("train.json", "multi_gpu_train.json")]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str([*configs, str(test_config)]),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(dataset),
        "--epochs",
        "2",
        "--iterations_per_epoch",
        "2",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--val_every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    states = [torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    for key, tensor in states[0].items():
        assert torch.equal(tensor, states[1][key]), key
    last = torch.load(bundle / "runs" / "train" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epochs_done"] == 2
    for key, tensor in states[0].items():
        assert torch.equal(tensor, last["network"][key]), key
    assert (bundle / "models" / "model.pt").is_file()
    log = (bundle / "runs" / "train" / "train_log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 epochs, written once (by rank 0)
    # Both ranks trained, 2 steps of 2 patches each per epoch: the log counts both shares.
    assert all(float(row.split(",")[7]) == 8.0 for row in log[1:])


def test_paper_defaults_are_the_same_in_train_json_trainconfig_and_the_cli():
    """train.json holds the paper's recipe; TrainConfig and `rcmseg train model` agree with it."""
    import dataclasses
    import inspect

    from rcmseg.cli.train import train_model_command
    from rcmseg.training import TrainConfig
    from rcmseg.training.bundle import bundle_train_settings

    recipe = bundle_train_settings()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    cli = {
        name: parameter.default
        for name, parameter in inspect.signature(train_model_command).parameters.items()
    }
    pairs = {  # TrainConfig field: rcmseg train model option
        "max_epochs": "epochs",
        "batch_size": "batch_size",
        "learning_rate": "lr",
        "final_learning_rate": "final_lr",
        "network": "network",
        "loss": "loss",
        "patch_size": "patch_size",
        "val_preset": "preset",
        "seed": "seed",
    }
    for field_name, option in pairs.items():
        assert recipe[field_name] == defaults[field_name] == cli[option], field_name
    assert recipe["window"] == defaults["window"] == 2 * cli["patch_size"]
    # the recipe's torch optimiser and schedule are TrainConfig's "sgd" and exponential decay
    assert recipe["optimizer"] == {
        "_target_": "torch.optim.sgd.SGD",
        "momentum": defaults["momentum"],
        "weight_decay": defaults["weight_decay"],
    }
    assert defaults["optimizer"] == cli["optimizer"] == "sgd"
    gamma = recipe["lr_scheduler"]["gamma"]
    assert gamma == pytest.approx(0.1 ** (1 / 199))
    assert recipe["tv_weight"] == 1e-6
