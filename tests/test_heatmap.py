"""Heatmaps of stores whose scores are known: pixel-exact alignment of GeoJSON, TIFF and PNGs with the slide.

The stores are built here with the store API (no slide file): tiles of 320 level-0 px on a 60 x 20 grid of a
0.25 um/px slide, the first column and the bottom row without tissue (no tiles), and a "tumour" block of
tiles with high attention and tumour probability. Tile pixels are red inside the block and blue outside.
"""

import dataclasses
import json
import warnings

import numpy as np
import openslide
import pytest
import tiffslide
from PIL import Image

from wsi.cli import main as cli_main
from wsi.config import load_config
from wsi.errors import ConfigError, StoreError
from wsi.failures import read_failures
from wsi.heatmap import OUTPUTS, HeatmapConfig, HeatmapParams, heatmap_dir, heatmap_slide, heatmaps
from wsi.heatmap.raster import colour_table
from wsi.store import ScoreAttrs, SlideAttrs, TileStoreWriter, TilingAttrs, store_path

T = 320                     # tile footprint at level 0
COLS, ROWS = 60, 20
W, H = COLS * T, ROWS * T   # 19200 x 6400: heatmap base 600 x 200 at downsample 32, so three TIFF levels
MASK_DS = 64.0              # thumbnail: 300 x 100
BLOCK = (7, 19, 4, 12)      # tumour tiles: columns 7..18, rows 4..11
RUN = "abmil_test"


def _config(**heatmap):
    return load_config(overrides={"heatmap": heatmap})


