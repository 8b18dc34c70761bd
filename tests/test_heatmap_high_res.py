"""Heatmaps from a real slide file: high-res heatmaps of a half-tile grid, and top tiles read from the slide.

The chain is real: a synthetic pyramidal slide (wsi_synth) tiled by wsi.tiling, features from a tiny timm ViT
loaded from a local file (wsi.features), an ABMIL fold with seeded random weights in a run folder, scored by
wsi.mil.predict. The stages meet only in the store: the fine grid's features come from
``wsi.features.fine_grid``, their scores from predict, and the heatmap paints what the store holds. The model
knows nothing, so the tests check geometry and bookkeeping, and that the high-res scores are exactly what the
run's ensemble gives the fine tiles.
"""

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from wsi.config import load_config
from wsi.failures import read_failures
from wsi.features import load_encoder
from wsi.features.fine_grid import FineGridConfig, extract_fine_grids
from wsi.heatmap import OUTPUTS, HeatmapConfig, HeatmapParams, heatmap_dir, heatmap_slide, heatmaps
from wsi.mil import PredictConfig, load_ensemble, predict
from wsi.mil.models import create_model, model_config
from wsi.mil.training import RUN_SCHEMA_VERSION
from wsi.slide import TileSource, open_slide
from wsi.store import SlideStore, store_path
from wsi.tiling import TileConfig, tile_slide
from wsi_synth import write_synthetic_slide

RUN = "toy"
TILE = 128  # level-0 px (0.5 um/px slide, tiles at 0.5 um/px)


def _tiny_vit(path, seed):
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _config(checkpoint, **tiling):
    return load_config(overrides={
        "tiling": {"tile_px": TILE, "target_mpp": 0.5, "chunk_tiles": 16, **tiling},
        "extract": {"encoder": "test_vit", "checkpoint": str(checkpoint), "batch_size": 64},
        "heatmap": {"smooth_sigma": 0.0, "top_k": 4}})


def _extract(store, encoder, config):
    """Features of the store's tiles (from the store, or from the slide when it holds coordinates only)."""
    if store.has_pixels:
        tiles = store.read_tiles(0, store.n_tiles)
    else:
        with open_slide(store.slide.source_path, **config["slide"]) as slide:
            tiles = TileSource(slide, store.tiling).read_tiles(store.coords)
    features = store.create_features("test_vit", encoder.dim, chunk_tiles=16)
    features[:] = encoder.embed(tiles, 64)
    store.complete_features("test_vit", encoder.attrs)


