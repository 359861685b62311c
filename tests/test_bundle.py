"""The MONAI bundles: loading, and MONAI's own verification and export commands as subprocesses;
``rcm_lite``, the default bundle's network a quarter as wide, distilled from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from rcmseg.bundle import (
    BUNDLES_DIR,
    WEIGHTS_FILE,
    build_network,
    default_bundle_dir,
    load_bundle,
    load_weights,
)
from rcmseg.classes import CLASS_NAMES
from rcmseg.errors import InputError
from rcmseg.networks import count_parameters, get_network
from rcmseg.synth import write_dataset
from rcmseg.training.bundle import bundle_train_settings, train_bundle

torch.set_num_threads(2)
BUNDLE = default_bundle_dir()
CONFIGS = BUNDLE / "configs"
# evaluate.json is layered on inference.json, as multi_gpu_train.json is on train.json
INFER = ("inference.json",)
EVALUATE = ("inference.json", "evaluate.json")
LITE = BUNDLES_DIR / "rcm_lite"
WEIGHTS = BUNDLE / WEIGHTS_FILE


def monai_bundle(*args: str, cwd: Path = BUNDLE) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS`` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A copy of the bundle that a test may break."""
    return Path(shutil.copytree(BUNDLE, tmp_path / "rcm_mednet"))


def test_default_bundle_is_found_from_the_source_tree_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("RCMSEG_BUNDLE", raising=False)
    assert default_bundle_dir().name == "rcm_mednet"
    for required in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (default_bundle_dir() / required).is_file()
    assert (default_bundle_dir() / "LICENSE").is_file()
    monkeypatch.setenv("RCMSEG_BUNDLE", str(tmp_path))
    assert default_bundle_dir() == tmp_path


def test_load_bundle_gives_an_eval_network_with_the_class_table():
    bundle = load_bundle(BUNDLE, device="cpu")
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    assert bundle.class_names == CLASS_NAMES
    assert bundle.version == metadata["version"]
    assert bundle.working_mpp == 2.0
    assert not bundle.network.training
    assert bundle.model.startswith("DynUNet2D@")
    assert "synthetic" in bundle.intended_use
    with torch.no_grad():
        logits = bundle.network(torch.rand(1, 1, 64, 96))
    assert logits.shape == (1, len(CLASS_NAMES), 64, 96)


