"""Tiles and the tumour region as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

Coordinates are level-0 pixels with the origin at the slide's top-left corner, QuPath's own convention. Every
tile is a Feature with a square Polygon (its exact level-0 footprint), ``objectType`` ``tile`` and a
``measurements`` object (QuPath >= 0.4 reads ``{name: value}``); tiles at or above the threshold also get a
``classification`` ``{"name", "color": [r, g, b]}``. The tumour region is one ``annotation`` Feature: the
union of the classified tiles' squares, a Polygon or MultiPolygon with holes.

The union is traced on the tile grid itself, no geometry library: the squares' edges cut the plane into a
grid of cells (exact, also for overlapping or irregular tiles), each cell is inside or outside, and the
boundary edges between the two are chained into rings. A ring that touches itself at a corner (two tiles
meeting only diagonally) is split there into simple rings, so every ring is simple and the result is valid
for JTS, which QuPath uses. Shells wind counter-clockwise and holes clockwise (RFC 7946, read with y up).
"""

from __future__ import annotations

import numpy as np


def _number(v: float) -> int | float:
    v = float(v)
    return int(v) if v.is_integer() else v


def tile_ring(x: float, y: float, size: float) -> list[list[int | float]]:
    """The closed ring of one tile's level-0 square."""
    x0, y0, x1, y1 = _number(x), _number(y), _number(x + size), _number(y + size)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


# ------------------------------------------------------------------------------------------ union
def _cells(coords: np.ndarray, size: float):
    """The cut lines (xs, ys) and which cells (ny, nx) lie inside some square."""
    x0, y0 = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    xs, ys = np.unique(np.concatenate([x0, x0 + size])), np.unique(np.concatenate([y0, y0 + size]))
    i0, i1 = np.searchsorted(xs, x0), np.searchsorted(xs, x0 + size)
    j0, j1 = np.searchsorted(ys, y0), np.searchsorted(ys, y0 + size)
    corners = np.zeros((len(ys), len(xs)), np.int64)  # 2-D difference array: +1 inside each square
    for rows, cols, sign in ((j0, i0, 1), (j0, i1, -1), (j1, i0, -1), (j1, i1, 1)):
        np.add.at(corners, (rows, cols), sign)
    inside = np.cumsum(np.cumsum(corners, axis=0), axis=1)[:-1, :-1] > 0
    return xs, ys, inside