def _thumbnail() -> np.ndarray:
    y, x = np.mgrid[0:H // int(MASK_DS), 0:W // int(MASK_DS)]
    return np.stack([(x * 255 // x.max()), (y * 255 // y.max()), np.full_like(x, 200)], -1).astype(np.uint8)


def _coords() -> np.ndarray:
    rows, cols = np.mgrid[0:ROWS - 1, 1:COLS]
    return np.stack([cols.ravel() * T, rows.ravel() * T], axis=1)


def _in_block(coords: np.ndarray) -> np.ndarray:
    c0, c1, r0, r1 = BLOCK
    return ((coords[:, 0] >= c0 * T) & (coords[:, 0] < c1 * T)
            & (coords[:, 1] >= r0 * T) & (coords[:, 1] < r1 * T))


def make_store(out_dir, slide_id="s1", coords=None, *, scores=True, mask=True):
    """A committed store with pixels, mask and (optionally) the known scores of run ``RUN``."""
    coords = _coords() if coords is None else np.asarray(coords).reshape(-1, 2)
    slide = SlideAttrs(source_path=f"{slide_id}.svs", source_size=1, source_mtime=0.0, backend="openslide",
                       vendor="aperio", width=W, height=H, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                       objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=16, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=float(T), stride_px_level0=float(T), effective_mpp=0.5,
                         min_tissue_fraction=0.25, store_pixels=True, codec="lossless", quality=90,
                         chunk_tiles=64, tissue={}, wsi_version="test")
    writer = TileStoreWriter.create(store_path(out_dir, slide_id), slide_id, slide, tiling, coords=coords,
                                    tissue_fraction=np.ones(len(coords)))
    inside = _in_block(coords)
    pixels = np.zeros((len(coords), 16, 16, 3), np.uint8)
    pixels[inside, ..., 0] = 230
    pixels[~inside, ..., 2] = 230
    if len(coords):
        writer.write_tiles(0, pixels)
    if mask:
        thumb = _thumbnail()
        writer.write_mask(thumb[..., 0] > 0, thumb, downsample=MASK_DS, mpp=MASK_DS * 0.25)
    store = writer.commit()
    if scores:
        tumour = np.where(inside, 0.9, 0.2)
        attention = np.where(inside, 3.0, 1.0)  # ties: percentile ~0.96 in the block, ~0.46 outside
        attrs = ScoreAttrs(run=RUN, model="abmil", encoder="enc", classes=("normal", "tumour"),
                           probabilities=(0.1, 0.9), predicted="tumour")
        if len(coords):
            store.write_scores(RUN, attention / attention.sum(), np.stack([1 - tumour, tumour], 1), attrs)
        else:
            _write_empty_scores(store, attrs)
    return store


def _write_empty_scores(store, attrs):
    """scores/<run> of a store without tiles, in the documented layout: SlideStore.write_scores cannot
    (its reshape(0, -1) is ambiguous), and the tiler never makes such a store, but a heatmap must cope."""
    group = store.group.require_group("scores").create_group(attrs.run)
    group.create_array("attention", shape=(0,), chunks=(1,), dtype="float32")
    group.create_array("class_scores", shape=(0, len(attrs.classes)), chunks=(1, len(attrs.classes)),
                       dtype="float32")
    group.attrs.update({**attrs.to_dict(), "complete": True})


def _values(rgba: np.ndarray, colormap: str = "viridis") -> np.ndarray:
    """Read heatmap values back from opaque colormapped pixels (NaN where transparent)."""
    table = colour_table(colormap).astype(np.int64)
    keys = {int(r) << 16 | int(g) << 8 | int(b): k / 255 for k, (r, g, b) in enumerate(table)}
    rgb = rgba[..., :3].astype(np.int64)
    packed = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    values = np.vectorize(lambda p: keys.get(int(p), -1.0))(packed)
    opaque = rgba[..., 3] == 255
    assert (values[opaque] >= 0).all(), "an opaque pixel has a colour that is not in the colormap"
    return np.where(opaque, values, np.nan)


def _expected(downsample: float, shape) -> tuple[np.ndarray, np.ndarray]:
    """Which pixels of a grid lie wholly inside the tumour block / wholly inside non-tumour tissue."""
    h, w = shape
    x0 = np.arange(w) * downsample
    y0 = np.arange(h) * downsample
    c0, c1, r0, r1 = BLOCK

    def within(lo, hi, a, b):
        return (lo >= a) & (hi <= b)

    in_x, in_y = within(x0, x0 + downsample, c0 * T, c1 * T), within(y0, y0 + downsample, r0 * T, r1 * T)
    block = in_y[:, None] & in_x[None, :]
    tissue = (within(y0, y0 + downsample, 0, (ROWS - 1) * T)[:, None]
              & within(x0, x0 + downsample, T, COLS * T)[None, :])
    out_x = (x0 + downsample <= c0 * T) | (x0 >= c1 * T)
    out_y = (y0 + downsample <= r0 * T) | (y0 >= r1 * T)
    return block, tissue & (out_y[:, None] | out_x[None, :])


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """One run of the whole stage painting attention ranks, without smoothing, on the known store: (out_dir,
    summary). The default tumour-probability map has its own test."""
    out = tmp_path_factory.mktemp("out")
    make_store(out)
    config = HeatmapConfig.from_config(_config(smooth_sigma=0.0, value="attention"))
    summary = heatmaps(out, config, RUN, progress=False)
    return out, summary


def test_every_output_is_written_for_the_slide(painted):
    out, summary = painted
    assert summary.done == ["s1"] and summary.failed == {}
    folder = heatmap_dir(out, RUN, "s1")
    assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUTS + ("heatmap.json",))
    done = json.loads((folder / "heatmap.json").read_text())
    assert done["predicted"] == "tumour" and done["n_tiles"] == len(_coords())


def test_geojson_tile_polygons_are_their_level0_footprints(painted):
    out, _ = painted
    doc = json.loads((heatmap_dir(out, RUN, "s1") / "tiles.geojson").read_text())
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    coords = _coords()
    assert len(tiles) == len(coords)
    for feature, (x, y) in zip(tiles, coords):
        assert feature["geometry"] == {"type": "Polygon", "coordinates": [
            [[x, y], [x + T, y], [x + T, y + T], [x, y + T], [x, y]]]}
    inside = _in_block(coords)
    classified = np.array(["classification" in f["properties"] for f in tiles])
    assert (classified == inside).all()
    m = tiles[int(np.flatnonzero(inside)[0])]["properties"]["measurements"]
    assert m["tumour probability"] == pytest.approx(0.9) and m["normal probability"] == pytest.approx(0.1)
    assert m["attention percentile"] > 0.9 and m["attention"] > 0


def test_geojson_region_outline_is_the_tumour_block(painted):
    out, _ = painted
    doc = json.loads((heatmap_dir(out, RUN, "s1") / "tiles.geojson").read_text())
    (region,) = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    c0, c1, r0, r1 = BLOCK
    assert region["geometry"] == {"type": "Polygon", "coordinates": [
        [[c0 * T, r0 * T], [c1 * T, r0 * T], [c1 * T, r1 * T], [c0 * T, r1 * T], [c0 * T, r0 * T]]]}
    assert region["properties"]["classification"]["name"] == "tumour"


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_tiff_high_values_sit_over_the_tumour_block_at_every_level(painted, reader):
    out, _ = painted
    path = heatmap_dir(out, RUN, "s1") / "heatmap.tif"
    slide = openslide.OpenSlide(str(path)) if reader == "openslide" else tiffslide.TiffSlide(str(path))
    assert slide.dimensions == (W // 32, H // 32)
    assert slide.level_count == 3
    assert float(slide.properties[f"{reader}.mpp-x"]) == pytest.approx(0.25 * 32)
    assert float(slide.properties[f"{reader}.mpp-y"]) == pytest.approx(0.25 * 32)
    for level in range(slide.level_count):
        size = slide.level_dimensions[level]
        downsample = 32.0 * 2 ** level
        rgba = np.asarray(slide.read_region((0, 0), level, size))
        values = _values(rgba)
        block, outside = _expected(downsample, values.shape)
        assert block.any() and outside.any()
        assert np.nanmin(values[block]) >= 0.9, level           # the block's tiles rank highest
        assert np.nanmax(values[outside]) <= 0.5, level
        assert (rgba[..., 3][block | outside] == 255).all(), level
        assert (rgba[:, 0, 3] == 0).all(), level                # the column without tissue is transparent
    slide.close()


def test_tiff_lines_up_with_the_slide_through_its_mpp(painted):
    """A viewer scales the overlay by MPP: the heatmap pixel over level-0 point p is p / downsample."""
    out, _ = painted
    with tiffslide.TiffSlide(str(heatmap_dir(out, RUN, "s1") / "heatmap.tif")) as slide:
        scale = 0.25 / float(slide.properties["tiffslide.mpp-x"])    # heatmap pixels per level-0 pixel
        c0, _, r0, _ = BLOCK
        corner = (int(c0 * T * scale), int(r0 * T * scale))             # the block's top-left corner
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    values = _values(rgba)
    x, y = corner
    assert values[y, x] >= 0.9 and values[y - 1, x] <= 0.5 and values[y, x - 1] <= 0.5


def test_pngs_keep_the_thumbnail_aspect_ratio_and_show_it_outside_the_tiles(painted):
    out, _ = painted
    folder = heatmap_dir(out, RUN, "s1")
    thumb = _thumbnail()
    heat = np.asarray(Image.open(folder / "heatmap.png"))
    assert heat.shape == thumb.shape[:2] + (4,)
    block, outside = _expected(MASK_DS, thumb.shape[:2])
    values = _values(heat)
    assert np.nanmin(values[block]) >= 0.9 and np.nanmax(values[outside]) <= 0.5

    png = Image.open(folder / "overlay.png")
    x, y, w, h = json.loads(png.text["Description"])["panel"]
    assert w / h == thumb.shape[1] / thumb.shape[0] and w % thumb.shape[1] == 0
    assert "predicted tumour" in png.text["Title"]
    panel = np.asarray(png.convert("RGB"))[y:y + h, x:x + w]
    s = w // thumb.shape[1]
    shrunk = panel[::s, ::s]
    assert (shrunk[:, 0] == thumb[:, 0]).all()                 # no tile in the first column: the slide as is
    assert not (shrunk[block] == thumb[block]).all()          # the heatmap is blended over the tiles


def _count(image: np.ndarray, channel: int) -> int:
    """Pixels of pure red (channel 0) or blue (channel 2) tile colour."""
    return int(((image[..., channel] > 200) & (image[..., 2 - channel] < 50)).sum())


def test_top_tiles_grid_shows_the_most_attended_tiles_first(painted):
    out, _ = painted
    grid = np.asarray(Image.open(heatmap_dir(out, RUN, "s1") / "top_tiles.png").convert("RGB")).astype(int)
    top, bottom = grid[: grid.shape[0] // 2], grid[grid.shape[0] // 2:]
    assert _count(top, 0) > 1000 and _count(top, 2) == 0      # block tiles (red) have the highest attention
    assert _count(bottom, 2) > 1000 and _count(bottom, 0) == 0


def test_smoothing_softens_edges_but_keeps_the_block_on_top(tmp_path):
    make_store(tmp_path)
    heatmaps(tmp_path, HeatmapConfig.from_config(_config(smooth_sigma=2.0)), RUN, progress=False)
    with openslide.OpenSlide(str(heatmap_dir(tmp_path, RUN, "s1") / "heatmap.tif")) as slide:
        values = _values(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
    block, _ = _expected(32.0, values.shape)
    c0, c1, r0, r1 = BLOCK
    core = np.zeros_like(block)
    core[r0 * 10 + 8:r1 * 10 - 8, c0 * 10 + 8:c1 * 10 - 8] = True   # 8 px = the kernel's reach at sigma 2
    assert np.nanmin(values[core]) >= 0.8                            # the block's evidence, 0.81
    edge = values[r0 * 10 + 40, c0 * 10 - 2:c0 * 10 + 2]            # across the block's left edge
    assert 0.07 < edge[1] < edge[2] < 0.8                            # a ramp from 0.06, not a step


def test_rerun_skips_done_slides_and_redoes_them_when_parameters_change(tmp_path):
    make_store(tmp_path)
    config = _config(smooth_sigma=0.0)
    heatmaps(tmp_path, HeatmapConfig.from_config(config), RUN, progress=False)
    tif = heatmap_dir(tmp_path, RUN, "s1") / "heatmap.tif"
    first = tif.stat().st_mtime_ns
    assert heatmaps(tmp_path, HeatmapConfig.from_config(config), RUN, progress=False).done == ["s1"]
    assert tif.stat().st_mtime_ns == first
    heatmaps(tmp_path, HeatmapConfig.from_config(_config(smooth_sigma=0.0, colormap="magma")), RUN, progress=False)
    assert tif.stat().st_mtime_ns != first


def test_default_map_is_tumour_evidence_on_its_own_scale(tmp_path):
    """The default (value evidence, normalize auto) paints tile probability x attention relative to the top tile
    x slide probability as it is: 0.9 x 1 x 0.9 in the block, 0.2 x 1/3 x 0.9 outside; attention gets ranks,
    and value=tumour paints the tile probability alone."""
    assert HeatmapParams.from_sections(HeatmapConfig.from_config(_config(value="attention"))).normalize == "percentile"
    store = make_store(tmp_path)
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(_config(smooth_sigma=0.0)))
    assert (params.value, params.normalize) == ("evidence", "raw")
    for value, block_value, outside_value in (("evidence", 0.81, 0.06), ("tumour", 0.9, 0.2)):
        paths = heatmap_slide(store, RUN, tmp_path, dataclasses.replace(params, value=value))
        with tiffslide.TiffSlide(str(paths["heatmap.tif"])) as slide:
            values = _values(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
            assert json.loads(slide.properties["tiff.ImageDescription"])["value"] == value
        block, outside = _expected(32.0, values.shape)
        assert np.allclose(values[block], block_value, atol=1 / 255)
        assert np.allclose(values[outside], outside_value, atol=1 / 255)


def test_a_normal_slide_stays_dark_though_its_tiles_probabilities_are_high(tmp_path):
    """A normal slide (P(tumour) 0.1) whose unattended tiles carry an uncalibrated tile probability of 0.8: the
    tumour probability map lights them all and the GeoJSON calls them tumour; the evidence map stays below 0.1
    and classifies none."""
    store = make_store(tmp_path)
    attention, _, attrs = store.scores(RUN)
    tumour = np.full(len(store.coords), 0.8)
    store.write_scores(RUN, attention, np.stack([1 - tumour, tumour], 1),
                       dataclasses.replace(attrs, probabilities=(0.9, 0.1), predicted="normal"))
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(_config(smooth_sigma=0.0)))
    for value, brightest, classified in (("tumour", 0.8, len(tumour)), ("evidence", 0.08, 0)):
        paths = heatmap_slide(store, RUN, tmp_path, dataclasses.replace(params, value=value))
        values = _values(np.asarray(Image.open(paths["heatmap.png"])))
        assert abs(np.nanmax(values) - brightest) <= 2 / 255
        features = json.loads(paths["tiles.geojson"].read_text())["features"]
        assert sum("classification" in f["properties"] for f in features
                   if f["properties"].get("objectType") != "annotation") == classified


def test_a_training_slide_shows_its_out_of_fold_scores_labelled_as_such(tmp_path):
    """A slide of the run's own cohort: the ensemble trained on it, so the maps show the scores of the fold
    model that held it out (tile probability 0.6 in the block, 0.05 outside, slide probability 0.7: evidence
    0.42 and 0.012), and the overlay and heatmap.json say so."""
    store = make_store(tmp_path)
    ensemble_attention, ensemble_scores, attrs = store.scores(RUN)
    inside = _in_block(store.coords)
    oof_tumour = np.where(inside, 0.6, 0.05)
    store.write_scores(RUN, ensemble_attention, ensemble_scores,
                       dataclasses.replace(attrs, oof_folds=(1,), oof_probabilities=(0.3, 0.7), oof_predicted="tumour"),
                       out_of_fold=(ensemble_attention, np.stack([1 - oof_tumour, oof_tumour], 1)))
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(_config(smooth_sigma=0.0)))
    paths = heatmap_slide(store, RUN, tmp_path, params)
    with tiffslide.TiffSlide(str(paths["heatmap.tif"])) as slide:
        values = _values(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
    block, outside = _expected(32.0, values.shape)
    assert np.allclose(values[block], 0.42, atol=1 / 255) and np.allclose(values[outside], 0.7 * 0.05 / 3, atol=1 / 255)
    title = Image.open(paths["overlay.png"]).info["Title"]
    assert "p = 0.70" in title and "out-of-fold (fold 1)" in title and "did not train on it" in title
    done = json.loads((heatmap_dir(tmp_path, RUN, "s1") / "heatmap.json").read_text())
    assert done["scores"] == "out-of-fold (fold 1)" and done["probabilities"] == {"normal": 0.3, "tumour": 0.7}
    other = make_store(tmp_path, "outsider")  # not in the cohort: the ensemble's scores, no label
    heatmap_slide(other, RUN, tmp_path, HeatmapParams.from_sections(HeatmapConfig.from_config(_config())))
    assert json.loads((heatmap_dir(tmp_path, RUN, "outsider") / "heatmap.json").read_text())["scores"] == "ensemble"


def test_a_slide_flagged_out_of_distribution_says_so_on_its_overlay(tmp_path):
    store = make_store(tmp_path)
    attention, class_scores, attrs = store.scores(RUN)
    store.write_scores(RUN, attention, class_scores, dataclasses.replace(attrs, ood_score=2.31, ood=True))
    paths = heatmap_slide(store, RUN, tmp_path, HeatmapParams.from_sections(HeatmapConfig.from_config(_config())))
    title = Image.open(paths["overlay.png"]).info["Title"]
    assert "WARNING: this slide is unlike the slides this model was trained on (OOD score 2.31)" in title
    assert json.loads((heatmap_dir(tmp_path, RUN, "s1") / "heatmap.json").read_text())["ood_score"] == 2.31
    other = make_store(tmp_path, "alike")
    heatmap_slide(other, RUN, tmp_path, HeatmapParams.from_sections(HeatmapConfig.from_config(_config())))
    assert "WARNING" not in Image.open(heatmap_dir(tmp_path, RUN, "alike") / "overlay.png").info["Title"]


@pytest.mark.parametrize("n_tiles", [0, 1])
def test_slides_with_zero_or_one_tile_give_empty_valid_outputs_and_a_warning(tmp_path, n_tiles):
    store = make_store(tmp_path, coords=_coords()[:n_tiles])
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(_config()))
    with pytest.warns(UserWarning, match=f"{n_tiles} tile"):
        paths = heatmap_slide(store, RUN, tmp_path, params)
    assert json.loads(paths["tiles.geojson"].read_text()) == {"type": "FeatureCollection", "features": []}
    with openslide.OpenSlide(str(paths["heatmap.tif"])) as slide:
        assert slide.dimensions == (W // 32, H // 32)
        assert np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., 3].max() == 0
    assert np.asarray(Image.open(paths["heatmap.png"]))[..., 3].max() == 0
    assert Image.open(paths["overlay.png"]).size[0] > 0 and Image.open(paths["top_tiles.png"]).size[0] > 0


def test_a_bad_slide_is_recorded_and_the_others_carry_on(tmp_path):
    make_store(tmp_path, "good")
    make_store(tmp_path, "no_mask", mask=False)
    bad = make_store(tmp_path, "nan_scores")
    attention, class_scores, attrs = bad.scores(RUN)
    attention[3] = np.nan
    bad.write_scores(RUN, attention, class_scores, attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = heatmaps(tmp_path, HeatmapConfig.from_config(_config()), RUN,
                           slide_ids=["good", "no_mask", "nan_scores", "missing"], progress=False)
    assert summary.done == ["good"]
    assert list(summary.failed) == ["no_mask", "nan_scores", "missing"]
    failures = {r["slide_id"]: r for r in read_failures(tmp_path)}
    assert set(failures) == {"no_mask", "nan_scores", "missing"}
    assert all(r["stage"] == "heatmap" for r in failures.values())
    assert "mask" in failures["no_mask"]["cause"] and "no_mask.zarr" in failures["no_mask"]["cause"]
    assert "non-finite" in failures["nan_scores"]["cause"]
    assert "does not exist" in failures["missing"]["cause"]
    assert not (heatmap_dir(tmp_path, RUN, "nan_scores") / "heatmap.json").exists()


def test_unknown_tumour_class_names_the_classes(tmp_path):
    make_store(tmp_path)
    summary = heatmaps(tmp_path, HeatmapConfig.from_config(_config(tumour_class="carcinoma")), RUN, progress=False)
    assert list(summary.failed) == ["s1"]
    (row,) = read_failures(tmp_path)
    assert "carcinoma" in row["cause"] and "normal, tumour" in row["cause"]


def test_configuration_errors_are_refused_before_any_slide(tmp_path):
    make_store(tmp_path)
    with pytest.raises(ConfigError, match="attention weights have no absolute scale"):
        heatmaps(tmp_path, HeatmapConfig.from_config(_config(value="attention", normalize="raw")), RUN, progress=False)
    with pytest.raises(ConfigError, match="not a matplotlib colormap"):
        heatmaps(tmp_path, HeatmapConfig.from_config(_config(colormap="rainbowish")), RUN, progress=False)
    with pytest.raises(StoreError, match="no complete store has scores of model run 'other'"):
        heatmaps(tmp_path, HeatmapConfig.from_config(_config()), "other", progress=False)


def test_cli_paints_the_slides_named(tmp_path, capsys):
    make_store(tmp_path, "a")
    make_store(tmp_path, "b")
    code = cli_main(["heatmap", "--out", str(tmp_path), "--model-run", RUN, "--no-progress",
                     "--set", "heatmap.top_k=2", "b"])
    assert code == 0
    assert (heatmap_dir(tmp_path, RUN, "b") / "heatmap.tif").exists()
    assert not heatmap_dir(tmp_path, RUN, "a").exists()
    assert cli_main(["heatmap", "--out", str(tmp_path), "--model-run", "nope", "--no-progress"]) == 2
    assert "no complete store has scores of model run 'nope'" in capsys.readouterr().err
