"""QuPath GeoJSON: written outlines are valid and exact; QuPath 0.4-0.7 exports rasterise by the
stated rules (pixel centres, holes, smaller-wins overlaps, clipping, ignored objects)."""

from __future__ import annotations

import gc
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import shape as to_shape
from typer.testing import CliRunner

from rcmseg.classes import CLASS_COLOURS, CLASS_NAMES, UNLABELLED
from rcmseg.cli.main import app
from rcmseg.errors import InputError
from rcmseg.io.geojson import (
    class_table,
    collector_paused,
    label_features,
    parse_annotations,
    rasterise,
    read_annotations,
    region_polygons,
    signed_area,
    write_geojson,
)
from rcmseg.io.labels import load_remap_table, read_remap


def blocky_labels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Class indices in 25 px blocks, with some UNLABELLED blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 7, (height // 25 + 1, width // 25 + 1)).astype(np.uint8)
    blocks[blocks == 6] = UNLABELLED
    return np.kron(blocks, np.ones((25, 25), np.uint8))[:height, :width]


# ---------------------------------------------------------------------------------------------
# Writing


def inside(rings: list[list[list[float]]], height: int, width: int) -> np.ndarray:
    """Pixel centres inside a polygon (even-odd rule over all rings, axis-aligned edges)."""
    cy, cx = np.mgrid[:height, :width] + 0.5
    crossings = np.zeros((height, width), dtype=np.int64)
    for ring in rings:
        for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:], strict=True):
            if x1 == x2:
                crossings += (x1 > cx) & (min(y1, y2) < cy) & (cy < max(y1, y2))
    return crossings % 2 == 1


