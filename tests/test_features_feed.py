"""wsi.features.feed on CPU: blocks re-cut into two reused host buffers, and the overlapped batch loop gives the
features of a plain forward pass for any split of tiles into parts, blocks and batches."""

import numpy as np
import pytest
import torch
from factories import plain_forward, random_tiles

from wsi.features import load_encoder
from wsi.features.feed import HostRing, embed_blocks, padded_rows, staged_blocks


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
    """Two blocks of tiles and the range's features: what a task holds whatever its length, each buffer rounded
    up to a power of two as torch's page-locked allocator does (48 MiB of tiles take 64 MiB)."""
    assert HostRing.bytes_needed(256, 256, 1024, 1536) == 2 * (64 << 20) + (8 << 20)
    assert HostRing.bytes_needed(64, 64, 512, 128) == 2 * (1 << 20) + (256 << 10)  # powers of two stay
    ring = HostRing(pinned=False)
    out = ring.output(10, 4)
    assert out.dtype == torch.float32 and out.shape == (10, 4)
    assert ring.output(5, 4).data_ptr() == out.data_ptr()  # reused, not grown


def test_short_batches_are_padded_to_a_few_shapes_and_the_padding_dropped(tiny_vit):
    """cuDNN's autotuning tunes each new batch shape: a slide's ragged last batch is padded to the batch size or
    one of its halvings, so a worker sees at most four shapes; the padding rows never reach the features."""
    assert [padded_rows(n, 256) for n in (256, 129, 128, 65, 33, 32, 1)] == [256, 256, 128, 128, 64, 32, 32]
    assert [padded_rows(n, 5) for n in (5, 3, 2, 1)] == [5, 5, 2, 1]
    enc = load_encoder("test_vit", tiny_vit)
    shapes = []
    enc.model.register_forward_hook(lambda module, args, out: shapes.append(args[0].shape[0]))
    tiles = random_tiles(64 + 64 + 40 + 3, 32, seed=2)
    got = embed_blocks(enc, [(0, torch.from_numpy(tiles[:168])), (168, torch.from_numpy(tiles[168:]))],
                       len(tiles), 64)
    assert shapes == [64, 64, 64, 8]  # 40 rows in a batch of 64, 3 rows in one of 8 (64 / 8)
    np.testing.assert_allclose(got, plain_forward("test_vit", tiny_vit, tiles), rtol=1e-4, atol=1e-5)


def test_preparation_runs_outside_the_model_lock_and_autotuning_only_inside(tiny_vit):
    """Stain normalisation and resizing of one task overlap the other's forward pass; cudnn.benchmark is on for
    the passes and back to what it was after them (a MIL fold on the same worker must not inherit it)."""
    enc = load_encoder("test_vit", tiny_vit)

    class Lock:
        held = False

        def __enter__(self):
            Lock.held = True

        def __exit__(self, *exc):
            Lock.held = False

    seen = {"stain": [], "benchmark": []}

    def stain(x):
        seen["stain"].append(Lock.held)
        return x

    enc.model.register_forward_hook(lambda *_: seen["benchmark"].append(torch.backends.cudnn.benchmark))
    before = torch.backends.cudnn.benchmark
    embed_blocks(enc, [(0, torch.from_numpy(random_tiles(10, 32)))], 10, 4, lock=Lock(), stain=stain)
    assert seen["stain"] == [False, False, False]
    assert seen["benchmark"] == [True, True, True] and torch.backends.cudnn.benchmark == before


def test_embed_has_a_bounded_default_batch(tiny_vit):
    from wsi.features.encoders import CPU_BATCH_DEFAULT

    enc = load_encoder("test_vit", tiny_vit)
    sizes = []
    enc.model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    enc.embed(random_tiles(CPU_BATCH_DEFAULT + 1, 16))
    assert max(sizes) == CPU_BATCH_DEFAULT
