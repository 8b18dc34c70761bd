"""The tumour-region outline (union of tile squares) and QuPath's GeoJSON layout."""

import json

import numpy as np

from wsi.heatmap.geojson import feature_collection, tile_ring, union_polygons


def _tiles(mask: np.ndarray, size: float = 10.0) -> np.ndarray:
    j, i = np.nonzero(mask)
    return np.stack([i * size, j * size], axis=1)


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _inside(ring: np.ndarray, x: float, y: float) -> bool:
    a, b = ring, np.roll(ring, -1, axis=0)
    hits = (a[:, 0] == b[:, 0]) & ((a[:, 1] > y) != (b[:, 1] > y)) & (a[:, 0] > x)
    return bool(hits.sum() % 2)


def _covered(polygons, x: float, y: float) -> bool:
    return any(_inside(p[0], x, y) and not any(_inside(h, x, y) for h in p[1:]) for p in polygons)


def _check_valid(polygons) -> None:
    for polygon in polygons:
        assert _area(polygon[0]) > 0                           # shells counter-clockwise
        for hole in polygon[1:]:
            assert _area(hole) < 0                             # holes clockwise
        for ring in polygon:
            assert len({tuple(v) for v in ring}) == len(ring)  # simple: no vertex visited twice


def test_union_of_random_tile_sets_covers_exactly_the_tiles():
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = rng.random((9, 11)) < 0.55
        polygons = union_polygons(_tiles(mask), 10.0)
        _check_valid(polygons)
        assert sum(_area(r) for p in polygons for r in p) == mask.sum() * 100.0
        for j in range(9):
            for i in range(11):
                assert _covered(polygons, i * 10 + 5, j * 10 + 5) == mask[j, i]


def test_block_of_tiles_is_one_rectangle_with_corners_only():
    mask = np.zeros((6, 6), bool)
    mask[1:4, 2:6] = True
    (polygon,) = union_polygons(_tiles(mask, 512.0), 512.0)
    assert len(polygon) == 1
    assert polygon[0].tolist() == [[1024, 512], [3072, 512], [3072, 2048], [1024, 2048]]


def test_ring_of_tiles_has_a_hole_and_an_island_inside_it_is_its_own_polygon():
    mask = np.ones((7, 7), bool)
    mask[1:6, 1:6] = False
    mask[3, 3] = True
    polygons = sorted(union_polygons(_tiles(mask), 10.0), key=lambda p: -_area(p[0]))
    _check_valid(polygons)
    assert [len(p) for p in polygons] == [2, 1]
    assert _area(polygons[0][1]) == -2500.0 and _area(polygons[1][0]) == 100.0


def test_tiles_touching_only_at_a_corner_give_simple_rings():
    polygons = union_polygons(_tiles(np.array([[1, 0], [0, 1]], bool)), 10.0)
    _check_valid(polygons)
    assert len(polygons) == 2
    c_shape = np.array([[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0]], bool)  # closes only through a corner
    polygons = union_polygons(_tiles(c_shape), 10.0)
    _check_valid(polygons)
    assert sum(_area(r) for p in polygons for r in p) == 800.0


def test_overlapping_and_fractional_tiles_union_exactly():
    polygons = union_polygons(np.array([[0, 0], [256, 0], [256, 256]]), 511.5)
    (polygon,) = polygons
    assert polygon[0].tolist() == [[0, 0], [767.5, 0], [767.5, 767.5], [256, 767.5], [256, 511.5], [0, 511.5]]


def test_feature_collection_is_what_qupath_imports():
    coords = np.array([[0, 0], [512, 0], [1024, 0]])
    doc = feature_collection(coords, 512.0, {"attention": np.array([0.2, 0.5, 0.3]),
                                             "tumour probability": np.array([0.1, 0.9, 0.7])},
                             np.array([False, True, True]), "tumour", (220, 40, 40), "tumour region")
    doc = json.loads(json.dumps(doc))
    assert doc["type"] == "FeatureCollection"
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    assert [f["geometry"]["coordinates"][0] for f in tiles] == [tile_ring(x, y, 512.0) for x, y in coords]
    assert tiles[0]["geometry"]["coordinates"][0] == [[0, 0], [512, 0], [512, 512], [0, 512], [0, 0]]
    assert tiles[1]["properties"]["measurements"] == {"attention": 0.5, "tumour probability": 0.9}
    assert "classification" not in tiles[0]["properties"]
    assert tiles[1]["properties"]["classification"] == {"name": "tumour", "color": [220, 40, 40]}
    (region,) = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert region["geometry"] == {"type": "Polygon",
                                  "coordinates": [[[512, 0], [1536, 0], [1536, 512], [512, 512], [512, 0]]]}
    assert region["properties"]["classification"]["name"] == "tumour"
    empty = feature_collection(np.zeros((0, 2)), 512.0, {}, np.zeros(0, bool), "tumour", (0, 0, 0), "r")
    assert empty == {"type": "FeatureCollection", "features": []}
