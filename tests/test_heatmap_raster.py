"""Painting per-tile values on level-0-aligned grids: area weighting, averaging, smoothing, windows."""

import numpy as np
import pytest

from wsi.errors import ConfigError
from wsi.heatmap.raster import TileValues, colour_table, normalise, paint, render, render_rgba, to_rgba
from wsi.heatmap.tiff import pyramid_shapes


def test_tile_edges_inside_a_pixel_count_by_the_covered_share():
    # one 64 px tile at level-0 x = 48: grid pixels of 32 px are [32, 64) half, [64, 96) fully, [96, 128) half
    tiles = TileValues(np.array([[48, 0]]), 64.0, np.array([0.8]))
    _, weight = paint(tiles, 32.0, 0, 0, 5, 3)
    assert weight[0].tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert weight[1].tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert weight[2].tolist() == [0.0] * 5
    value, coverage = render(tiles, 32.0, 0, 0, 5, 3)
    assert np.allclose(value[0, 1:4], 0.8) and value[0, 0] == 0 and value[2].max() == 0
    assert coverage[0].tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_overlapping_tiles_are_averaged():
    tiles = TileValues(np.array([[0, 0], [32, 0]]), 64.0, np.array([0.0, 1.0]))
    value, coverage = render(tiles, 32.0, 0, 0, 4, 1)
    assert np.allclose(value[0], [0.0, 0.5, 1.0, 0.0])
    assert coverage[0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_smoothing_blends_values_but_keeps_empty_pixels_transparent():
    tiles = TileValues(np.array([[0, 0], [64, 0]]), 64.0, np.array([0.0, 1.0]))
    sharp, _ = render(tiles, 16.0, 0, 0, 12, 4)
    smooth, coverage = render(tiles, 16.0, 0, 0, 12, 4, sigma=1.5)
    assert sharp[0, 3] == 0.0 and sharp[0, 4] == 1.0
    assert 0.0 < smooth[0, 3] < 0.5 < smooth[0, 4] < 1.0     # the step is softened across the tile edge
    assert np.all(smooth[:, 8:] == 0) and np.all(coverage[:, 8:] == 0)  # nothing leaks past the tiles


def test_a_window_with_its_halo_renders_exactly_the_pixels_of_the_whole_raster():
    rng = np.random.default_rng(1)
    coords = rng.integers(0, 2000, (60, 2))
    tiles = TileValues(coords, 150.0, rng.random(60))
    whole, whole_cov = render(tiles, 10.0, 0, 0, 216, 216, sigma=2.5)
    assembled = np.zeros_like(whole)
    for y in range(0, 216, 50):
        for x in range(0, 216, 50):
            v, _ = render(tiles, 10.0, x, y, 50, 50, sigma=2.5)
            assembled[y:y + 50, x:x + 50] = v[:216 - y, :216 - x]
    assert np.allclose(assembled, whole, atol=1e-6)
    assert whole_cov.max() == 1.0


def test_percentile_is_rank_within_the_slide_and_raw_keeps_probabilities():
    assert normalise(np.array([0.3, 10.0, -1.0]), "percentile").tolist() == [0.5, 1.0, 0.0]
    assert normalise(np.array([0.2, 0.2, 0.9]), "percentile").tolist() == [0.25, 0.25, 1.0]
    assert normalise(np.array([0.2, 0.7]), "raw").tolist() == [0.2, 0.7]
    with pytest.raises(ConfigError, match="heatmap.normalize"):
        normalise(np.array([0.2]), "zscore")


def test_colours_come_from_the_colormap_and_alpha_from_coverage():
    table = colour_table("magma")
    rgba = to_rgba(np.array([[0.0, 1.0, 0.5]]), np.array([[1.0, 0.5, 0.0]]), table)
    assert rgba[0, 0, :3].tolist() == table[0].tolist() and rgba[0, 1, :3].tolist() == table[255].tolist()
    assert rgba[0, :, 3].tolist() == [255, 128, 0]
    with pytest.raises(ConfigError, match="not a matplotlib colormap"):
        colour_table("no-such-map")


def test_pyramid_levels_halve_down_to_one_tile_and_cover_the_slide():
    levels = pyramid_shapes(100_000, 30_000, 32)
    assert levels[0] == (938, 3125, 32.0)                     # ceil: the last pixel overhangs the slide
    assert [ds for _, _, ds in levels] == [32.0, 64.0, 128.0, 256.0, 512.0]
    assert max(levels[-1][:2]) <= 256 < max(levels[-2][:2])


def test_rendering_in_bands_gives_the_whole_raster():
    rng = np.random.default_rng(2)
    tiles = TileValues(rng.integers(0, 3000, (80, 2)), 200.0, rng.random(80))
    table = colour_table("viridis")
    whole = to_rgba(*render(tiles, 16.0, 0, 0, 200, 190, sigma=1.5), table)
    banded = render_rgba(tiles, 16.0, 200, 190, table, sigma=1.5, band=32)
    assert (banded == whole).all()