def test_missing_bundle_and_wrong_weights_are_one_line_input_errors(bundle_copy, tmp_path):
    with pytest.raises(InputError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "bundle.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # a bundle as downloaded
    with pytest.raises(InputError, match="is a file, not a bundle folder; unpack it"):
        load_bundle(tmp_path / "bundle.zip")
    torch.save(torch.nn.Conv2d(1, 6, 3).state_dict(), bundle_copy / "models" / "model.pt")
    with pytest.raises(InputError, match="weights do not fit network_def") as error:
        load_bundle(bundle_copy)
    assert "\n" not in str(error.value)


def test_bundle_amp_must_be_a_boolean(bundle_copy):
    inference = bundle_copy / "configs" / "inference.json"
    config = json.loads(inference.read_text())
    config["amp"] = "no"
    inference.write_text(json.dumps(config))
    with pytest.raises(InputError, match="amp must be true or false, not 'no'"):
        load_bundle(bundle_copy)


def test_weights_with_pickled_code_are_refused(bundle_copy):
    # A full pickled module is not a weights-only state dict: torch.load(weights_only=True) refuses.
    torch.save(torch.nn.Conv2d(1, 6, 3), bundle_copy / "models" / "model.pt")
    with pytest.raises(InputError, match="not a weights-only PyTorch state dict"):
        load_bundle(bundle_copy)


def test_verify_metadata_passes_offline_and_catches_a_broken_file(bundle_copy):
    schema = CONFIGS / "schema.json"
    done = monai_bundle(
        "verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metadata is verified with no error" in done.stdout + done.stderr

    broken = json.loads((bundle_copy / "configs" / "metadata.json").read_text())
    del broken["version"]
    broken["network_data_format"]["outputs"]["pred"]["num_channels"] = "six"
    (bundle_copy / "configs" / "metadata.json").write_text(json.dumps(broken))
    failed = monai_bundle(
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        str(schema),
        cwd=bundle_copy,
    )
    assert failed.returncode != 0


def test_verify_net_in_out_passes():
    done = monai_bundle(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--device",
        "cpu",
        "--n",
        "4",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data shape of network is verified with no error" in done.stdout + done.stderr


def test_ckpt_export_gives_a_torchscript_model_with_the_same_outputs(tmp_path):
    exported = tmp_path / "model.ts"
    done = monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        "models/model.pt",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scripted = torch.jit.load(str(exported), map_location="cpu").eval()
    network = load_bundle(BUNDLE).network
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), network(image), atol=1e-4, rtol=1e-4)


def _run_inference(tmp_path, in_dir, out, *overrides: str, configs: Path = CONFIGS):
    return monai_bundle(
        "run",
        "--config_file",
        str(configs / "inference.json"),
        "--dataset_dir",
        str(in_dir),
        "--output_dir",
        str(out),
        "--device",
        "$torch.device('cpu')",
        *overrides,
        cwd=tmp_path,
    )


def test_sigterm_to_monai_bundle_run_keeps_finished_mosaics_and_exits_143(tmp_path, signal_when):
    """`python -m monai.bundle run` stopped by a cluster's time limit (SIGTERM) ends as `rcmseg
    batch` does: the mosaic being written is finished, the reports say `done` only for finished
    mosaics and `pending` for the rest, one line says how to go on, no traceback, status 143."""
    import csv
    import signal

    import numpy as np
    import tifffile

    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    rng = np.random.default_rng(1)
    for index in range(8):
        image = rng.integers(0, 256, (2048, 2048), dtype=np.uint8)
        tifffile.imwrite(in_dir / f"m{index}.tif", image)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += [str(CONFIGS / "inference.json"), "--dataset_dir", str(in_dir)]
    command += ["--output_dir", str(out), "--device", "$torch.device('cpu')"]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = signal_when(process, lambda: any(out.glob("*.summary.json")), signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "Traceback" not in output
    assert "interrupted:" in output and "--continue" in output
    with open(out / "mosaics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    done = [row["mosaic"] for row in rows if row["status"] == "done"]
    assert 1 <= len(done) < 8 and {row["status"] for row in rows} == {"done", "pending"}
    for name in done:
        assert tifffile.imread(out / f"{Path(name).stem}.labels.tif").shape == (512, 512)


def test_monai_bundle_run_segments_a_folder_through_rcmseg_batch(tmp_path):
    import csv

    import numpy as np
    import tifffile

    in_dir, out = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (10, 12), dtype=np.uint8), np.ones((64, 64), np.uint8))
    tifffile.imwrite(in_dir / "m.tif", image, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    done = _run_inference(tmp_path, in_dir, out)
    assert done.returncode == 0, done.stderr[-2000:]
    labels = tifffile.imread(out / "m.labels.tif")
    assert labels.shape == (160, 192)  # 640×768 px at 0.5 µm/px → 2 µm/px
    with open(out / "mosaics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["mosaic"], row["status"]) for row in rows] == [("m.tif", "done")]
    assert (out / "patterns.csv").is_file()

    # The config's inferer is the `fast` preset, so `rcmseg batch --continue` keeps its work.
    assert json.loads((out / "m.summary.json").read_text())["engine"].startswith("fast (256 px")
    from rcmseg.batch import BatchOptions, run_batch

    kept = run_batch(in_dir, out, options=BatchOptions(device="cpu", resume=True))
    assert [record.status for record in kept.records] == ["skipped"]


@pytest.fixture(scope="module")
def small_mosaic(tmp_path_factory):
    import numpy as np
    import tifffile

    in_dir = tmp_path_factory.mktemp("bundle_in")
    rng = np.random.default_rng(1)
    image = np.kron(rng.integers(0, 256, (8, 8), dtype=np.uint8), np.ones((128, 128), np.uint8))
    tifffile.imwrite(in_dir / "m.tif", image, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return in_dir


@pytest.mark.parametrize("tta", ["false", "true"])
def test_monai_bundle_run_reads_a_flag_on_its_command_line_as_meant(tmp_path, small_mosaic, tta):
    """`python -m monai.bundle run --tta false` hands the config the string "false", which
    Python takes for true (8-fold TTA, 8x the time); rcmseg reads true/false as meant."""
    out = tmp_path / "out"
    done = _run_inference(tmp_path, small_mosaic, out, "--tta", tta)
    assert done.returncode == 0, done.stderr[-2000:]
    engine = json.loads((out / "m.summary.json").read_text())["engine"]
    assert ("8-fold TTA" in engine) == (tta == "true"), engine


def test_bundle_run_honours_ckpt_path_and_fails_in_one_line_without_it(tmp_path, small_mosaic):
    import tifffile

    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(build_network(BUNDLE).state_dict(), other)  # another "lab's" weights
    runs = {}
    for name, ckpt in (("bundled", None), ("other", other)):
        out = tmp_path / name
        extra = ("--ckpt_path", str(ckpt)) if ckpt else ()
        done = _run_inference(tmp_path, small_mosaic, out, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = tifffile.imread(out / "m.labels.tif")
        record = json.loads((out / "m.summary.json").read_text())
        assert record["model"].endswith(load_weights(build_network(BUNDLE), ckpt or WEIGHTS))
    assert (runs["bundled"] != runs["other"]).mean() > 0.05

    missing = _run_inference(
        tmp_path, small_mosaic, tmp_path / "missing", "--ckpt_path", str(tmp_path / "nope.pt")
    )
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nope.pt'}: missing: no such weights file"
    )
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "missing" / "m.labels.tif").exists()


@pytest.mark.parametrize(
    ("configs", "override", "message"),
    [
        (INFER, ("--preset", "bogus"), "error: unknown preset 'bogus'; choose one of"),
        (INFER, ("--precision", "fp8"), "error: unknown precision 'fp8'; choose"),
        (INFER, ("--backend", "tensorrt"), "error: unknown backend 'tensorrt'; choose"),
        (INFER, ("--tta", "maybe"), "error: tta must be true or false, not 'maybe'"),
        (
            INFER,
            ("--batch_options#geojson", "maybe"),
            "error: geojson must be true or false, not 'maybe'",
        ),
        (EVALUATE, ("--amp", "sometimes"), "error: amp must be true or false, not 'sometimes'"),
        # nested options and numbers, refused while MONAI builds the components
        (INFER, ("--network_def#name", "bogus"), "error: unknown network 'bogus'; choose"),
        (
            INFER,
            ("--network_def#filters", "[8,16]"),
            "error: network 'dynunet_ds': filters needs at least 4 stages",
        ),
        (EVALUATE, ("--inferer#overlap", "2"), "error: window overlap 2.0 must lie in [0, 1)"),
        (INFER, ("--mosaic_mpp", "abc"), "error: --mpp abc: a pixel size must be above 0 µm"),
        (EVALUATE, ("--dataset_dir", "nowhere"), "error: nowhere"),
        (EVALUATE, ("--precision", "fp8"), "error: unknown precision 'fp8'; choose"),
        (EVALUATE, ("--ckpt_path", "nope.pt"), "error: nope.pt: missing: no such weights file"),
    ],
)
def test_bundle_configs_refuse_bad_settings_in_one_line(
    tmp_path, small_mosaic, configs, override, message
):
    out = tmp_path / "out"
    done = monai_bundle(
        "run",
        "--config_file",
        repr([str(CONFIGS / name) for name in configs]),
        "--dataset_dir",
        str(small_mosaic),
        "--output_dir",
        str(out),
        "--device",
        "$torch.device('cpu')",
        *override,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (out / "m.labels.tif").exists()


def test_bundle_run_honours_inferer_working_mpp_and_network_def(tmp_path, small_mosaic):
    import tifffile

    out = tmp_path / "paper_like"
    done = _run_inference(
        tmp_path, small_mosaic, out, "--inferer#overlap", "0.75", "--working_mpp", "4.0"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "m.summary.json").read_text())
    assert record["engine"].startswith("custom (256 px windows, stride 64 px)")
    assert record["working_mpp"] == 4.0
    assert tifffile.imread(out / "m.labels.tif").shape == (128, 128)  # 512 µm... at 4 µm/px

    # network_def reaches the network: a 1-level MED-Net with its own weights
    one_level = tmp_path / "mednet1.pt"
    torch.save(get_network("mednet1").state_dict(), one_level)
    out1 = tmp_path / "mednet1"
    done = _run_inference(
        tmp_path, small_mosaic, out1, "--network_def#name", "mednet1", "--ckpt_path", str(one_level)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out1 / "m.summary.json").read_text())["model"].startswith("MEDNet@")
    # the bundled (DynUNet) weights do not fit a 1-level MED-Net: one line, no traceback
    wrong = _run_inference(
        tmp_path, small_mosaic, tmp_path / "wrong", "--network_def#name", "mednet1"
    )
    assert wrong.returncode != 0 and "weights do not fit network_def" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_lite_bundle_is_the_default_network_narrower_with_the_same_contract() -> None:
    lite, main = load_bundle(LITE), load_bundle(BUNDLE)
    assert (lite.name, main.name) == ("rcm_lite", "rcm_mednet")
    assert lite.model.startswith("DynUNet2D@")
    assert count_parameters(lite.network) == count_parameters(get_network("dynunet_tiny"))
    assert count_parameters(lite.network) < count_parameters(main.network) / 10
    assert lite.class_names == main.class_names and lite.working_mpp == main.working_mpp
    assert lite.presets == main.presets
    lite_meta = json.loads((LITE / "configs" / "metadata.json").read_text())
    main_meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert lite_meta["network_data_format"] == main_meta["network_data_format"]
    # auto runs the narrow network in float32: its bf16 labels were below 99.5 % equal
    assert (lite.amp, main.amp) == (False, True)
    assert lite.engine(precision="auto").precision == "fp32"
    # everything but the network, amp and the bundle's own folder is the default bundle's
    configs = [json.loads((b / "configs" / "inference.json").read_text()) for b in (LITE, BUNDLE)]
    for config in configs:
        config.pop("bundle_root")
        config.pop("amp")
        config["network_def"].pop("name")
    assert configs[0] == configs[1]


def test_monai_runs_the_lite_bundle_from_its_config_alone(tmp_path, small_mosaic) -> None:
    import tifffile

    # no --bundle_root: inference.json finds its own folder
    done = _run_inference(tmp_path, small_mosaic, tmp_path / "out", configs=LITE / "configs")
    assert done.returncode == 0, done.stderr[-2000:]
    assert tifffile.imread(tmp_path / "out" / "m.labels.tif").shape == (256, 256)
    record = json.loads((tmp_path / "out" / "m.summary.json").read_text())
    weights = LITE / "models" / "model.pt"
    assert record["model"] == f"DynUNet2D@{load_weights(get_network('dynunet_tiny'), weights)}"


def test_monai_runs_the_bundle_with_openvino_when_its_config_says_so(tmp_path, small_mosaic):
    """`monai.bundle run --backend openvino --openvino_cache DIR`: the config's backend reaches
    the engine (the conversion is kept where asked) and the labels are torch's."""
    pytest.importorskip("openvino")
    import tifffile

    cache = tmp_path / "ov-cache"
    labels = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        overrides = ["--backend", backend, "--openvino_cache", str(cache)]
        done = _run_inference(tmp_path, small_mosaic, out, *overrides, configs=LITE / "configs")
        assert done.returncode == 0, done.stderr[-2000:]
        labels[backend] = tifffile.imread(out / "m.labels.tif")
        record = json.loads((out / "m.summary.json").read_text())
        assert record["precision"] == "fp32"  # rcm_lite sets amp false
    assert sorted(path.suffix for path in cache.iterdir()) == [".bin", ".xml"]
    assert (labels["openvino"] == labels["torch"]).mean() > 0.999


def test_batch_reuses_the_openvino_network_kept_on_purpose(tmp_path, small_mosaic) -> None:
    """`rcmseg batch --backend openvino` with $RCMSEG_OPENVINO_CACHE: the first run converts and
    keeps the network, the second reads it back and writes the same labels."""
    pytest.importorskip("openvino")
    import tifffile

    cache = tmp_path / "ov-cache"
    env = {**os.environ, "RCMSEG_OPENVINO_CACHE": str(cache)}
    labels = []
    for run in ("first", "second"):
        out = tmp_path / run
        done = subprocess.run(
            [sys.executable, "-m", "rcmseg.cli.main", "batch", str(small_mosaic), "--out", str(out)]
            + ["--bundle", str(LITE), "--backend", "openvino", "--precision", "fp32"]
            + ["--device", "cpu", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        labels.append(tifffile.imread(out / "m.labels.tif"))
        assert sorted(path.suffix for path in cache.iterdir()) == [".bin", ".xml"]
    assert (labels[0] == labels[1]).all()


def test_lite_metadata_verifies_against_the_bundle_schema() -> None:
    done = monai_bundle(
        "verify_metadata",
        "--meta_file",
        "configs/metadata.json",
        "--filepath",
        str(BUNDLE / "configs" / "schema.json"),
        cwd=LITE,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metadata is verified with no error" in done.stdout + done.stderr


def test_lite_train_json_distils_from_the_default_bundle(tmp_path: Path) -> None:
    parser = ConfigParser()
    parser.read_config(str(LITE / "configs" / "train.json"))
    parser.get_parsed_content("imports")
    config = parser.get_parsed_content("train_config")
    assert config.network == "dynunet_tiny"
    assert config.teacher == BUNDLES_DIR / "rcm_mednet" and config.teacher_blend == 0.5
    # cv and study: the main bundle's recipe (the paper's protocol) without the teacher, which
    # was trained on every fold
    recipe, main_recipe = bundle_train_settings(LITE), bundle_train_settings(BUNDLE)
    assert "teacher" not in recipe and recipe.pop("network") == "dynunet_tiny"
    assert main_recipe.pop("network") == "dynunet_ds" and recipe == main_recipe

    data = tmp_path / "data"
    write_dataset(data, n=3, size=1024, seed=5, patients=3)
    copy = Path(shutil.copytree(LITE, tmp_path / "rcm_lite", ignore=shutil.ignore_patterns("runs")))
    result = train_bundle(
        copy, data, epochs=1, iterations_per_epoch=1, batch_size=2, num_workers=0, device="cpu"
    )
    assert result.epochs_completed == 1
    assert load_bundle(copy).model != load_bundle(LITE).model  # retrained in the copy only
