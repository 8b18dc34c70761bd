"""Feature extraction over a cohort of stores, as a Dask graph.

Per slide, in this order (outcomes recorded by the stage runner, :class:`wsi.runner.StageRun`): skip it when it
failed an earlier stage, or when its ``features/<encoder>`` are complete; open the store (an incomplete or
unreadable one is a failure); create the feature array, chunked like the tiles; one task per range of
``extract.tiles_per_task`` tiles (a multiple of ``tiling.chunk_tiles``, so no two tasks write one chunk); a
final task that checks every row is written and finite, marks the array complete and writes the h5 export.
A task that fails, or whose worker dies more often than the scheduler allows, fails its slide only: the
slide gets a ``failures.csv`` row, its array stays incomplete (the next run redoes it), the others go on.
A worker that dies mid-task has its task re-run on another worker; ranges are rewritten whole, so a retry
leaves no holes. Each slide done gets a line on stdout as it ends (tiles, seconds its tasks took on the workers).

Workers
-------
The encoder is loaded once per worker by :class:`EncoderPlugin` (also on workers that join later, e.g. SLURM jobs),
on the device the worker's ``GPU`` resource names (on a cluster with GPU workers, only on those); a worker that
advertises a GPU CUDA cannot use fails the run with one error. GPU workers advertise ``GPU=1`` and each range task
asks for ``1 / extract.tasks_per_gpu`` of it: two tasks (by default) share a GPU, so one's store opening, first
reads, checks and Zarr writes overlap the other's forward passes, which take turns under the plugin's lock. Inside a
task, ``extract.decode_threads`` threads read and decode the next blocks (zarr chunks, or for coordinates-only
stores the slide's own JPEG tiles, as tiling reads them) while the model runs; :mod:`.feed` stages them in
page-locked memory, copies each batch to the GPU on a side stream while the previous one runs, normalises stain,
resizes and normalises on the GPU outside the model lock, runs the model in bf16 (fp16 under autocast below compute
capability 8) in channels_last on batches padded to a few fixed sizes, and copies the range's features back once. A
task's page-locked memory is bounded (:meth:`.HostRing.bytes_needed`), and the tasks of a worker together stay
within ``extract.pinned_mb``, which must fit in a quarter of the worker's memory limit. On CPU workers torch uses
the worker's threads, ``batch_size`` tiles a pass, and the forward passes of concurrent tasks take turns.

Stain normalisation (``extract.stain``, :mod:`.stain`): the reference is fitted once, before the cluster starts
(a reference without tissue stops the run with one error naming it); per slide, a first task fits the slide's own
stain, and its range tasks normalise each batch on the device before the encoder. The features go to
``features/<encoder>+<method>`` with the fit in their attrs; complete ones fitted to another reference fail
their slide instead of being mixed with the new ones.

Augmentation (``extract.augment: K``, :mod:`.augment`): K more range tasks per range, each embedding the tiles'
k-th augmented view into ``features/<set>+augment`` (K, N, D); the slide's completing task marks both arrays. A
slide whose raw features are complete gets only its views; complete views made with another K or other strengths
fail their slide (delete them to redo).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from distributed import WorkerPlugin, as_completed, get_worker

from ..cluster import dask_client, gpu_resources, worker_device
from ..config import StageConfig
from ..errors import ConfigError, SlideError, StoreError, WsiError
from ..keys import augmented_set, encoder_key, feature_set
from ..layout import Layout
from ..runner import StageRun, StageSummary
from ..slide import TileSource, source_stat
from ..store import FeatureAttrs, SlideStore, export_h5, store_path
from . import augment
from .encoders import GPU_BATCH_DEFAULT, Encoder, load_encoder, resolve_spec
from .feed import HostRing, embed_blocks, staged_blocks
from .stain import StainTransform, check_stain, fit_reference, fit_slide

STAGE = "extract"


@dataclass(frozen=True)
class ExtractConfig(StageConfig):
    """The sections the extract stage reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = STAGE
    slide: dict
    extract: dict
    cluster: dict


def h5_path(out_dir, encoder: str, slide_id: str) -> Path:
    """``OUT/features/<encoder key>/<slide_id>.h5``, the CLAM/TRIDENT-style export (``encoder``: the feature
    set, :func:`wsi.store.feature_set`)."""
    return Layout(out_dir).features_h5(encoder_key(encoder), slide_id)