def _boundary_edges(inside: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed edges between inside and outside cells, in grid-vertex indices (i = x, j = y), each with its
    inside cell on the same hand, so every ring they form winds the same way round the inside."""
    pad = np.pad(inside, 1)
    cell = pad[1:-1, 1:-1]
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # (outside neighbour, start vertex offset, end vertex offset) per side of cell (j, i)
        (pad[:-2, 1:-1], (0, 0), (1, 0)),   # top: left to right
        (pad[1:-1, 2:], (1, 0), (1, 1)),    # right: downwards
        (pad[2:, 1:-1], (1, 1), (0, 1)),    # bottom: right to left
        (pad[1:-1, :-2], (0, 1), (0, 0)),   # left: upwards
    )
    for neighbour, (sx, sy), (ex, ey) in sides:
        for j, i in zip(*np.nonzero(cell & ~neighbour)):
            out.setdefault((int(i) + sx, int(j) + sy), []).append((int(i) + ex, int(j) + ey))
    return out


def _closed_walks(edges: dict[tuple[int, int], list[tuple[int, int]]]):
    """Chain the edges into closed walks (every vertex has as many edges in as out, so each walk closes)."""
    while edges:
        start = next(iter(edges))
        walk, vertex = [], start
        while True:
            walk.append(vertex)
            following = edges[vertex]
            nxt = following.pop()
            if not following:
                del edges[vertex]
            if nxt == start:
                break
            vertex = nxt
        yield walk


def _simple_rings(walk: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Cut a closed walk at every repeated vertex into simple rings."""
    rings, stack, position = [], [], {}
    for v in walk:
        if v in position:
            p = position[v]
            rings.append(stack[p:])
            for u in stack[p + 1:]:
                del position[u]
            del stack[p + 1:]
        else:
            position[v] = len(stack)
            stack.append(v)
    rings.append(stack)
    return rings


def _corners_only(ring: list[tuple[int, int]]) -> np.ndarray:
    """Drop vertices in the middle of straight runs."""
    a = np.asarray(ring, np.int64)
    before, after = a - np.roll(a, 1, axis=0), np.roll(a, -1, axis=0) - a
    turn = (before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) != 0
    return a[turn]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _contains(ring: np.ndarray, point: tuple[float, float]) -> bool:
    """Even-odd test against a rectilinear ring; ``point`` is a cell centre, so never on an edge."""
    a, b = ring, np.roll(ring, -1, axis=0)
    vertical = a[:, 0] == b[:, 0]
    crosses = vertical & ((a[:, 1] > point[1]) != (b[:, 1] > point[1])) & (a[:, 0] > point[0])
    return bool(np.count_nonzero(crosses) % 2)


def _cell_inside_hole(ring: np.ndarray) -> tuple[float, float]:
    """Centre of the outside cell next to the ring's first edge: a point strictly inside the hole."""
    (x0, y0), (x1, y1) = ring[0], ring[1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    return (x0 + 0.5 * dx + 0.5 * dy, y0 + 0.5 * dy - 0.5 * dx)


def union_polygons(coords: np.ndarray, size: float) -> list[list[np.ndarray]]:
    """The union of the squares ``[x, x+size] x [y, y+size]`` as polygons, each ``[shell, *holes]``, rings as
    (k, 2) float64 level-0 vertices (not repeated at the end); shells counter-clockwise, holes clockwise."""
    coords = np.asarray(coords).reshape(-1, 2)
    if len(coords) == 0:
        return []
    xs, ys, inside = _cells(coords, size)
    shells, holes = [], []
    for walk in _closed_walks(_boundary_edges(inside)):
        for ring in _simple_rings(walk):
            ring = _corners_only(ring)
            (shells if _signed_area(ring) > 0 else holes).append(ring)
    polygons = [[shell] for shell in shells]
    areas = [_signed_area(s) for s in shells]
    for hole in holes:
        point = _cell_inside_hole(hole)
        owner = min((k for k, s in enumerate(shells) if _contains(s, point)), key=lambda k: areas[k])
        polygons[owner].append(hole)
    return [[np.stack([xs[r[:, 0]], ys[r[:, 1]]], axis=1) for r in polygon] for polygon in polygons]


# ------------------------------------------------------------------------------------------ features
def _closed(ring: np.ndarray) -> list[list[int | float]]:
    points = [[_number(x), _number(y)] for x, y in ring]
    return points + [points[0]]


def _significant(v: float) -> float:
    return float(f"{float(v):.6g}")


def feature_collection(coords: np.ndarray, size: float, measurements: dict[str, np.ndarray],
                       positive: np.ndarray, class_name: str, colour: tuple[int, int, int],
                       region_name: str) -> dict:
    """Tile Features (measurements per tile; ``class_name`` where ``positive``) and one region annotation
    (the union of the positive tiles), as a GeoJSON FeatureCollection dict."""
    classification = {"name": class_name, "color": [int(c) for c in colour]}
    columns = {name: np.asarray(values) for name, values in measurements.items()}
    features = []
    for k, (x, y) in enumerate(np.asarray(coords).reshape(-1, 2)):
        properties = {"objectType": "tile",
                      "measurements": {name: _significant(v[k]) for name, v in columns.items()}}
        if positive[k]:
            properties["classification"] = classification
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [tile_ring(x, y, size)]},
                         "properties": properties})
    polygons = union_polygons(np.asarray(coords).reshape(-1, 2)[np.asarray(positive, bool)], size)
    if polygons:
        rings = [[_closed(r) for r in polygon] for polygon in polygons]
        geometry = ({"type": "Polygon", "coordinates": rings[0]} if len(rings) == 1
                    else {"type": "MultiPolygon", "coordinates": rings})
        features.append({"type": "Feature", "geometry": geometry,
                         "properties": {"objectType": "annotation", "name": region_name,
                                        "classification": classification,
                                        "measurements": {"tiles": int(np.count_nonzero(positive))}}})
    return {"type": "FeatureCollection", "features": features}
