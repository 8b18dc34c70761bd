"""wsi.features.feed on CPU: blocks re-cut into two reused host buffers, and the overlapped batch loop gives the
features of a plain forward pass for any split of tiles into parts, blocks and batches."""

import numpy as np
import pytest
import torch

from test_features_encoders import plain_forward, random_tiles, save_tiny
from wsi.features import load_encoder
from wsi.features.feed import HostRing, embed_blocks, staged_blocks


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors")


def _parts(tiles: np.ndarray, sizes: list[int]):
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == len(tiles)
    return [tiles[a:b] for a, b in zip(edges[:-1], edges[1:])]


def test_ragged_parts_are_recut_into_blocks_in_two_buffers_used_in_turn():
    tiles = random_tiles(23, 4)
    ring = HostRing(pinned=False)
    seen, buffers = [], set()
    for start, block in staged_blocks(_parts(tiles, [3, 9, 1, 10]), len(tiles), 8, ring):
        np.testing.assert_array_equal(block.numpy(), tiles[start:start + len(block)])  # before the next refill
        seen.append((start, len(block)))
        buffers.add(block.data_ptr())
    assert seen == [(0, 8), (8, 8), (16, 7)]
    assert len(buffers) == 2  # the third block reuses the first block's buffer


def test_a_reader_short_of_tiles_is_an_error():
    tiles = random_tiles(10, 4)
    with pytest.raises(ValueError, match="the tile reader gave 10 tiles, 12 expected"):
        list(staged_blocks([tiles], 12, 8, HostRing(pinned=False)))


@pytest.mark.parametrize("sizes,block,batch", [([37], 37, 37), ([5, 20, 12], 8, 3), ([1] * 37, 16, 5)])
def test_overlapped_loop_equals_a_plain_forward_pass(tiny_vit, sizes, block, batch):
    enc = load_encoder("test_vit", tiny_vit)
    tiles = random_tiles(37, 48, seed=1)
    ring = HostRing(pinned=False)
    blocks = staged_blocks(_parts(tiles, sizes), len(tiles), block, ring)
    got = embed_blocks(enc, blocks, len(tiles), batch, ring=ring)
    assert got.dtype == np.float32 and got.shape == (37, enc.dim)
    np.testing.assert_allclose(got, plain_forward("test_vit", tiny_vit, tiles), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.embed(tiles, batch_size=batch), got, rtol=1e-5, atol=1e-6)


def test_the_ring_bounds_what_a_task_holds():
    """Two blocks of tiles and the range's features: what a task holds whatever its length."""
    assert HostRing.bytes_needed(256, 256, 1024, 1536) == 2 * 256 * 256 * 256 * 3 + 1024 * 1536 * 4
    ring = HostRing(pinned=False)
    out = ring.output(10, 4)
    assert out.dtype == torch.float32 and out.shape == (10, 4)
    assert ring.output(5, 4).data_ptr() == out.data_ptr()  # reused, not grown