def _write_run(run_dir, encoder, config):
    """A one-fold ABMIL run folder as `wsi train` writes it, with seeded random weights."""
    run_dir.mkdir(parents=True)
    model = model_config("abmil", encoder.dim, 2, config["mil"])
    torch.manual_seed(0)
    weights = create_model(**model).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(run_dir / "fold_0.safetensors"))
    (run_dir / "run.json").write_text(json.dumps({
        "schema_version": RUN_SCHEMA_VERSION, "complete": True, "run": RUN, "model": model,
        "encoder": "test_vit", "feature_attrs": encoder.attrs.to_dict(), "classes": ["normal", "tumour"],
        "folds": [{"fold": 0, "weights": "fold_0.safetensors"}]}))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two outputs of one slide: ``pixels`` (tiles stored) and ``coords`` (coordinates only), both scored."""
    root = tmp_path_factory.mktemp("high_res")
    slide_path = write_synthetic_slide(root / "slides" / "hr.svs", width=1024, height=768, mpp=0.5,
                                       downsamples=(1, 4), seed=3, tumour_boxes=[(384, 256, 768, 512)]).path
    checkpoint = _tiny_vit(root / "test_vit.safetensors", seed=0)
    encoder = load_encoder("test_vit", checkpoint)
    outs = {}
    for name, store_pixels in (("pixels", True), ("coords", False)):
        out = root / name
        config = _config(checkpoint, store_pixels=store_pixels)
        store = tile_slide(out, TileConfig.from_config(config), slide_path)
        _extract(store, encoder, config)
        _write_run(out / "models" / RUN, encoder, config)
        assert predict(out, PredictConfig.from_config(config), out / "models" / RUN).done == ["hr"]
        outs[name] = (out, config)
    return outs, slide_path, checkpoint


@pytest.fixture(scope="module")
def painted(scored):
    """The standard and the high-res heatmaps of the stored-pixels output (its fine grid extracted, then scored
    by predict with the rest); the standard scores before and after."""
    outs, _, _ = scored
    out, config = outs["pixels"]
    before = SlideStore.open(store_path(out, "hr")).scores(RUN)
    standard = heatmaps(out, HeatmapConfig.from_config(config), RUN, progress=False)
    assert extract_fine_grids(out, FineGridConfig.from_config(config), ["hr"]).done == ["hr"]
    assert predict(out, PredictConfig.from_config(config), out / "models" / RUN).done == ["hr"]
    fine = heatmaps(out, HeatmapConfig.from_config(config), RUN, high_res=True, progress=False)
    return standard, fine, before, SlideStore.open(store_path(out, "hr")).scores(RUN)


def _tile_features(doc):
    return [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]


def _blocks_constant(rgba: np.ndarray, block: int) -> bool:
    """Whether every fully opaque block x block square (aligned to the grid) holds one colour."""
    h, w = (s - s % block for s in rgba.shape[:2])
    squares = rgba[:h, :w].reshape(h // block, block, w // block, block, 4).swapaxes(1, 2)
    opaque = (squares[..., 3] == 255).all(axis=(2, 3))
    same = (squares == squares[:, :, :1, :1]).all(axis=(2, 3, 4))
    return bool(same[opaque].all())


def test_high_res_paints_the_stored_half_tile_grid_and_the_standard_scores_stay(scored, painted):
    outs, slide_path, checkpoint = scored
    out, _ = outs["pixels"]
    _, summary, before, after = painted
    assert summary.done == ["hr"] and summary.failed == {}
    folder = heatmap_dir(out, RUN, "hr") / "high_res"
    assert all((folder / name).exists() for name in OUTPUTS)

    store = SlideStore.open(store_path(out, "hr"))
    tiles = _tile_features(json.loads((folder / "tiles.geojson").read_text()))
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in tiles])
    assert (corners % (TILE // 2) == 0).all()                                # a half-tile stride
    assert {tuple(c) for c in store.coords} <= {tuple(c) for c in corners}   # containing the tiler's grid
    assert len(corners) > 2.5 * store.n_tiles
    assert all(f["geometry"]["coordinates"][0][2] == [x + TILE, y + TILE] for f, (x, y) in zip(tiles, corners))

    np.testing.assert_array_equal(store.fine_coords(), corners)
    # exactly the run's ensemble on the fine tiles, read from the slide
    ensemble = load_ensemble(out / "models" / RUN, device="cpu")
    with open_slide(slide_path) as slide:
        pixels = TileSource(slide, store.tiling).read_tiles(corners)
    attention = ensemble.score_bag(load_encoder("test_vit", checkpoint).embed(pixels, 64))[0]
    painted_attention = np.array([f["properties"]["measurements"]["attention"] for f in tiles])
    np.testing.assert_allclose(painted_attention, attention, rtol=1e-4, atol=1e-9)

    assert (after[0] == before[0]).all() and (after[1] == before[1]).all()  # the slide's own scores stay
    assert dataclasses.replace(after[2], fine_probabilities=None, fine_predicted=None) == before[2]
    assert after[2].fine_predicted in ("normal", "tumour") and after[2].fine_folds is None  # not of the cohort


def test_high_res_map_has_detail_finer_than_a_tile(scored, painted):
    outs, _, _ = scored
    out, _ = outs["pixels"]
    standard = np.asarray(Image.open(heatmap_dir(out, RUN, "hr") / "heatmap.png"))
    fine = np.asarray(Image.open(heatmap_dir(out, RUN, "hr") / "high_res" / "heatmap.png"))
    per_tile = int(TILE / SlideStore.open(store_path(out, "hr")).mask()[2])  # thumbnail pixels per tile
    assert standard.shape == fine.shape
    assert _blocks_constant(standard, per_tile)        # one value per tile
    assert not _blocks_constant(fine, per_tile)        # overlapping half-tile scores vary inside a tile


def test_coordinates_only_store_shows_the_same_top_tiles_read_from_the_slide(scored):
    outs, _, _ = scored
    grids = []
    for name in ("pixels", "coords"):
        out, config = outs[name]
        store = SlideStore.open(store_path(out, "hr"))
        assert store.has_pixels == (name == "pixels")
        paths = heatmap_slide(store, RUN, out, HeatmapParams.from_sections(HeatmapConfig.from_config(config)))
        grids.append(np.asarray(Image.open(paths["top_tiles.png"])))
    assert grids[0].shape == grids[1].shape and (grids[0] == grids[1]).all()


def test_a_fine_grid_refuses_encoder_weights_the_features_were_not_extracted_with(scored, painted, tmp_path):
    outs, _, _ = scored
    out, config = outs["pixels"]
    other = _tiny_vit(tmp_path / "other.safetensors", seed=1)
    config = load_config(overrides={**config, "extract": {**config["extract"], "checkpoint": str(other)}})
    summary = extract_fine_grids(out, FineGridConfig.from_config(config), ["hr"])
    assert summary.failed.keys() == {"hr"}
    (row,) = [r for r in read_failures(out) if r["stage"] == "extract"]
    assert "other.safetensors" in row["cause"] and "extracted with" in row["cause"]


def test_high_res_without_a_fine_grid_names_the_commands_that_make_one(scored):
    outs, _, _ = scored
    out, config = outs["coords"]
    assert heatmaps(out, HeatmapConfig.from_config(config), RUN, high_res=True, progress=False).failed.keys() == {"hr"}
    (row,) = [r for r in read_failures(out) if r["stage"] == "heatmap"]
    assert "wsi extract --high-res hr" in row["cause"]
