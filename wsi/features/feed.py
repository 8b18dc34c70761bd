"""Feeding an encoder so that its GPU never waits (used by :mod:`.extract` and :meth:`.Encoder.embed`).

Tiles reach :func:`embed_blocks` as uint8 blocks in host memory, in order. On CUDA, with a :class:`HostRing`:

* the blocks sit in two page-locked buffers per task, reused block after block, and the features of the whole
  range come back in one copy into a third; so a task holds :meth:`HostRing.bytes_needed` of page-locked memory,
  and a worker at most that times the tasks it runs at once;
* each batch is copied to the GPU on a side stream while the model runs the batch before it (the copy of a batch
  waits for the pass two batches back, so at most three batches sit on the GPU);
* the features stay on the GPU until the range is done: nothing in the loop waits for the GPU, so the host runs
  ahead, queueing copies and passes, and the one wait is the copy back at the end;
* a batch is prepared (stain, resize, normalise: :meth:`.Encoder.prepare`) outside the lock that the tasks
  sharing a model take turns under, so one task's preparation overlaps another's forward pass;
* a short batch (a slide's last) is padded with zero tiles to one of a few sizes (:func:`padded_rows`) and the
  padding rows dropped: with cuDNN's autotuning on (``cudnn.benchmark``, set for the passes only,
  :func:`wsi.cluster.cudnn_benchmark`) each new batch shape is tuned anew, so ragged last batches would re-tune
  for every slide.

On CPU the same loop runs with plain memory, no streams and no copies, and gives the features of a plain forward
pass.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..cluster import cudnn_benchmark

PAD_BUCKETS = 4  # batch shapes per batch size: the full batch and its half, quarter and eighth


def pinned_bytes(nbytes: int) -> int:
    """What torch's page-locked allocator takes for ``nbytes``: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


def padded_rows(n: int, batch_size: int) -> int:
    """The rows a batch of ``n`` tiles is padded to: the smallest of ``batch_size`` and its halvings (at most
    :data:`PAD_BUCKETS` sizes) that holds ``n``, so a model sees a few batch shapes whatever the slides' lengths."""
    rows = batch_size
    for _ in range(PAD_BUCKETS - 1):
        if rows // 2 < n:
            break
        rows //= 2
    return rows


class HostRing:
    """Host buffers of one task: two for tile blocks, used in turn, and one for the task's features; page-locked
    when ``pinned``. A tile buffer is refilled only once the copy out of it (:meth:`copied`) has finished."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._blocks: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._out: torch.Tensor | None = None

    @staticmethod
    def bytes_needed(block_tiles: int, tile_px: int, n_rows: int, dim: int) -> int:
        """Page-locked bytes a ring holds for blocks of ``block_tiles`` tiles of ``tile_px`` and ``n_rows``
        features: torch's page-locked allocator rounds each buffer up to a power of two."""
        return 2 * pinned_bytes(block_tiles * tile_px * tile_px * 3) + pinned_bytes(n_rows * dim * 4)

    def _buffer(self, old: torch.Tensor | None, nbytes: int) -> torch.Tensor:
        if old is not None and old.numel() >= nbytes:
            return old
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 host tensor of ``shape`` for the next block."""
        i, self._turn = self._turn, 1 - self._turn
        if self._copied[i] is not None:
            self._copied[i].synchronize()  # long done by now, unless the GPU is two blocks behind
            self._copied[i] = None
        nbytes = math.prod(shape)
        self._blocks[i] = self._buffer(self._blocks[i], nbytes)
        return self._blocks[i][:nbytes].view(shape)

    def copied(self, block: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """``event`` marks the end of the last copy out of ``block`` (None: nothing to wait for)."""
        for i, buf in enumerate(self._blocks):
            if buf is not None and buf.data_ptr() == block.data_ptr():
                self._copied[i] = event

    def output(self, n_rows: int, dim: int) -> torch.Tensor:
        """The float32 host tensor (n_rows, dim) the task's features are copied back into."""
        self._out = self._buffer(self._out, n_rows * dim * 4)
        return self._out[:n_rows * dim * 4].view(torch.float32).view(n_rows, dim)


