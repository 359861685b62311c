"""rcmseg's MONAI Label app against a real MONAI Label server on 127.0.0.1.

The server is started by ``rcmseg label serve`` in its own process group and killed with it at
the end. The studies folder holds synthetic mosaics (``rcmseg.synth``): a striped ``.tif``, a
tiled ``.tiff`` (OpenSlide opens it: MONAI Label's own WSI tiling path), another ``.tif`` and a
``.png`` without pixel size, which the studies' ``manifest.csv`` sizes at 1 µm/px. The served
bundle is a copy of rcmseg's with seeded random weights.
Runs only where the ``rcmseg[label]`` extra is installed (``.ci/label``).
"""

from __future__ import annotations

import io
import json
import shutil
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="needs the rcmseg[label] extra (see .ci/label)")
requests = pytest.importorskip("requests")

import tifffile  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rcmseg.batch import BatchOptions, plan_jobs, run_batch  # noqa: E402
from rcmseg.bundle import build_network, default_bundle_dir, load_bundle  # noqa: E402
from rcmseg.classes import CLASS_NAMES, UNLABELLED  # noqa: E402
from rcmseg.inference import pixel_entropy, segment_image  # noqa: E402
from rcmseg.io.mosaics import probe_mosaic, read_mosaic  # noqa: E402
from rcmseg.label_app.asap import asap_label_map  # noqa: E402
from rcmseg.label_app.local_server import LocalServer  # noqa: E402
from rcmseg.synth import make_mosaic, write_mosaic_tiff  # noqa: E402

pytestmark = pytest.mark.slow

PRESET = "paper"  # 256 px windows: one window per 1024 px test mosaic, cheap on CPU
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 180
TRAIN_TIMEOUT_S = 480
UNLABELLED_IDS = ("m1", "m2", "m3")
PNG_MPP = 1.0  # µm/px of m3.png, which carries none: from the studies' manifest


@dataclass
class Server:
    url: str
    studies: Path
    bundle: Path
    log: Path
    scratch: Path  # the server's TMPDIR

    def get(self, route: str, **kwargs) -> requests.Response:
        response = requests.get(self.url + route, timeout=REQUEST_TIMEOUT_S, **kwargs)
        return response

    def post(self, route: str, **kwargs) -> requests.Response:
        response = requests.post(self.url + route, timeout=REQUEST_TIMEOUT_S, **kwargs)
        assert response.status_code == 200, (
            f"{route}: {response.status_code} {response.text}\n{self.log.read_text()[-3000:]}"
        )
        return response


def make_bundle(target: Path) -> Path:
    """rcmseg's bundle configs with seeded random weights (no trained weights needed)."""
    shutil.copytree(
        default_bundle_dir(), target, ignore=shutil.ignore_patterns("models", "runs", "eval")
    )
    (target / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_network(target).state_dict(), target / "models" / "model.pt")
    return target