def test_region_with_a_hole_keeps_the_hole(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[2:12, 2:12] = 3  # nested, 10×10 ...
    labels[5:8, 5:8] = 0  # ... with a 3×3 hole
    path = tmp_path / "regions.geojson"
    write_geojson(path, labels, 4.0, mpp=2.0, classes=[3])
    collection = json.loads(path.read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection"
    (feature,) = collection["features"]
    assert feature["geometry"]["type"] == "Polygon"
    outer, hole = (np.asarray(ring) for ring in feature["geometry"]["coordinates"])
    assert outer.min() == 8 and outer.max() == 48  # mosaic pixels: working px × 4
    assert signed_area(outer) == 40 * 40 and signed_area(hole) == -12 * 12
    properties = feature["properties"]
    assert properties["objectType"] == "annotation"
    assert properties["classification"] == {"name": "nested", "color": list(CLASS_COLOURS[3])}
    assert properties["measurements"]["Area µm^2"] == pytest.approx((100 - 9) * 2.0**2)


def test_island_in_a_hole_and_diagonal_neighbours_are_separate_regions():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[2:7, 2:7] = False  # hole
    mask[4, 4] = True  # island inside the hole
    mask[0, 8] = True  # touches the frame only at a corner
    polygons = list(region_polygons(mask))
    areas = sorted(area for _rings, area in polygons)
    assert areas == [1, 1, 49 - 25]
    frame = next(rings for rings, area in polygons if area == 24)
    assert len(frame) == 2


def test_diagonal_contacts_split_rings_by_region_and_never_pinch():
    """Where two pixels of one region touch only diagonally, the pixels they enclose are a
    hole touching the exterior at that corner; of two regions, each gets its own ring."""
    closed_by_a_corner = np.zeros((6, 6), bool)
    closed_by_a_corner[1, 1:4] = closed_by_a_corner[1:4, 1] = closed_by_a_corner[3, 1:3] = True
    closed_by_a_corner[2, 3] = True  # one region; (2, 2) enclosed, (3, 3) outside
    ((exterior, hole), area) = list(region_polygons(closed_by_a_corner))[0]
    assert area == 7 and signed_area(exterior) == 8 and signed_area(hole) == -1
    assert hole[:-1].tolist() == [[2, 2], [2, 3], [3, 3], [3, 2]]  # top-left vertex first
    checkerboard = np.indices((5, 7)).sum(axis=0) % 2 == 0
    polygons = list(region_polygons(checkerboard))
    assert len(polygons) == 18 and all(len(rings) == 1 and area == 1 for rings, area in polygons)
    assert all(signed_area(rings[0]) == 1 for rings, _area in polygons)
    assert [rings[0][0].tolist() for rings, _area in polygons[:3]] == [[0, 0], [2, 0], [4, 0]]


def test_long_outlines_of_a_fragmented_map_round_trip():
    """Two interleaved combs (outlines of 40+ vertices) among speckle: every region, traced
    together, paints back exactly its own pixels."""
    mask = np.zeros((41, 41), bool)
    mask[0, :] = mask[0:38, 0:41:2] = True  # teeth hanging from the top row
    mask[40, :] = True
    mask[40:2:-1, 1:40:4] = True  # teeth rising from the bottom row, between them
    rng = np.random.default_rng(1)
    mask[rng.random(mask.shape) < 0.05] ^= True
    painted = np.zeros(mask.shape, np.int64)
    polygons = list(region_polygons(mask))
    for rings, area in polygons:
        region = inside([ring.tolist() for ring in rings], *mask.shape)
        assert region.sum() == area and mask[region].all()
        painted += region
    np.testing.assert_array_equal(painted, mask)
    assert max(len(rings[0]) for rings, _area in polygons) > 40


def test_features_rasterise_back_to_the_label_map():
    labels = blocky_labels(60, 50, seed=3)
    rng = np.random.default_rng(4)
    labels[rng.random(labels.shape) < 0.15] = 2  # speckle: many small regions and holes
    features = label_features(labels, 1.0)
    covered = np.zeros(labels.shape, np.int64)
    for feature in features:
        rings = feature["geometry"]["coordinates"]
        ring_arrays = [np.asarray(ring) for ring in rings]
        assert all((ring[0] == ring[-1]).all() for ring in ring_arrays)
        # Exterior counter-clockwise, holes clockwise; no vertex visited twice (no pinches).
        assert signed_area(ring_arrays[0]) > 0
        assert all(signed_area(ring) < 0 for ring in ring_arrays[1:])
        assert all(len(np.unique(ring[:-1], axis=0)) == len(ring) - 1 for ring in ring_arrays)
        region = inside(rings, *labels.shape)
        index = CLASS_NAMES.index(feature["properties"]["classification"]["name"])
        assert (labels[region] == index).all()
        assert feature["properties"]["measurements"]["Area µm^2"] == region.sum() * 4.0
        covered += region
    np.testing.assert_array_equal(covered, labels != UNLABELLED)


def test_geojson_scaling_simplification_and_filters():
    labels = np.zeros((40, 40), np.uint8)
    rows, cols = np.mgrid[:40, :40]
    labels[rows > cols] = 1  # a staircase diagonal
    labels[0, 39] = 2  # one-pixel region
    exact = label_features(labels, 2.5, classes=[1])
    assert isinstance(exact[0]["geometry"]["coordinates"][0][0][0], float)
    simplified = label_features(labels, 1.0, classes=[1], simplify_px=0.75)
    exact_ring = np.asarray(
        label_features(labels, 1.0, classes=[1])[0]["geometry"]["coordinates"][0]
    )
    simple_ring = np.asarray(simplified[0]["geometry"]["coordinates"][0])
    assert len(simple_ring) < len(exact_ring) // 4
    assert signed_area(simple_ring) == pytest.approx(signed_area(exact_ring), rel=0.05)
    assert len(label_features(labels, 1.0, classes=[2])) == 1
    assert label_features(labels, 1.0, classes=[2], min_area_px=2) == []


def random_label_maps(count: int, seed: int = 0):
    """Speckled maps of 2-4 classes with unlabelled pixels: many holes, islands, diagonals."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(2, 48, 2))
        classes = int(rng.integers(2, 5))
        labels = rng.integers(0, classes, (height, width)).astype(np.uint8)
        labels[rng.random((height, width)) < rng.random() * 0.3] = UNLABELLED
        yield labels


@pytest.mark.parametrize("simplify_px", [0.0, 0.5])
def test_written_polygons_are_valid_in_shapely_on_random_maps(simplify_px):
    checked = 0
    for labels in random_label_maps(150, seed=int(simplify_px * 10)):
        for feature in label_features(labels, 4.0, simplify_px=simplify_px):
            geometry = feature["geometry"]
            assert geometry["type"] == "Polygon"  # every region is one piece
            polygon = to_shape(geometry)
            assert polygon.is_valid, shapely.is_valid_reason(polygon)
            assert isinstance(feature["properties"]["measurements"], dict)
            checked += 1
    assert checked > 1000


def test_diagonal_pixels_and_a_hole_touching_the_outline_stay_valid():
    # A ring round one hole pixel with its corner pixel missing: the hole touches the outline at
    # one vertex; two diagonal pixels; a checkerboard (every pixel its own region).
    ring = np.zeros((6, 6), np.uint8)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0
    ring[3, 3] = 0
    checker = (np.indices((6, 6)).sum(axis=0) % 2).astype(np.uint8)
    for labels in (ring, np.eye(3, dtype=np.uint8), checker):
        features = label_features(labels, 1.0)
        for feature in features:
            assert to_shape(feature["geometry"]).is_valid
        found = parse_annotations({"type": "FeatureCollection", "features": features}, Path("x"))
        np.testing.assert_array_equal(rasterise(found.annotations, labels.shape)[0], labels)


def test_written_outlines_rasterise_back_exactly_on_random_maps():
    for labels in random_label_maps(100, seed=7):
        collection = {"type": "FeatureCollection", "features": label_features(labels, 1.0)}
        found = parse_annotations(collection, Path("x"))
        painted, counts = rasterise(found.annotations, labels.shape)
        np.testing.assert_array_equal(painted, labels)
        assert counts.overlap_px == 0 and counts.clipped == 0


def test_scaled_outlines_cover_whole_blocks_of_the_mosaic_grid():
    labels = blocky_labels(30, 41, seed=2)
    found = parse_annotations({"features": label_features(labels, 4.0)}, Path("x"))
    painted, _counts = rasterise(found.annotations, (123, 166))  # not multiples of 4
    expected = np.full((123, 166), UNLABELLED, np.uint8)
    expected[:120, :164] = np.repeat(np.repeat(labels, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(painted, expected)


def test_the_collector_is_paused_only_inside_the_block_and_left_as_it_was():
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), collector_paused():
        1 / 0  # noqa: B018 - an error inside the block must not leave the collector off
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller that turned it off keeps it off
    finally:
        gc.enable()
    label_features(blocky_labels(30, 41), 4.0)
    assert gc.isenabled()


# ---------------------------------------------------------------------------------------------
# Reading what QuPath 0.4-0.7 export


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, classification: object = None, **properties: object) -> dict:
    props = {"objectType": "annotation", **properties}
    if classification is not None:
        props["classification"] = classification
    return {
        "type": "Feature",
        "id": "6a5c9c1e-2f0b-4a53-9d54-0c7e1b1f3a11",
        "geometry": geometry,
        "properties": props,
    }


def polygon(*rings: list[list[float]]) -> dict:
    return {"type": "Polygon", "coordinates": list(rings)}


SHAPE = (40, 60)  # (H, W) of the mosaic grid in these tests


def qupath_04() -> tuple[dict, np.ndarray]:
    """FeatureCollection (FEATURE_COLLECTION option): a meshwork region with a hole, a nested
    detail inside it (smaller: wins), a detection, an unclassified annotation."""
    features = [
        feature(
            polygon(rectangle(0, 0, 40, 30), rectangle(5, 5, 15, 15)),
            {"name": "Meshwork", "color": [0, 200, 0]},
            isLocked=True,
            measurements={"Area µm^2": 1025.0},
        ),
        feature(polygon(rectangle(20, 10, 30, 20)), {"name": "NESTED", "color": [0, 255, 255]}),
        feature(polygon(rectangle(0, 0, 60, 40)), "ring", objectType="detection"),
        feature(polygon(rectangle(50, 30, 60, 40))),  # unclassified
    ]
    expected = np.full(SHAPE, UNLABELLED, np.uint8)
    expected[0:30, 0:40] = 2
    expected[5:15, 5:15] = UNLABELLED  # the hole
    expected[10:20, 20:30] = 3
    return {"type": "FeatureCollection", "features": features}, expected


def qupath_05() -> tuple[list, np.ndarray]:
    """A bare list of Features: a MultiPolygon (two pieces, one with a hole), a derived class
    (``names``), measurements as a list, a line and a point annotation, a string class."""
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [rectangle(0, 0, 10, 10), rectangle(2, 2, 4, 4)],
            [rectangle(30.5, 20.2, 40.5, 29.6)],  # pixel-centre rule on fractional edges
        ],
    }
    features = [
        feature(multi, {"names": ["ring"], "color": [0, 0, 255]}, measurements=[]),
        feature(polygon(rectangle(50, 0, 60, 10)), {"names": ["Art", "Ifact"], "color": [1, 2, 3]}),
        feature({"type": "LineString", "coordinates": [[0, 0], [50, 30]]}, "ring"),
        feature({"type": "Point", "coordinates": [5, 5]}, "ring"),
        feature(polygon(rectangle(12, 30, 22, 40)), "aspecific"),
    ]
    expected = np.full(SHAPE, UNLABELLED, np.uint8)
    expected[0:10, 0:10] = 4
    expected[2:4, 2:4] = UNLABELLED
    expected[20:30, 30:40] = 4  # x: centres 30.5 (on the left edge: in) to 39.5; y: 20.5-29.5
    expected[0:10, 50:60] = 1  # "Art: Ifact" mapped by the remap table
    expected[30:40, 12:22] = 5
    return features, expected


def qupath_06() -> tuple[dict, np.ndarray]:
    """One Feature (no FEATURE_COLLECTION): a polygon past the left and bottom edges (clipped)."""
    single = feature(
        polygon([[-10, 25], [20, 25], [20, 55], [-10, 55], [-10, 25]]),
        {"name": "background", "color": [255, 0, 0]},
    )
    expected = np.full(SHAPE, UNLABELLED, np.uint8)
    expected[25:40, 0:20] = 0
    return single, expected


REMAP = {"Art: Ifact": "artifact"}


@pytest.mark.parametrize(
    ("export", "counts"),
    [
        (qupath_04, {"ignored_objects": 1, "unclassified": 1, "overlap_px": 100, "clipped": 0}),
        (qupath_05, {"ignored_geometries": 2, "overlap_px": 0, "clipped": 0}),
        (qupath_06, {"clipped": 1, "overlap_px": 0}),
    ],
)
def test_qupath_exports_rasterise_to_the_expected_label_map(tmp_path, export, counts):
    document, expected = export()
    path = tmp_path / "export.geojson"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    (tmp_path / "remap.json").write_text(json.dumps(REMAP))
    names = class_table(read_remap(tmp_path / "remap.json").names)
    found = read_annotations(path, names)
    labels, raster = rasterise(found.annotations, SHAPE)
    np.testing.assert_array_equal(labels, expected)
    seen = {**vars(found), **vars(raster)}
    assert {key: seen[key] for key in counts} == counts


def test_older_exports_without_objecttype_are_annotations_and_gzip_is_read(tmp_path):
    features = [
        {  # QuPath 0.2/0.3: object_type, id naming the class, measurements as a list
            "type": "Feature",
            "id": "PathAnnotationObject",
            "geometry": polygon(rectangle(0, 0, 10, 10)),
            "properties": {
                "object_type": "annotation",
                "classification": {"name": "ring", "colorRGB": -16776961},
                "isLocked": False,
                "measurements": [{"name": "Area", "value": 100}],
            },
        },
        {  # no objectType at all, only isLocked and a UUID: an annotation (QuPath's default)
            "type": "Feature",
            "id": "2a0d3b7e-5f0e-4c43-8d1f-2b3c4d5e6f70",
            "geometry": polygon(rectangle(10, 0, 20, 10)),
            "properties": {"isLocked": True, "classification": {"name": "nested"}},
        },
        {  # a v0.2 detection named by its id
            "type": "Feature",
            "id": "PathDetectionObject",
            "geometry": polygon(rectangle(0, 0, 20, 20)),
            "properties": {"classification": {"name": "ring"}},
        },
        {"type": "Feature", "geometry": polygon(rectangle(0, 10, 5, 15)), "properties": {}},
    ]
    path = tmp_path / "old.geojson"
    path.write_bytes(gzip.compress(json.dumps(features).encode()))
    found = read_annotations(path)
    assert (found.ignored_objects, found.unclassified) == (1, 1)
    labels, _ = rasterise(found.annotations, (20, 20))
    assert (labels[:10, :10] == 4).all() and (labels[:10, 10:] == 3).all()
    assert (labels[10:] == UNLABELLED).all()


def test_unknown_class_is_a_one_line_error_naming_it_and_the_known_names(tmp_path):
    path = tmp_path / "lab.geojson"
    features = [feature(polygon(rectangle(0, 0, 5, 5)), {"name": "Tumor", "color": [200, 0, 0]})]
    path.write_text(json.dumps(features))
    with pytest.raises(InputError) as caught:
        read_annotations(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "'Tumor'" in message
    assert all(name in message for name in CLASS_NAMES) and "--remap" in message
    (tmp_path / "remap.csv").write_text("source,target\nTumor,nested\nStroma,unlabelled\n")
    table = read_remap(tmp_path / "remap.csv")
    assert table.names == {"tumor": 3, "stroma": UNLABELLED} and table.values == {}
    assert read_annotations(path, class_table(table.names)).annotations[0].label == 3


def test_remap_tables_keep_one_parser_for_values_and_names(tmp_path):
    path = tmp_path / "remap.json"
    path.write_text(json.dumps({"7": "unlabelled", "0": "ring", "Junctional Nest": "nested"}))
    assert load_remap_table(path) == {7: UNLABELLED, 0: 4}  # what rcmseg train uses
    assert read_remap(path).names == {"junctional nest": 3}
    path.write_text(json.dumps({"Junctional Nest": "tumour"}))
    with pytest.raises(InputError, match="'tumour'.*unknown"):
        read_remap(path)


def test_a_mapped_unlabelled_class_carves_a_larger_region(tmp_path):
    features = [
        feature(polygon(rectangle(0, 0, 20, 20)), "meshwork"),
        feature(polygon(rectangle(5, 5, 10, 10)), {"name": "Ignore*", "color": [180, 180, 180]}),
        feature(polygon(rectangle(0, 0, 20, 20)), "ring"),  # same area, later in the file: wins
    ]
    found = parse_annotations(features, tmp_path / "x.geojson")
    labels, counts = rasterise(found.annotations, (20, 20))
    expected = np.full((20, 20), 4, np.uint8)
    expected[5:10, 5:10] = UNLABELLED
    np.testing.assert_array_equal(labels, expected)
    assert counts.overlapping == 2 and counts.overlap_px == 400 + 25


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "FeatureCollection", "features": 3}', "features"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [["a"]]}}]', "bad"),
        ("42", "expected a GeoJSON"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, text, problem):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as caught:
        read_annotations(path)
    assert "\n" not in str(caught.value)


def test_fill_matches_shapely_on_random_star_polygons():
    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[:64, :80] + 0.5
    for _ in range(20):
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 40))))
        radii = rng.uniform(5, 45, len(angles))
        ring = np.stack([40 + radii * np.cos(angles), 30 + radii * np.sin(angles)], axis=1)
        ring = np.concatenate([ring, ring[:1]])  # partly past the edges of the 80x64 grid
        found = parse_annotations([feature(polygon(ring.tolist()), "ring")], Path("x"))
        labels, _ = rasterise(found.annotations, (64, 80))
        expected = shapely.contains_xy(shapely.Polygon(ring), cols, rows)
        np.testing.assert_array_equal(labels == 4, expected)


def test_cli_from_geojson_writes_the_label_map_and_errors_are_one_line(tmp_path):
    import tifffile
    from PIL import Image

    tifffile.imwrite(tmp_path / "m.tif", np.zeros(SHAPE, np.uint8))
    document, expected = qupath_04()
    (tmp_path / "a.geojson").write_text(json.dumps(document))
    runner = CliRunner()
    args = ["labels", "from-geojson", str(tmp_path / "a.geojson"), "--mosaic"]
    result = runner.invoke(app, [*args, str(tmp_path / "m.tif"), "--out", str(tmp_path / "l.png")])
    assert result.exit_code == 0, result.output
    assert "1 objects" in result.output and "1 unclassified" in result.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), expected)
    (tmp_path / "b.geojson").write_text(json.dumps([feature(polygon(rectangle(0, 0, 1, 1)), "x")]))
    bad = [str(tmp_path / "b.geojson"), "--mosaic", str(tmp_path / "m.tif"), "--out", "o.png"]
    result = runner.invoke(app, ["labels", "from-geojson", *bad])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "'x'" in result.output
    assert "Traceback" not in result.output


def test_written_geojson_file_reads_back(tmp_path):
    labels = blocky_labels(50, 40, seed=9)
    path = write_geojson(tmp_path / "w.geojson", labels, 2.0)
    found = read_annotations(path)
    painted, _ = rasterise(found.annotations, (100, 80))
    np.testing.assert_array_equal(painted, np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1))