def staged_blocks(parts: Iterable[np.ndarray], n_tiles: int, block_tiles: int,
                  ring: HostRing) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, uint8 host tensor)`` blocks of ``block_tiles`` tiles (the last may be shorter) in the
    ring's buffers, re-cut from ``parts``: ordered uint8 arrays of any lengths, ``n_tiles`` tiles in all."""
    block, filled, start = None, 0, 0
    for part in parts:
        i = 0
        while i < len(part):
            if block is None:
                block, filled = ring.take((min(block_tiles, n_tiles - start), *part.shape[1:])), 0
            k = min(len(block) - filled, len(part) - i)
            block.numpy()[filled:filled + k] = part[i:i + k]
            filled, i = filled + k, i + k
            if filled == len(block):
                yield start, block
                start, block = start + filled, None
    if start != n_tiles or block is not None:
        raise ValueError(f"the tile reader gave {start + filled} tiles, {n_tiles} expected")


def _batches(blocks, batch_size: int):
    """``(first row, host batch, its block if this is the block's last batch else None)``."""
    for start, block in blocks:
        for i in range(0, len(block), batch_size):
            last = i + batch_size >= len(block)
            yield start + i, block[i:i + batch_size], block if last else None


def embed_blocks(encoder, blocks: Iterable[tuple[int, torch.Tensor]], n_rows: int, batch_size: int, *,
                 lock: threading.Lock | None = None, ring: HostRing | None = None, stain=None) -> np.ndarray:
    """float32 (n_rows, D) features of ``blocks`` (``(first row, uint8 host tiles)``, in order, covering
    ``n_rows`` tiles), ``batch_size`` tiles per forward pass of ``encoder`` (an :class:`.Encoder`).

    ``lock`` is held around each forward pass (tasks sharing a model take turns), not around the batch's
    preparation; ``ring``, when the blocks live in its buffers, gets each block back once copied and holds the
    features' host copy (without one, the features come back through pageable memory); ``stain`` normalises each
    batch on the device (:meth:`.Encoder.prepare`).
    """
    device = encoder.device
    cuda = device.type == "cuda"
    lock = lock or contextlib.nullcontext()
    copy_stream = torch.cuda.Stream(device) if cuda else None
    last_done: torch.cuda.Event | None = None

    def upload(batch: torch.Tensor):
        if not cuda:
            return batch, None
        if last_done is not None:  # bounds the batches on the GPU: the copy waits for the pass two back
            copy_stream.wait_event(last_done)
        with torch.cuda.stream(copy_stream):
            x = batch.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(copy_stream)
        return x, event

    def run(start: int, x: torch.Tensor, copied: torch.cuda.Event | None) -> None:
        nonlocal last_done
        if copied is not None:  # the batch's use waits for its copy, and the batch stays till it is done
            torch.cuda.current_stream(device).wait_event(copied)
            x.record_stream(torch.cuda.current_stream(device))
        prepared = encoder.prepare(x, stain, rows=padded_rows(len(x), batch_size))
        with lock, cudnn_benchmark(True):
            out[start:start + len(x)] = encoder.forward(prepared)[:len(x)]
            if cuda:
                last_done = torch.cuda.Event()
                last_done.record()

    with torch.inference_mode():
        out = torch.empty((n_rows, encoder.dim), dtype=torch.float32, device=device)
        pending = None
        for start, batch, finished in _batches(blocks, batch_size):
            x, copied = upload(batch)  # the next batch's copy is queued before the pass of the one before it
            if finished is not None and ring is not None:
                ring.copied(finished, copied)
            if pending is not None:
                run(*pending)
            pending = (start, x, copied)
        if pending is not None:
            run(*pending)
        if not cuda:
            return out.numpy()
        if ring is None:
            return out.cpu().numpy()
        host = ring.output(n_rows, encoder.dim)
        host.copy_(out, non_blocking=True)
        back = torch.cuda.Event()
        back.record()
        back.synchronize()  # the one wait for the GPU
        return host.numpy()