def make_studies(studies: Path) -> None:
    studies.mkdir()
    for index, name in enumerate(("m0.tif", "m1.tiff", "m2.tif")):
        image, _labels = make_mosaic(1024, seed=index)
        if name.endswith(".tiff"):
            tifffile.imwrite(
                studies / name,
                image,
                tile=(256, 256),
                compression="zlib",
                resolution=(2e4, 2e4),
                resolutionunit="CENTIMETER",
            )
        else:
            write_mosaic_tiff(studies / name, image)
    image, _labels = make_mosaic(512, seed=3)
    Image.fromarray(image).save(studies / "m3.png")
    (studies / "manifest.csv").write_text(
        f"mosaic,labels,patient,lesion,clinic,mosaic_mpp\nm3.png,,p3,l3,,{PNG_MPP}\n"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("label")
    bundle = make_bundle(root / "bundle")
    studies = root / "studies"
    make_studies(studies)
    log = root / "server.log"
    options = ["--bundle", str(bundle), "--preset", PRESET, "--device", "cpu"]
    # The server's own temporary folder, so that what its answers leave behind can be seen.
    scratch = root / "tmp"
    scratch.mkdir()
    # No background scoring: it would compete for the CPU with the requests under test.
    env = {
        "TMPDIR": str(scratch),
        "OMP_NUM_THREADS": "2",
        "PYTHONUNBUFFERED": "1",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
    }
    with LocalServer(studies, log, options, env=env, start_timeout_s=START_TIMEOUT_S) as running:
        yield Server(url=running.url, studies=studies, bundle=bundle, log=log, scratch=scratch)


@pytest.fixture(scope="module")
def whole_m1(server: Server, tmp_path_factory) -> np.ndarray:
    """The label map of the tiled mosaic m1 from POST /infer/mednet."""
    response = server.post("/infer/mednet?image=m1&output=image")
    path = tmp_path_factory.mktemp("infer") / "m1-labels.tif"
    path.write_bytes(response.content)
    assert probe_mosaic(path).mosaic_mpp == pytest.approx(0.5)  # the mosaic's own pixel size
    return tifffile.imread(path, level=0)


def test_server_is_local_and_lists_the_app(server: Server):
    assert "local only" in server.log.read_text()
    info = server.get("/info/").json()
    assert "mednet" in info["models"] and "mednet" in info["trainers"]
    assert {"entropy", "random"} <= set(info["strategies"])
    assert info["labels"] == list(CLASS_NAMES)
    objects = server.get("/datastore/?output=all").json()["objects"]
    assert set(objects) == {"m0", *UNLABELLED_IDS}
    assert objects["m1"]["image"]["ext"] == ".tiff"


def test_whole_mosaic_labels_at_mosaic_grid_match_rcmseg_batch(
    server: Server, whole_m1, tmp_path: Path
):
    assert whole_m1.shape == (1024, 1024) and whole_m1.dtype == np.uint8
    assert set(np.unique(whole_m1).tolist()) <= set(range(len(CLASS_NAMES)))
    batch_in = tmp_path / "in"
    batch_in.mkdir()
    shutil.copy(server.studies / "m1.tiff", batch_in)
    options = BatchOptions(preset=PRESET, device="cpu")
    run_batch(
        batch_in, tmp_path / "out", bundle_dir=server.bundle, options=options, show_progress=False
    )
    batch_labels = tifffile.imread(next((tmp_path / "out").glob("m1*labels.tif")), level=0)
    assert batch_labels.shape == (256, 256)  # 2 µm/px
    assert np.mean(whole_m1[::4, ::4] == batch_labels) > 0.999


def test_a_mosaic_without_pixel_size_is_read_at_the_manifests(server: Server, tmp_path: Path):
    response = server.post("/infer/mednet?image=m3&output=image")
    path = tmp_path / "m3-labels.tif"
    path.write_bytes(response.content)
    assert probe_mosaic(path).mosaic_mpp == pytest.approx(PNG_MPP)
    labels = tifffile.imread(path, level=0)
    assert labels.shape == (512, 512)
    batch_in = tmp_path / "in"
    batch_in.mkdir()
    shutil.copy(server.studies / "m3.png", batch_in)
    options = BatchOptions(preset=PRESET, device="cpu", fallback_mpp=PNG_MPP)
    run_batch(
        batch_in, tmp_path / "out", bundle_dir=server.bundle, options=options, show_progress=False
    )
    batch_labels = tifffile.imread(next((tmp_path / "out").glob("m3*labels.tif")), level=0)
    assert batch_labels.shape == (256, 256)  # 512 px at 1 µm/px is 256 px at 2 µm/px
    assert np.mean(labels[::2, ::2] == batch_labels) > 0.999


def test_region_requests_give_the_same_labels_and_viewer_polygons(
    server: Server, whole_m1, tmp_path: Path
):
    params = {"location": [300, 200], "size": [400, 256]}
    response = server.post(
        "/infer/mednet?image=m1&output=image", data={"params": json.dumps(params)}
    )
    region = tifffile.imread(io.BytesIO(response.content), level=0)
    np.testing.assert_array_equal(region, whole_m1[200:456, 300:700])

    # Tiled TIFF: MONAI Label's WSI path reads the size with OpenSlide and tiles the region.
    wsi = {"location": [256, 256], "size": [512, 256], "tile_size": [256, 256], "min_poly_area": 0}
    reply = server.post(
        "/infer/wsi_v2/mednet?image=m1&output=json", data={"wsi": json.dumps(wsi)}
    ).json()
    elements = [e for tile in reply["annotations"] for e in tile["annotation"]["elements"]]
    expected = {CLASS_NAMES[i] for i in np.unique(whole_m1[256:512, 256:768])}
    assert len(reply["annotations"]) == 1  # tiles of at least 4096 px: one here
    assert elements and {e["label"] for e in elements} <= expected
    points = np.array([p for e in elements for c in e["contours"] for p in c])
    # Outlines run along the region's pixel edges, inside it.
    assert points[:, 0].min() >= 256 and points[:, 0].max() <= 768
    assert points[:, 1].min() >= 256 and points[:, 1].max() <= 512

    # Striped TIFF (OpenSlide cannot open it): the app segments the region in one go.
    wsi = {"location": [0, 0], "size": [512, 512], "min_poly_area": 0}
    xml = server.post(
        "/infer/wsi_v2/mednet?image=m2&output=asap", data={"wsi": json.dumps(wsi)}
    ).text
    annotations = list(ElementTree.fromstring(xml).iter("Annotation"))
    assert annotations and {a.get("Name") for a in annotations} <= set(CLASS_NAMES)
    xs = [float(c.get("X")) for c in ElementTree.fromstring(xml).iter("Coordinate")]
    assert 0 <= min(xs) and max(xs) <= 512
    # Submitted back unchanged, the suggestions are the region's labels, pixel for pixel.
    suggestions = tmp_path / "m2.xml"
    suggestions.write_text(xml)
    response = server.post("/infer/mednet?image=m2&output=image")
    whole_m2 = tifffile.imread(io.BytesIO(response.content), level=0)
    np.testing.assert_array_equal(asap_label_map(suggestions, 512, 512), whole_m2[:512, :512])

    # DSA (HistomicsTK) JSON: the same outlines, as closed polylines.
    dsa = server.post(
        "/infer/wsi_v2/mednet?image=m2&output=dsa", data={"wsi": json.dumps(wsi)}
    ).json()
    polylines = [e for e in dsa["elements"] if e["type"] == "polyline"]
    assert len(polylines) == len(annotations) and all(e["closed"] for e in polylines)
    points = np.array([p for e in polylines for p in e["points"]])
    assert points[:, :2].min() >= 0 and points[:, :2].max() <= 512


def test_answered_requests_leave_no_temporary_files(server: Server):
    # Label maps and viewer files are written to temporary files that MONAI Label deletes after
    # sending them (in a background task, so give it a moment). MONAI Label keeps its logging
    # config there from the start, so compare with what was there before.
    def names() -> set[str]:
        return {p.name for p in server.scratch.iterdir()}

    before = names()
    server.post("/infer/mednet?image=m2&output=image")
    wsi = {"location": [0, 0], "size": [256, 256]}
    server.post("/infer/wsi_v2/mednet?image=m2&output=asap", data={"wsi": json.dumps(wsi)})
    deadline = time.monotonic() + 10
    while names() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(names() - before) == []


def partial_label_the_served_model_misses(server: Server) -> np.ndarray:
    """A partial label map of m0 that the served model gets wholly wrong.

    In a square of m0, the pixels where the served model does not predict class k (the class it
    predicts least there) are labelled k, in whole 4x4 blocks of the 2 µm/px grid, so the label
    is exact at the working resolution. The served model then scores a validation Dice of
    exactly 0 on it (it never says k where k is labelled, and every class it does say is absent
    from the labels), so the fine-tuned weights cannot be worse and must replace it.
    """
    bundle = load_bundle(server.bundle, "cpu")
    image, _info = read_mosaic(server.studies / "m0.tif")
    probabilities = segment_image(image, bundle.network, preset=PRESET)
    predicted = probabilities.argmax(axis=0)  # 256² at 2 µm/px
    square = np.zeros(predicted.shape, dtype=bool)
    square[64:192, 64:192] = True
    chosen = int(np.bincount(predicted[square], minlength=len(CLASS_NAMES)).argmin())
    region = square & (predicted != chosen)
    labels = np.full((1024, 1024), UNLABELLED, dtype=np.uint8)
    labels[np.kron(region, np.ones((4, 4), dtype=bool))] = chosen
    return labels


def test_saved_label_trains_and_replaces_the_served_model(server: Server):
    before = server.get("/model/info/mednet").json()["checksum"]
    buffer = io.BytesIO()
    Image.fromarray(partial_label_the_served_model_misses(server)).save(buffer, format="PNG")
    server_reply = requests.put(
        server.url + "/datastore/label?image=m0&tag=final",
        files={"label": ("m0.png", buffer.getvalue(), "image/png")},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert server_reply.status_code == 200, server_reply.text
    objects = server.get("/datastore/?output=all").json()["objects"]
    assert "final" in objects["m0"]["labels"]

    params = {
        "max_epochs": 1,
        "iterations_per_epoch": 1,
        "batch_size": 2,
        "num_workers": 0,
        "val_preset": PRESET,
    }
    server.post("/train/mednet", json=params)
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while (task := server.get("/train/").json())["status"] in ("SUBMITTED", "RUNNING"):
        assert time.monotonic() < deadline, "training did not finish in time"
        time.sleep(2)
    assert task["status"] == "DONE", f"{task}\n{server.log.read_text()[-6000:]}"

    stats = server.get("/info/").json()["train_stats"]["mednet"]
    assert stats["train_mosaics"] == ["m0"] and stats["val_mosaics"] == ["m0"]
    assert stats["epochs"] == 1 and stats["served_val_dice"] == 0.0
    assert stats["trained_val_dice"] >= stats["served_val_dice"] and stats["replaced"]
    assert server.get("/model/info/mednet").json()["checksum"] != before
    assert (server.bundle / "models" / "model.pt").is_file()  # the source bundle is untouched
    source = torch.load(server.bundle / "models" / "model.pt", weights_only=True)
    torch.manual_seed(0)
    fresh = build_network(server.bundle).state_dict()
    assert all(torch.equal(source[k], fresh[k]) for k in fresh)

    # `rcmseg batch STUDIES` afterwards segments the mosaics only: not the submitted label
    # (MONAI Label keeps it in STUDIES/labels/final), nor the app's working state (.rcmseg).
    assert list((server.studies / "labels" / "final").glob("m0.*"))
    jobs = plan_jobs(server.studies, server.studies / "segmented")
    assert [job.relative for job in jobs] == ["m0.tif", "m1.tiff", "m2.tif", "m3.png"]


def test_entropy_strategy_picks_the_least_certain_unlabelled_mosaic(server: Server):
    reply = server.post("/activelearning/entropy", json={}).json()
    served = load_bundle(server.studies / ".rcmseg" / "bundle", "cpu")  # after fine-tuning
    expected = {}
    for image_id in UNLABELLED_IDS:
        path = next(server.studies.glob(f"{image_id}.*"))
        image, _info = read_mosaic(path, fallback_mpp=PNG_MPP if image_id == "m3" else 0.5)
        probabilities = segment_image(image, served.network, preset=PRESET)
        expected[image_id] = float(pixel_entropy(probabilities).mean())
    assert reply["id"] == max(expected, key=expected.get)
    assert reply["scores"] == pytest.approx(expected, abs=1e-3)

    random_pick = server.post("/activelearning/random", json={}).json()
    assert random_pick["id"] in UNLABELLED_IDS
