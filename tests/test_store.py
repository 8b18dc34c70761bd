"""The store contract: attrs round-trips, completion, atomic replacement, features and scores groups."""

import dataclasses
import doctest

import numpy as np
import pytest

import wsi.keys
import wsi.store
from wsi.errors import StoreError
from wsi.keys import encoder_key
from wsi.store import (
    FeatureAttrs,
    ScoreAttrs,
    SlideAttrs,
    SlideStore,
    TileStoreWriter,
    TilingAttrs,
    export_h5,
    is_complete,
    open_cohort,
)

SLIDE = SlideAttrs(source_path="/data/a.svs", source_size=10, source_mtime=1.5, backend="openslide",
                   vendor="aperio", width=2048, height=1024, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                   objective_power=40.0, level_count=2, level_downsamples=(1.0, 4.0))
TILING = TilingAttrs(target_mpp=0.5, tile_px=16, overlap_px=0, read_level=0, read_downsample=1.0,
                     tile_px_level0=32.0, stride_px_level0=32.0, effective_mpp=0.5, min_tissue_fraction=0.25,
                     store_pixels=True, codec="lossless", quality=90, chunk_tiles=4, tissue={"mask_mpp": 8.0},
                     wsi_version="0.1.0")
FEATURES = FeatureAttrs(encoder="hf-hub:org/enc", dim=3, weights_source="file:/w.safetensors",
                        weights_sha256="ab", input_size=(3, 224, 224), interpolation="bicubic",
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), precision="fp32", wsi_version="0.1.0")


def test_docstring_examples_run():
    assert doctest.testmod(wsi.store).failed == 0
    assert doctest.testmod(wsi.keys).failed == 0


@pytest.mark.parametrize("attrs", [SLIDE, TILING, FEATURES,
                                   ScoreAttrs(run="r", model="abmil", encoder="e", classes=("a", "b"),
                                              probabilities=(0.2, 0.8), predicted="b")])
def test_attrs_round_trip_and_reject_unknown_keys(attrs):
    assert type(attrs).from_dict(attrs.to_dict()) == attrs
    with pytest.raises(ValueError, match="unknown keys"):
        type(attrs).from_dict({**attrs.to_dict(), "surprise": 1})


def test_attrs_validate_values():
    with pytest.raises(ValueError, match="mpp_source"):
        SlideAttrs.from_dict({**SLIDE.to_dict(), "mpp_source": "guess"})
    with pytest.raises(ValueError, match="codec"):
        TilingAttrs.from_dict({**TILING.to_dict(), "codec": "png"})


def make_store(tmp_path, n=10, name="a"):
    w = TileStoreWriter.create(tmp_path / f"{name}.zarr", name, SLIDE, TILING,
                               coords=np.stack([np.arange(n) * 32, np.zeros(n)], 1), tissue_fraction=np.ones(n))
    tiles = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    for lo in range(0, n, 4):
        w.write_tiles(lo, tiles[lo:lo + 4])
    w.write_mask(np.ones((8, 16), bool), np.zeros((8, 16, 3), np.uint8), downsample=128.0, mpp=32.0)
    return w, tiles


@pytest.mark.parametrize("codec", ["lossless", "jpeg"])
def test_tile_chunks_are_the_bytes_zarr_itself_writes(tmp_path, codec):
    """The writer encodes each chunk itself and writes the chunk's file (Zarr's write path is slow): the files,
    a short last chunk included, must be byte for byte what Zarr writes, so any Zarr reads the store."""
    tiling = dataclasses.replace(TILING, codec=codec, tile_px=64)
    n = 10
    rng = np.random.default_rng(1)
    blobs = np.kron(rng.normal(180, 30, (n, 8, 8, 3)), np.ones((1, 8, 8, 1)))  # smooth enough for JPEG
    tiles = (blobs + rng.normal(0, 3, blobs.shape)).clip(0, 255).astype(np.uint8)
    coords = np.stack([np.arange(n) * 128, np.zeros(n)], 1)
    w = TileStoreWriter.create(tmp_path / "a.zarr", "a", SLIDE, tiling, coords=coords, tissue_fraction=np.ones(n))
    w.write_tiles(0, tiles[:4])
    w.write_tiles(4, tiles[4:])  # a whole chunk and the short last one at once
    for lo, count in ((2, 4), (0, 3), (8, 3)):  # not at a chunk's start, a part chunk, past the end
        with pytest.raises(ValueError, match="whole chunks"):
            w.write_tiles(lo, tiles[:count])
    w.write_mask(np.ones((8, 16), bool), np.zeros((8, 16, 3), np.uint8), downsample=128.0, mpp=32.0)
    store = w.commit()
    by_zarr = TileStoreWriter.create(tmp_path / "b.zarr", "b", SLIDE, tiling, coords=coords,
                                     tissue_fraction=np.ones(n))
    by_zarr.group["tiles"][:] = tiles  # Zarr's own write path
    for key in ("c/0/0/0/0", "c/1/0/0/0", "c/2/0/0/0"):
        assert (tmp_path / "a.zarr/tiles" / key).read_bytes() == (by_zarr.tmp / "tiles" / key).read_bytes(), key
    read = store.read_tiles(0, n)
    if codec == "lossless":
        np.testing.assert_array_equal(read, tiles)
    else:
        assert np.abs(read.astype(int) - tiles).mean() < 6


