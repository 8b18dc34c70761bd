"""Augmented feature views (``extract.augment``): each tile's views are its own, whatever the batching; extraction
stores them beside the raw features; MIL training draws them, and refuses to start without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import extract_config, plain_forward, tissue_like, write_store
from PIL import Image

from wsi.errors import ConfigError
from wsi.failures import read_failures
from wsi.features import ExtractConfig, extract_cohort
from wsi.features.augment import augment_tiles, slide_seed
from wsi.keys import augmented_set
from wsi.mil.data import Bag, Cohort, require_views
from wsi.mil.training import BagViews
from wsi.store import FeatureAttrs, SlideStore, store_path

DATA = __import__("pathlib").Path(__file__).parent / "data"


def real_tiles(n: int = 6, size: int = 64) -> np.ndarray:
    """Tiles cut from the real TMA image (tests/data/tma_spots.jpeg), across tissue and glass."""
    image = np.asarray(Image.open(DATA / "tma_spots.jpeg").convert("RGB"))
    ys = np.linspace(0, image.shape[0] - size, n).astype(int)
    return np.stack([image[y:y + size, image.shape[1] // 2 - size // 2:][:, :size] for y in ys])


def test_a_tiles_view_is_its_own_whatever_the_batch_and_views_differ():
    tiles = real_tiles()
    whole = augment_tiles(tiles, seed=11, view=1, first_row=0)
    pieces = np.concatenate([augment_tiles(tiles[:2], 11, 1, 0), augment_tiles(tiles[2:], 11, 1, 2)])
    np.testing.assert_array_equal(whole, pieces)  # the same per tile, cut into any batches
    assert whole.shape == tiles.shape and whole.dtype == np.uint8
    other = augment_tiles(tiles, seed=11, view=2, first_row=0)
    again = augment_tiles(tiles, seed=12, view=1, first_row=0)
    for changed in (whole, other, again):
        assert np.abs(changed.astype(int) - tiles).mean() > 2  # a view is not the tile as it was
    assert np.abs(whole.astype(int) - other).mean() > 2  # nor another view of it
    # augmented, a tile is still the same tissue: its mean colour moves, its layout does not
    for a, b in zip(tiles, whole):
        if a.mean(axis=2).std() < 10:
            continue  # glass: no layout to keep
        assert np.corrcoef(a.mean(axis=2).ravel(), b.mean(axis=2).ravel())[0, 1] > 0.8


@pytest.mark.slow
def test_extraction_stores_the_views_beside_the_raw_features(dask_cluster, tiny_vit, tmp_path):
    tiles = {"a": tissue_like(20, 48, 1), "b": tissue_like(9, 48, 2)}
    for slide_id, t in tiles.items():
        write_store(tmp_path, slide_id, t, chunk_tiles=8)
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit, augment=2)),
                             progress=False)
    assert sorted(summary.done) == ["a", "b"] and summary.failed == {}
    for slide_id, t in tiles.items():
        store = SlideStore.open(store_path(tmp_path, slide_id))
        np.testing.assert_allclose(store.features("test_vit"), plain_forward("test_vit", tiny_vit, t),
                                   rtol=1e-4, atol=1e-5)  # the raw features are as without augmentation
        views = store.features(augmented_set("test_vit"))
        assert views.shape == (2, len(t), 64)
        for k in (1, 2):
            expected = plain_forward("test_vit", tiny_vit, augment_tiles(t, slide_seed(slide_id), k, 0))
            np.testing.assert_allclose(views[k - 1], expected, rtol=1e-4, atol=1e-5)
        assert store.feature_attrs(augmented_set("test_vit")).augment["views"] == 2
        assert store.feature_encoders() == ["test_vit"]  # the views are not a feature set to train on


def test_views_are_added_to_done_slides_and_other_strengths_are_refused(dask_cluster, tiny_vit, tmp_path):
    write_store(tmp_path, "a", tissue_like(10, 32, 4))
    write_store(tmp_path, "b", tissue_like(10, 32, 5))
    raw = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit)), progress=False)
    assert sorted(raw.done) == ["a", "b"]
    raw_chunk = store_path(tmp_path, "a") / "features" / "test_vit" / "c" / "0" / "0"
    stamp = raw_chunk.stat().st_mtime_ns
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit, augment=1)),
                             progress=False, slide_ids=["a"])
    assert summary.done == ["a"] and raw_chunk.stat().st_mtime_ns == stamp  # only the views were made
    assert SlideStore.open(store_path(tmp_path, "a")).features(augmented_set("test_vit")).shape == (1, 10, 64)
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit, augment=3)),
                             progress=False)
    assert list(summary.failed) == ["a"] and summary.done == ["b"]  # a's 1 view is never mixed with 3; b carries on
    (failure,) = read_failures(tmp_path)
    assert "made with 1 views" in failure["cause"] and "delete features/test_vit+augment" in failure["cause"]


def _bag(tmp_path, slide_id: str, views: int | None) -> Bag:
    raw = np.zeros((5, 4), np.float32)
    write_store(tmp_path, slide_id, tissue_like(5, 16, 1))

    attrs = FeatureAttrs(encoder="e", dim=4, weights_source="x", weights_sha256=None, input_size=(3, 16, 16),
                         interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1), precision="fp32")
    store = SlideStore.open(store_path(tmp_path, slide_id))
    store.create_features("e", 4, 8)[:] = raw
    store.complete_features("e", attrs)
    if views:
        store.create_features("e+augment", 4, 8, views=views)[:] = np.arange(1, views + 1, dtype=np.float32)[
            :, None, None] * np.ones((views, 5, 4), np.float32)
        store.complete_features("e+augment", FeatureAttrs.from_dict({**attrs.to_dict(), "augment": {"views": views}}))
    return Bag(slide_id, slide_id, "x", 0, str(store.path), 5)


@pytest.mark.parametrize("cache_gb", [1.0, 0.0])  # views in memory, or read from the store each time
def test_training_draws_the_raw_bag_and_each_view_alike(tmp_path, cache_gb):
    bag = _bag(tmp_path, "s", views=3)
    views = BagViews([bag], "e+augment", 3, 4, cache_gb, torch.device("cpu"))
    raw = torch.zeros(5, 4)
    rng = np.random.default_rng(0)
    drawn = [int(views.draw(bag, raw, rng)[0, 0]) for _ in range(400)]  # 0: raw, k: view k
    counts = np.bincount(drawn, minlength=4)
    assert counts.min() > 70, counts  # each of the 4 versions about a quarter of the epochs
    assert BagViews([bag], "e+augment", 0, 4, cache_gb, torch.device("cpu")).draw(bag, raw, rng) is raw


def test_training_without_the_views_it_asks_for_is_one_error(tmp_path):
    bags = (_bag(tmp_path, "with", views=2), _bag(tmp_path, "without", views=None))
    cohort = Cohort(tmp_path / "labels.csv", "e", ("x", "y"), 4, bags, (), ())
    with pytest.raises(ConfigError, match=r"labels.csv: extract.augment is 2, and 1 labelled slide\(s\) lack 2 "
                                          r"augmented views \(e\+augment\): without"):
        require_views(cohort, "e+augment", 2)
    require_views(cohort, "e+augment", 0)  # no views asked for: nothing to check
