"""Partial label maps from the ASAP XML that MONAI Label's QuPath extension submits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcmseg.classes import UNLABELLED
from rcmseg.errors import InputError
from rcmseg.label_app.asap import asap_label_map, rasterize_asap_labels
from rcmseg.synth import make_mosaic, write_mosaic_tiff


def annotation(name: str, points: list[tuple[int, int]]) -> str:
    coordinates = "".join(
        f'<Coordinate Order="{order}" X="{x}" Y="{y}"/>' for order, (x, y) in enumerate(points)
    )
    return (
        f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{name}" Color="#00ff00">'
        f"<Coordinates>{coordinates}</Coordinates></Annotation>"
    )


def write_xml(path: Path, *annotations: str) -> Path:
    # The layout QuPath's extension writes: offsets of a whole-slide save are 0.
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations>'
        '<Annotations Name="" Description="" X="0" Y="0" W="0" H="0">'
        + "".join(annotations)
        + '</Annotations><AnnotationGroups><Group Name="Meshwork" PartOfGroup="None" '
        'Color="#00ff00"/></AnnotationGroups></ASAP_Annotations>',
        encoding="utf-8",
    )
    return path


def test_polygons_become_classes_and_the_rest_stays_unlabelled(tmp_path: Path):
    xml = write_xml(
        tmp_path / "label.xml",
        annotation("Meshwork", [(10, 10), (50, 10), (50, 40), (10, 40)]),
        annotation("ring", [(60, 0), (79, 0), (79, 19), (60, 19)]),
        annotation(" Nested ", [(30, 20), (45, 20), (45, 35), (30, 35)]),  # painted over meshwork
    )
    labels = asap_label_map(xml, width=80, height=60)
    assert labels.shape == (60, 80) and labels.dtype == np.uint8
    assert labels[25, 15] == 2 and labels[5, 70] == 4 and labels[25, 40] == 3
    assert labels[55, 5] == UNLABELLED and labels[30, 70] == UNLABELLED
    assert set(np.unique(labels).tolist()) == {2, 3, 4, UNLABELLED}
    # Coordinates are pixel edges (QuPath's): the square 60-79 × 0-19 is 19 × 19 pixels.
    assert np.count_nonzero(labels == 4) == 19 * 19
    assert np.count_nonzero(labels == 3) == 15 * 15


def test_rasterized_labels_have_the_mosaic_size(tmp_path: Path):
    image, _labels = make_mosaic(256, seed=1)
    mosaic = write_mosaic_tiff(tmp_path / "m.tif", image)
    xml = write_xml(tmp_path / "m.xml", annotation("artifact", [(0, 0), (99, 0), (99, 99)]))
    out = rasterize_asap_labels(xml, mosaic, tmp_path / "labels" / "m.png")
    labels = np.asarray(Image.open(out))
    assert labels.shape == (256, 256)
    assert labels[10, 80] == 1 and labels[200, 200] == UNLABELLED


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "not one of background"),
        ("<ASAP_Annotations><Annotations>", "not readable ASAP XML"),
        ("<ASAP_Annotations/>", "nothing is labelled"),
    ],
)
def test_bad_label_files_are_one_line_input_errors(tmp_path: Path, content, problem):
    path = tmp_path / "bad.xml"
    if content is None:
        write_xml(path, annotation("Tumour", [(0, 0), (5, 0), (5, 5)]))
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as raised:
        asap_label_map(path, 10, 10)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(path)) and problem in message