def test_store_is_absent_until_committed_and_replaced_whole(tmp_path):
    w, tiles = make_store(tmp_path)
    assert not is_complete(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        SlideStore.open(tmp_path / "a.zarr")
    store = w.commit()
    np.testing.assert_array_equal(store.read_tiles(0, 10), tiles)
    assert store.slide == SLIDE and store.tiling == TILING
    w2, tiles2 = make_store(tmp_path, n=6)
    w2.commit()
    assert SlideStore.open(tmp_path / "a.zarr").n_tiles == 6
    assert [p.name for p in tmp_path.iterdir()] == ["a.zarr"]


def test_incomplete_store_is_refused(tmp_path):
    w, _ = make_store(tmp_path)
    store = w.commit()
    store.group.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        SlideStore.open(tmp_path / "a.zarr")
    assert open_cohort(tmp_path.parent / "nowhere") == []


def test_features_complete_only_when_every_row_is_finite(tmp_path):
    store = make_store(tmp_path)[0].commit()
    arr = store.create_features("hf-hub:org/enc", 3, chunk_tiles=4)
    arr[0:4] = np.ones((4, 3))
    with pytest.raises(StoreError, match="6 unwritten or non-finite rows"):
        store.complete_features("hf-hub:org/enc", FEATURES)
    assert not store.has_features("hf-hub:org/enc")
    arr[4:10] = np.full((6, 3), 2.0)
    store.complete_features("hf-hub:org/enc", FEATURES)
    assert store.has_features("hf-hub:org/enc") and store.feature_encoders() == ["hf-hub:org/enc"]
    assert store.feature_attrs("hf-hub:org/enc") == FEATURES
    assert (tmp_path / "a.zarr" / "features" / encoder_key("hf-hub:org/enc")).is_dir()
    with pytest.raises(StoreError, match="already complete"):
        store.create_features("hf-hub:org/enc", 3, chunk_tiles=4)


def test_h5_export_has_the_clam_trident_layout(tmp_path):
    import h5py

    store = make_store(tmp_path)[0].commit()
    store.create_features("enc", 3, 4)[:] = np.arange(30, dtype=np.float32).reshape(10, 3)
    store.complete_features("enc", FEATURES)
    path = export_h5(store, "enc", tmp_path / "h5" / "a.h5")
    with h5py.File(path) as f:
        assert f["features"].shape == (10, 3) and f["coords"].shape == (10, 2)
        np.testing.assert_array_equal(f["coords"][:], store.coords)
        assert f["coords"].attrs["patch_size"] == 32 and f["coords"].attrs["patch_level"] == 0
        assert f["coords"].attrs["patch_size_level0"] == 32
    assert [p.name for p in path.parent.iterdir()] == ["a.h5"]


def test_scores_replace_and_complete(tmp_path):
    store = make_store(tmp_path)[0].commit()
    attrs = ScoreAttrs(run="r1", model="abmil", encoder="enc", classes=("normal", "tumour"),
                       probabilities=(0.1, 0.9), predicted="tumour")
    store.write_scores("r1", np.full(10, 0.1), np.tile([0.3, 0.7], (10, 1)), attrs)
    attention, class_scores, got = store.scores("r1")
    assert attention.shape == (10,) and class_scores.shape == (10, 2) and got == attrs
    with pytest.raises(StoreError, match="no complete scores"):
        store.scores("r2")


def test_fine_grid_features_and_scores_round_trip_and_a_new_overlap_replaces_the_grid(tmp_path):
    store = make_store(tmp_path)[0].commit()
    assert not store.has_fine_features("hf-hub:org/enc")
    with pytest.raises(StoreError, match="wsi extract --high-res a"):
        store.fine_features("hf-hub:org/enc")
    coords = np.array([[0, 0], [8, 0], [16, 0]])
    store.write_fine_features("hf-hub:org/enc", coords, 0.5, np.ones((3, 3)), FEATURES)
    features, attrs = store.fine_features("hf-hub:org/enc")
    assert features.shape == (3, 3) and attrs == FEATURES and store.fine_coords().tolist() == coords.tolist()
    assert (tmp_path / "a.zarr" / "fine" / "features" / encoder_key("hf-hub:org/enc")).is_dir()

    attrs = ScoreAttrs(run="r1", model="abmil", encoder="enc", classes=("normal", "tumour"),
                       probabilities=(0.1, 0.9), predicted="tumour", fine_probabilities=(0.2, 0.8),
                       fine_predicted="tumour")
    store.write_scores("r0", np.full(10, 0.1), np.tile([0.3, 0.7], (10, 1)), attrs)
    with pytest.raises(StoreError, match="no fine-grid scores"):
        store.scores("r0", fine=True)
    store.write_scores("r1", np.full(10, 0.1), np.tile([0.3, 0.7], (10, 1)), attrs,
                       fine=(np.full(3, 1 / 3), np.tile([0.2, 0.8], (3, 1))))
    attention, class_scores, got = store.scores("r1", fine=True)
    assert attention.shape == (3,) and class_scores.shape == (3, 2) and got == attrs
    assert ScoreAttrs.from_dict(attrs.to_dict()) == attrs

    store.write_fine_features("other", coords[:2], 0.75, np.ones((2, 3)), FEATURES)  # another grid: replaced
    assert store.fine_coords().shape == (2, 2) and not store.has_fine_features("hf-hub:org/enc")