# ------------------------------------------------------------------------------------------ on the workers
class EncoderPlugin(WorkerPlugin):
    """Loads the encoder once per worker process, on the device its ``GPU`` resource says
    (:func:`wsi.cluster.worker_device`), and holds what the worker's tasks share: the model lock, the batch
    size and decode threads for that device, and the page-locked memory budget. With ``gpu_only`` (the run's
    tasks ask for a GPU) a worker without one loads nothing: no task of the run will come to it, and a ViT-g
    takes some 4.5 GB of its memory."""

    def __init__(self, encoder: str, checkpoint: str | None, precision: str, settings: dict, gpu_only: bool):
        self.spec = (encoder, checkpoint, precision, settings, gpu_only)
        self.encoder: Encoder | None = None
        self.lock = threading.Lock()
        self.batch_size, self.decode_threads, self.pinned_budget = 0, 1, 0  # set by setup for its device

    def setup(self, worker):
        encoder, checkpoint, precision, settings, gpu_only = self.spec
        device = worker_device(worker)
        if gpu_only and device == "cpu":
            return
        if device == "cpu":
            torch.set_num_threads(max(1, worker.state.nthreads))
        self.batch_size, self.decode_threads, self.pinned_budget = device_settings(
            device, settings, worker.state.nthreads, worker.memory_manager.memory_limit, worker.address)
        self.encoder = load_encoder(encoder, checkpoint, device=device, precision=precision)

    def teardown(self, worker):
        self.encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __getstate__(self):  # the lock and a loaded model never travel; workers load their own
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(*state["spec"])


def device_settings(device: str, settings: dict, nthreads: int, memory_limit: int | None,
                    worker: str) -> tuple[int, int, int]:
    """(tiles per forward pass, decode threads per task, bytes of page-locked memory the worker's tasks may hold
    together) for a worker on ``device``, from the ``extract`` keys in ``settings``.

    On a GPU: ``gpu_batch_size``; the worker's threads shared by its ``tasks_per_gpu`` tasks (a GPU outruns one
    decoding thread); ``pinned_mb``, which must fit in a quarter of the worker's Dask memory limit (page-locked
    memory is part of the worker's memory, and can never be spilled or swapped). On CPU: ``batch_size``, one
    thread, no page-locked memory.
    """
    if device == "cpu":
        return int(settings["batch_size"]), 1, 0
    pinned_mb = int(settings["pinned_mb"])
    if memory_limit and pinned_mb << 20 > memory_limit // 4:
        raise ConfigError(None, f"extract.pinned_mb ({pinned_mb} MB) is more than a quarter of worker {worker}'s "
                                f"memory limit ({memory_limit >> 20} MB)",
                          "raise cluster.memory_limit or lower extract.pinned_mb")
    return (int(settings.get("gpu_batch_size") or GPU_BATCH_DEFAULT),
            max(2, nthreads // int(settings["tasks_per_gpu"])), pinned_mb << 20)


def check_pinned(tasks_per_gpu: int, block_tiles: int, tile_px: int, n_rows: int, dim: int, batch_size: int,
                 budget: int) -> None:
    """An error when ``tasks_per_gpu`` tasks of ``n_rows`` tiles would hold more page-locked memory
    (:meth:`.HostRing.bytes_needed`) than the worker's ``budget`` bytes."""
    need = HostRing.bytes_needed(block_tiles, tile_px, n_rows, dim) * tasks_per_gpu
    if need > budget:
        raise ConfigError(None, f"{tasks_per_gpu} task(s) of {n_rows} tiles of {tile_px} px in batches of "
                                f"{batch_size} need {need >> 20} MB of page-locked memory, more than "
                                f"extract.pinned_mb ({budget >> 20} MB)",
                          "raise extract.pinned_mb, or lower extract.gpu_batch_size or tiles_per_task")


def plugin_name(encoder: str, checkpoint: str | None, precision: str) -> str:
    return f"wsi-encoder:{encoder}:{checkpoint}:{precision}"


def _plugin(name: str) -> EncoderPlugin:
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if plugin is None or plugin.encoder is None:
        raise ConfigError(None, f"the encoder did not load on worker {worker.address}", "see the worker's log")
    return plugin


def describe_encoder(plugin: str) -> dict:
    """The loaded encoder's :class:`FeatureAttrs` as a dict (runs where the model lives)."""
    return _plugin(plugin).encoder.attrs.to_dict()


@contextmanager
def tile_parts(store: SlideStore, slide_cfg: dict, lo: int, hi: int, block_tiles: int,
               threads: int) -> Iterator[Iterator[np.ndarray]]:
    """Tiles ``lo:hi`` as ordered uint8 arrays, ``threads`` threads decoding ahead of the caller: whole chunks
    of the store's pixels, or for a coordinates-only store row runs of the slide (which must be the very file
    that was tiled) read and cut as the tiler does (:class:`wsi.slide.TileSource`: the slide's JPEG tiles
    decoded directly where the format allows)."""
    if store.has_pixels:
        yield _read_ahead(store.read_tiles, lo, hi, block_tiles, threads)
        return
    source = Path(store.slide.source_path)
    if not source.exists():
        raise SlideError(source, f"the slide of coordinates-only store {store.path} is missing",
                         "restore the slide file or re-run `wsi tile`")
    if source_stat(source) != (store.slide.source_size, store.slide.source_mtime):
        raise SlideError(source, "slide file changed since it was tiled", "re-run `wsi tile` for this slide")
    with TileSource.open(source, store.tiling, **slide_cfg) as tile_source:
        yield (tiles for _, tiles in tile_source.iter_tiles(store.coords[lo:hi], threads=threads))


def _read_ahead(read: Callable[[int, int], np.ndarray], lo: int, hi: int, step: int,
                threads: int) -> Iterator[np.ndarray]:
    """``read(a, b)`` over ``lo:hi`` in steps of ``step``, in order, the threads staying one read each ahead."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for a in range(lo, hi, step):
            pending.append(pool.submit(read, a, min(a + step, hi)))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_tile_range(path: str, encoder: str, plugin: str, lo: int, hi: int, tasks_per_gpu: int,
                     decode_threads: int | None, slide_cfg: dict, stain: dict | None = None,
                     slide_stain: dict | None = None, view: int = 0) -> float:
    """Embed tiles ``lo:hi`` of the store at ``path``, write rows ``lo:hi`` of its feature array
    ``features/<encoder>`` (a feature set) and return the seconds it took; with ``stain`` (the fitted reference)
    and ``slide_stain`` (the slide's fit) the tiles are normalised first. ``view`` k >= 1: the tiles' k-th
    augmented view (:mod:`.augment`), written to view k of ``encoder``'s views array instead."""
    started = time.perf_counter()
    owner = _plugin(plugin)
    enc = owner.encoder
    transform = StainTransform({**stain, "slide": slide_stain}, enc.device) if stain else None
    threads = decode_threads or owner.decode_threads
    store = SlideStore.open(path)
    chunk, tile_px = store.tiling.chunk_tiles, store.tiling.tile_px
    block = max(chunk, owner.batch_size // chunk * chunk)  # reads of whole chunks: each chunk is decoded once
    ring = HostRing(pinned=enc.device.type == "cuda")
    if ring.pinned:
        check_pinned(tasks_per_gpu, block, tile_px, hi - lo, enc.dim, owner.batch_size, owner.pinned_budget)
    with tile_parts(store, slide_cfg, lo, hi, block, threads) as parts:
        if view:
            parts = augment.augmented_parts(parts, augment.slide_seed(store.slide_id), view, lo)
        features = embed_blocks(enc, staged_blocks(parts, hi - lo, block, ring), hi - lo, owner.batch_size,
                                lock=owner.lock, ring=ring, stain=transform)
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0]) + lo
        x, y = store.coords[i]
        raise StoreError(path, f"encoder {encoder} gave NaN/Inf features for {int(bad.sum())} tiles of slide "
                               f"{store.slide_id}, first tile {i} at ({x}, {y})",
                         "check the checkpoint; try extract.precision fp32")
    writer = store.features_writer(encoder)
    if view:
        writer[view - 1, lo:hi] = features
    else:
        writer[lo:hi] = features
    return time.perf_counter() - started


def complete_slide(path: str, arrays: list[tuple[str, dict, str | None]], stain: dict | None,
                   slide_stain: dict | None, *range_seconds: float) -> float:
    """Runs after every range of the slide: mark each of its new feature arrays complete (``(key, attrs, h5
    path or None)``; with the stain fit, if any), then write its h5 export. Returns the seconds the slide's
    ranges took on the workers, together."""
    store = SlideStore.open(path)
    for key, attrs, h5 in arrays:
        store.complete_features(key, FeatureAttrs.from_dict(
            {**attrs, "stain": {**stain, "slide": slide_stain} if stain else None}))
        if h5 is not None:
            export_h5(store, key, h5)
    return sum(range_seconds)


def views_settings(views: int) -> dict:
    """What ``FeatureAttrs.augment`` records for ``views`` augmented views."""
    return {"views": views, **augment.settings()}


def check_views(store: SlideStore, key: str, views: int) -> bool:
    """Whether the store's augmented views of ``key`` are complete and made as ``views`` views are now made;
    complete ones made otherwise are a StoreError (never mixed, never silently replaced)."""
    if not store.has_features(key):
        return False
    found = store.feature_attrs(key).augment or {}
    if found != views_settings(views):
        raise StoreError(store.path, f"its augmented views features/{key} were made with "
                                     f"{found.get('views')} views at other strengths than extract.augment: {views} "
                                     "makes", f"delete features/{encoder_key(key)} to re-extract them")
    return True


# ------------------------------------------------------------------------------------------ the cohort
def _cohort_ids(out_dir: Path, slide_ids: list[str] | None) -> list[str]:
    if slide_ids is not None:
        return list(slide_ids)
    return Layout(out_dir).store_ids()


def task_ranges(n_tiles: int, chunk_tiles: int, tiles_per_task: int) -> list[tuple[int, int]]:
    """Tile ranges that start on chunk boundaries: ``tiles_per_task`` rounded down to whole chunks."""
    step = max(1, tiles_per_task // chunk_tiles) * chunk_tiles
    return [(lo, min(lo + step, n_tiles)) for lo in range(0, n_tiles, step)]


class _Cohort:
    """Which future belongs to which slide; outcomes go to the stage runner (:class:`wsi.runner.StageRun`)."""

    def __init__(self, run: StageRun):
        self.run = run
        self.slide_of: dict[str, str] = {}      # future key -> slide id
        self.tiles_of: dict[str, int] = {}      # range future key -> tiles
        self.final_keys: set[str] = set()
        self.futures: dict[str, list] = {}      # slide id -> its futures

    def add(self, slide_id: str, ranges: list, tiles: list[int], final) -> None:
        self.futures[slide_id] = [*ranges, final]
        for fut, n in zip(ranges, tiles):
            self.tiles_of[fut.key] = n
        self.final_keys.add(final.key)
        for fut in self.futures[slide_id]:
            self.slide_of[fut.key] = slide_id

    def collect(self, client, bar) -> None:
        """Follow every future to its end: progress per range, done per slide (with a line: tiles, seconds on
        the workers), one failure per slide (whose remaining tasks are cancelled)."""
        for fut in as_completed([f for futs in self.futures.values() for f in futs]):
            slide_id = self.slide_of[fut.key]
            if fut.status == "cancelled":
                continue
            if fut.status == "error":
                self.run.fail(slide_id, fut.exception())
                client.cancel([f for f in self.futures[slide_id] if not f.done()])
            elif fut.key in self.final_keys:
                tiles = sum(self.tiles_of[f.key] for f in self.futures[slide_id][:-1])
                bar.write(f"wsi extract: {slide_id}: {tiles} tiles, {fut.result():.1f} s on the workers")
                sys.stdout.flush()  # a job's log shows each slide as it ends
                self.run.done(slide_id, tiles)
            else:
                bar.update(self.tiles_of[fut.key])


def extract_cohort(out_dir, params: ExtractConfig, *, slide_ids: list[str] | None = None,
                   progress: bool = True) -> StageSummary:
    """Features of every store under ``OUT/stores`` (or of ``slide_ids``) with ``extract.encoder``, on the Dask
    cluster of the ``cluster`` section.

    Writes ``features/<encoder>`` into each store and, with ``extract.export_h5``,
    ``OUT/features/<encoder>/<slide_id>.h5``. Slides whose features are complete are skipped ("up to date").
    Failed slides are in ``OUT/failures.csv`` and in the summary, whose ``results`` are the tiles embedded for
    each slide done.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    cfg = params.extract
    encoder, checkpoint, precision = cfg["encoder"], cfg.get("checkpoint"), cfg.get("precision", "auto")
    method = cfg.get("stain", "none")
    key = feature_set(encoder, method)
    views = int(cfg.get("augment") or 0)
    if views < 0:
        raise ConfigError(None, f"extract.augment is {views}; it is the number of augmented views (0: none)")
    resolve_spec(encoder)  # an unknown name fails here, before any cluster starts
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise ConfigError(checkpoint, "checkpoint does not exist")
        checkpoint = str(Path(checkpoint).resolve())  # workers may run in another directory
    run = StageRun(out_dir, STAGE, {s: store_path(out_dir, s) for s in _cohort_ids(out_dir, slide_ids)})
    cohort = _Cohort(run)
    reference = None  # a reference without tissue (or none to be found) stops the run here, naming it
    if method != "none":
        reference = fit_reference(method, str(cfg["stain_reference"]), out_dir, _cohort_ids(out_dir, None),
                                  dict(params.slide), encoder)

    todo: list[tuple[SlideStore, bool, bool]] = []  # (store, raw features to make, views to make)
    for slide_id in run.todo():
        try:
            store = SlideStore.open(store_path(out_dir, slide_id))
            raw_done = store.has_features(key)
            if raw_done:
                check_stain(method, store.feature_attrs(key).stain, reference, store.path)
                h5 = h5_path(out_dir, key, slide_id)
                if cfg["export_h5"] and not h5.exists():
                    export_h5(store, key, h5)
            views_done = not views or check_views(store, augmented_set(key), views)
            if raw_done and views_done:
                run.skip(slide_id, "up to date")
                continue
        except (WsiError, OSError) as e:
            run.fail(slide_id, e)
            continue
        todo.append((store, not raw_done, not views_done))

    if todo:
        plugin = plugin_name(encoder, checkpoint, precision)
        settings = {k: cfg.get(k) for k in ("batch_size", "gpu_batch_size", "tasks_per_gpu", "pinned_mb")}
        with dask_client(params.cluster, preload=[__name__]) as client:  # its workers run this module
            resources = gpu_resources(client, tasks_per_gpu=int(cfg["tasks_per_gpu"]))
            try:
                # a checkpoint that does not fit, or a GPU worker without CUDA, raises here, from the workers'
                # setup: one error for the cohort
                client.register_plugin(EncoderPlugin(encoder, checkpoint, precision, settings,
                                                     gpu_only=resources is not None), name=plugin)
                attrs = client.submit(describe_encoder, plugin, resources=resources, pure=False).result()
                for store, raw, augmented in todo:
                    _submit_slide(client, cohort, store, key, params, attrs, plugin, resources, reference,
                                  raw=raw, views=views if augmented else 0)
                total = sum(cohort.tiles_of.values())
                with tqdm(total=total, unit="tile", desc=f"extract {encoder}", disable=not progress) as bar:
                    cohort.collect(client, bar)
            finally:
                # frees the encoder on a shared cluster; best effort: a worker that died (distributed's
                # CommClosedError is an OSError) holds nothing, and the slides' outcomes are already recorded
                with suppress(OSError):
                    client.unregister_worker_plugin(plugin)
    return run.summary


def _submit_slide(client, cohort: _Cohort, store: SlideStore, encoder: str, params: ExtractConfig, attrs: dict,
                  plugin: str, resources: dict | None, reference: dict | None, *, raw: bool, views: int) -> None:
    """Fresh feature arrays: ``features/<encoder>`` (the feature set: encoder[+stain]) when ``raw``, and its
    ``views`` augmented views (``features/<encoder>+augment``) when ``views``; the slide's stain fit (with a
    ``reference``), one task per chunk-aligned tile range and view, and the slide's completing task."""
    cfg = params.extract
    h5 = str(h5_path(cohort.run.out_dir, encoder, store.slide_id)) if cfg["export_h5"] else None
    arrays = [(encoder, attrs, h5)] if raw else []
    if views:
        arrays.append((augmented_set(encoder), {**attrs, "augment": views_settings(views)}, None))
    try:
        for key, _, _ in arrays:
            store.create_features(key, int(attrs["dim"]), store.tiling.chunk_tiles,
                                  views=views if key != encoder else None)
    except WsiError as e:
        cohort.run.fail(store.slide_id, e)
        return
    slide_stain = None  # a slide without tissue to fit fails through its range tasks, which depend on the fit
    if reference is not None:
        slide_stain = client.submit(fit_slide, str(store.path), reference["method"], dict(params.slide),
                                    pure=False)
    ranges, tiles = [], []
    for view in ([0] if raw else []) + list(range(1, views + 1)):
        key = augmented_set(encoder) if view else encoder
        for lo, hi in task_ranges(store.n_tiles, store.tiling.chunk_tiles, int(cfg["tiles_per_task"])):
            ranges.append(client.submit(embed_tile_range, str(store.path), key, plugin, lo, hi,
                                        int(cfg["tasks_per_gpu"]), cfg.get("decode_threads"), dict(params.slide),
                                        reference, slide_stain, view, resources=resources, pure=False))
            tiles.append(hi - lo)
    final = client.submit(complete_slide, str(store.path), arrays, reference, slide_stain, *ranges, pure=False)
    cohort.add(store.slide_id, ranges, tiles, final)
