"""Cohort extraction on a real Dask cluster: equality with a plain forward pass, skipping, exports, bad input,
a worker that dies mid-task, coordinates-only stores, and real ImageNet weights on real tissue."""

import os
import threading
from pathlib import Path

import cloudpickle
import h5py
import numpy as np
import pytest
from distributed import Client, WorkerPlugin
from factories import extract_config, lite0_checkpoint, plain_forward, save_tiny, tissue_like, write_store

from wsi.cluster import local_cluster
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.failures import read_failures, record_failure
from wsi.features import ExtractConfig, extract_cohort, h5_path
from wsi.features.extract import check_pinned, device_settings
from wsi.slide import open_slide
from wsi.store import SlideStore, store_path
from wsi.tiling import TileConfig
from wsi.tiling import tile_slides as tile_cohort

REAL_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"
cloudpickle.register_pickle_by_value(__import__(__name__))  # workers need not import this test module


@pytest.mark.parametrize("tiles_per_task,batch_size", [(16, 5), (40, 64)])
def test_features_equal_a_plain_forward_pass_and_are_exported(dask_cluster, tiny_vit, tmp_path, tiles_per_task,
                                                               batch_size):
    tiles = {"a": tissue_like(37, 48, 1), "b": tissue_like(8, 48, 2), "c": tissue_like(0, 48, 3)}
    for slide_id, t in tiles.items():
        write_store(tmp_path, slide_id, t, chunk_tiles=8)
    config = extract_config(dask_cluster, tiny_vit, tiles_per_task=tiles_per_task, batch_size=batch_size)
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(config), progress=False)
    assert sorted(summary.done) == ["a", "b", "c"] and not summary.failed and sum(summary.results.values()) == 45
    for slide_id, t in tiles.items():
        store = SlideStore.open(store_path(tmp_path, slide_id))
        feats = store.features("test_vit")
        assert feats.shape == (len(t), 64)
        if len(t):
            np.testing.assert_allclose(feats, plain_forward("test_vit", tiny_vit, t), rtol=1e-4, atol=1e-5)
        attrs = store.feature_attrs("test_vit")
        assert attrs.dim == 64 and attrs.weights_source == str(tiny_vit.resolve())
        assert store.group["features/test_vit"].chunks == (8, 64)
        with h5py.File(h5_path(tmp_path, "test_vit", slide_id)) as f:
            np.testing.assert_array_equal(f["features"][:], feats)
            np.testing.assert_array_equal(f["coords"][:], store.coords)
            assert f["coords"].attrs["patch_size"] == 96 and f["coords"].attrs["patch_level"] == 0
    assert read_failures(tmp_path) == []


def test_complete_slides_are_skipped_and_new_ones_done(dask_cluster, tiny_vit, tmp_path):
    write_store(tmp_path, "old", tissue_like(10, 32, 4))
    cfg = extract_config(dask_cluster, tiny_vit)
    assert extract_cohort(tmp_path, ExtractConfig.from_config(cfg), progress=False).done == ["old"]
    chunk = store_path(tmp_path, "old") / "features" / "test_vit" / "c" / "0" / "0"
    stamp = chunk.stat().st_mtime_ns
    write_store(tmp_path, "new", tissue_like(10, 32, 5))
    h5_path(tmp_path, "test_vit", "old").unlink()
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(cfg), progress=False)
    assert summary.skipped == {"old": "up to date"} and summary.done == ["new"]
    assert chunk.stat().st_mtime_ns == stamp  # not recomputed
    assert h5_path(tmp_path, "test_vit", "old").exists()  # the missing export is written again


def test_a_checkpoint_that_does_not_fit_stops_the_run_with_one_error(dask_cluster, tmp_path):
    write_store(tmp_path, "a", tissue_like(8, 32, 13))
    other = save_tiny(tmp_path / "effnet.safetensors", "test_efficientnet")
    with pytest.raises(ConfigError, match=f"{other}: checkpoint does not fit test_vit: missing cls_token"):
        extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, other)), progress=False)
    assert not SlideStore.open(store_path(tmp_path, "a")).has_features("test_vit")
    with Client(dask_cluster) as client:  # nothing is left registered on a scheduler the run did not start
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
    assert not any(name.startswith("wsi-encoder") for names in plugins.values() for name in names)


@pytest.mark.slow
def test_a_gpu_worker_without_cuda_stops_the_run_with_one_error(tiny_vit, tmp_path):
    """A worker that advertises GPU=1 on this machine, which has none: one clear error, no slide touched (the
    run would otherwise go on some 100x slower on the worker's CPU)."""
    write_store(tmp_path, "a", tissue_like(8, 32, 14))
    with local_cluster({"n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"}, gpus=["0"]) as c:
        with pytest.raises(ConfigError, match="advertises GPU=1 but torch sees no usable CUDA device"):
            extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(c, tiny_vit)), progress=False)
    assert not SlideStore.open(store_path(tmp_path, "a")).has_features("test_vit")
    assert read_failures(tmp_path) == []


def test_worker_settings_follow_its_device():
    """What a GPU worker uses (checked here without one): the GPU batch size, its threads shared by the tasks
    that share its GPU, and page-locked memory that fits in a quarter of its memory limit."""
    extract = load_config()["extract"]
    assert device_settings("cpu", extract, 8, 8 << 30, "w") == (64, 1, 0)
    assert device_settings("cuda", extract, 16, 8 << 30, "w") == (256, 8, 1 << 30)
    assert device_settings("cuda", {**extract, "gpu_batch_size": None}, 2, None, "w") == (256, 2, 1 << 30)
    with pytest.raises(ConfigError, match=r"extract.pinned_mb \(1024 MB\) is more than a quarter of worker "
                                          r"tcp://w's memory limit \(2048 MB\)"):
        device_settings("cuda", extract, 16, 2 << 30, "tcp://w")


def test_a_cpu_worker_of_a_gpu_run_does_not_load_the_encoder(monkeypatch):
    """On a cluster with GPU workers the run's tasks ask for a GPU: a worker without one never gets a task, so it
    must not hold a copy of the model (a ViT-g is some 4.5 GB). A CPU-only cluster's workers load it."""
    from types import SimpleNamespace

    import wsi.features.extract as extract

    loaded = []
    monkeypatch.setattr(extract, "load_encoder", lambda *a, **k: loaded.append(k["device"]) or "encoder")
    worker = SimpleNamespace(address="tcp://cpu", state=SimpleNamespace(nthreads=1, total_resources={}),
                             memory_manager=SimpleNamespace(memory_limit=8 << 30))
    settings = load_config()["extract"]
    gpu_run = extract.EncoderPlugin("test_vit", None, "auto", settings, gpu_only=True)
    gpu_run.setup(worker)
    assert gpu_run.encoder is None and loaded == []
    cpu_run = extract.EncoderPlugin("test_vit", None, "auto", settings, gpu_only=False)
    cpu_run.setup(worker)
    assert cpu_run.encoder == "encoder" and loaded == ["cpu"]


def test_tasks_sharing_a_gpu_must_fit_in_the_page_locked_budget():
    # the shipped defaults: 2 tasks of 1024 tiles of 256 px in blocks of 256, 1,536-d features: 272 MB of 1 GB
    # (each buffer rounded up to a power of two, as torch's page-locked allocator does)
    check_pinned(2, 256, 256, 1024, 1536, 256, 1 << 30)
    with pytest.raises(ConfigError, match="2 task.s. of 8192 tiles of 256 px in batches of 512 need 640 MB of "
                                          r"page-locked memory, more than extract.pinned_mb \(128 MB\)"):
        check_pinned(2, 512, 256, 8192, 1536, 512, 128 << 20)


def test_bad_stores_fail_alone_with_one_row_each(dask_cluster, tiny_vit, tmp_path, capsys):
    write_store(tmp_path, "good", tissue_like(20, 32, 6))
    corrupt = write_store(tmp_path, "corrupt", tissue_like(20, 32, 7))
    (corrupt.path / "tiles" / "c" / "1" / "0" / "0" / "0").write_bytes(b"\x00garbage" * 10)
    unfinished = write_store(tmp_path, "unfinished", tissue_like(4, 32, 8))
    unfinished.group.attrs["complete"] = False  # as if tiling had been killed before its commit
    (store_path(tmp_path, "broken") / "zarr.json").parent.mkdir(parents=True)
    (store_path(tmp_path, "broken") / "zarr.json").write_text("{not json")
    untiled = write_store(tmp_path, "untiled", tissue_like(4, 32, 9))  # its tiling failed: a row says why
    untiled.group.attrs["complete"] = False
    record_failure(tmp_path, "untiled", "tile", "untiled.svs", "SlideError: no tissue found on the slide")

    summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit)),
                             slide_ids=None, progress=False)
    assert summary.done == ["good"]
    assert summary.skipped == {"untiled": "failed at tile"}  # not failed again with other advice
    assert sorted(summary.failed) == ["broken", "corrupt", "unfinished"]
    assert "wsi extract: good: 20 tiles, " in capsys.readouterr().out  # a line per slide as it ends
    rows = {r["slide_id"]: r for r in read_failures(tmp_path) if r["stage"] == "extract"}
    assert set(rows) == {"broken", "corrupt", "unfinished"}
    assert [r["slide_id"] for r in read_failures(tmp_path) if r["stage"] == "tile"] == ["untiled"]
    assert "tiles 8:16 cannot be decoded" in rows["corrupt"]["cause"]  # the damaged chunk
    assert "incomplete" in rows["unfinished"]["cause"]
    assert "not a readable Zarr store" in rows["broken"]["cause"]
    assert not SlideStore.open(corrupt.path).has_features("test_vit")
    assert not h5_path(tmp_path, "test_vit", "corrupt").exists()
    assert SlideStore.open(store_path(tmp_path, "good")).has_features("test_vit")


def test_nan_features_name_slide_and_tile(dask_cluster, tmp_path):
    """A ViT whose patch embedding is scaled up overflows LayerNorm on bright tiles only."""
    from safetensors.torch import load_file, save_file

    path = save_tiny(tmp_path / "vit.safetensors")
    state = load_file(str(path))
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"] * 3e21
    save_file(state, str(path))
    grey = np.full((6, 32, 32, 3), 128, np.uint8)  # ~ the model's mean (0.5): near-zero input, finite features
    bright = grey.copy()
    bright[4] = 255
    ref_grey, ref_bright = plain_forward("test_vit", path, grey), plain_forward("test_vit", path, bright)
    assert np.isfinite(ref_grey).all() and not np.isfinite(ref_bright[4]).all()  # the premise holds

    write_store(tmp_path, "grey", grey)
    write_store(tmp_path, "bright", bright)
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, path)), progress=False)
    assert summary.done == ["grey"] and list(summary.failed) == ["bright"]
    cause = summary.failed["bright"]
    assert "NaN/Inf features for 1 tiles of slide bright, first tile 4 at (256, 0)" in cause
    assert not SlideStore.open(store_path(tmp_path, "bright")).has_features("test_vit")


class DieMidTask(WorkerPlugin):
    """Kills its worker process while an extraction task runs, once per marker file."""

    def __init__(self, markers: list[str]):
        self.markers = markers

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "embed_tile_range" in str(key):
            for marker in self.markers:
                if not os.path.exists(marker):
                    Path(marker).touch()
                    threading.Timer(0.05, os._exit, (1,)).start()  # mid-task: the forward pass is running
                    return


def test_worker_dying_mid_task_is_retried_and_the_slide_is_whole(dask_cluster, tiny_vit, tmp_path):
    tiles = tissue_like(48, 48, 9)
    write_store(tmp_path, "s", tiles)
    marker = tmp_path / "died"
    with Client(dask_cluster) as client:
        client.register_plugin(DieMidTask([str(marker)]), name="die-mid-task")
        try:
            summary = extract_cohort(tmp_path, ExtractConfig.from_config(extract_config(dask_cluster, tiny_vit)),
                                     progress=False)
        finally:
            client.unregister_worker_plugin("die-mid-task")
        client.wait_for_workers(2, timeout=60)
    assert marker.exists(), "a worker was killed"
    assert summary.done == ["s"]
    feats = SlideStore.open(store_path(tmp_path, "s")).features("test_vit")
    np.testing.assert_allclose(feats, plain_forward("test_vit", tiny_vit, tiles), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_worker_deaths_beyond_the_allowed_retries_fail_the_slide_not_the_cohort(dask_cluster, tiny_vit, tmp_path):
    write_store(tmp_path, "a", tissue_like(16, 32, 10))
    write_store(tmp_path, "b", tissue_like(16, 32, 11))
    scheduler = dask_cluster.scheduler  # in this process: no retry after a worker death, for this test only
    allowed, scheduler.allowed_failures = scheduler.allowed_failures, 0
    try:
        with Client(dask_cluster) as client:
            client.register_plugin(DieMidTask([str(tmp_path / "died")]), name="die-mid-task")
            try:
                config = extract_config(dask_cluster, tiny_vit, tiles_per_task=8)
                summary = extract_cohort(tmp_path, ExtractConfig.from_config(config), progress=False)
            finally:
                client.unregister_worker_plugin("die-mid-task")
            client.wait_for_workers(2, timeout=60)
    finally:
        scheduler.allowed_failures = allowed
    assert summary.failed, "the killed task was not retried"
    for slide_id in summary.failed:
        assert "KilledWorker" in summary.failed[slide_id]
        assert not SlideStore.open(store_path(tmp_path, slide_id)).has_features("test_vit")
    assert set(summary.done) | set(summary.failed) == {"a", "b"}


def tile_slides(paths, out, cfg):
    summary = tile_cohort(out, TileConfig.from_config(cfg), paths, progress=False)
    assert len(summary.done) == 1 and not summary.failed


@pytest.mark.slow
@pytest.mark.parametrize("decode_threads", [None, 3])
def test_coordinates_only_store_reads_the_slide(dask_cluster, tiny_vit, tmp_path, decode_threads):
    """The slide's JPEG tiles decoded directly (as tiling reads them), in one or several threads, give the
    features of the stored pixels."""
    with open_slide(REAL_SLIDE) as slide:
        assert slide.pixel_backend == "jpeg-tiles"
    cfg = extract_config(dask_cluster, tiny_vit, decode_threads=decode_threads)
    cfg["tiling"].update({"tile_px": 128, "target_mpp": 1.0})
    tile_slides([REAL_SLIDE], tmp_path / "px", cfg)
    cfg["tiling"]["store_pixels"] = False
    tile_slides([REAL_SLIDE], tmp_path / "co", cfg)
    for out in ("px", "co"):
        summary = extract_cohort(tmp_path / out, ExtractConfig.from_config(cfg), progress=False)
        assert summary.done == ["cmu_small_region"]
    px, co = (SlideStore.open(store_path(tmp_path / d, "cmu_small_region")) for d in ("px", "co"))
    assert not co.has_pixels and px.n_tiles > 10
    np.testing.assert_allclose(co.features("test_vit"), px.features("test_vit"), rtol=1e-5, atol=1e-6)


def test_coordinates_only_store_whose_slide_changed_fails(dask_cluster, tiny_vit, tmp_path):
    cfg = extract_config(dask_cluster, tiny_vit)
    cfg["tiling"].update({"tile_px": 128, "target_mpp": 1.0, "store_pixels": False})
    slide = tmp_path / "slides" / "moved.svs"
    slide.parent.mkdir()
    slide.write_bytes(REAL_SLIDE.read_bytes())
    tile_slides([slide], tmp_path, cfg)
    os.utime(slide, (1, 1))
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(cfg), progress=False)
    assert list(summary.failed) == ["moved"] and "changed since it was tiled" in summary.failed["moved"]


@pytest.mark.slow
def test_real_weights_on_real_tissue_separate_tissue_from_glass(dask_cluster, tmp_path):
    """ImageNet EfficientNet-Lite0 on the real Aperio fixture: finite features, and tissue tiles and glass tiles
    fall into two groups that a nearest-centroid rule tells apart."""
    cfg = extract_config(dask_cluster, lite0_checkpoint(), encoder="tf_efficientnet_lite0", batch_size=16)
    cfg["tiling"].update({"tile_px": 128, "target_mpp": 1.0, "min_tissue_fraction": 0.0})
    tile_slides([REAL_SLIDE], tmp_path, cfg)
    summary = extract_cohort(tmp_path, ExtractConfig.from_config(cfg), progress=False)
    assert summary.done == ["cmu_small_region"]
    store = SlideStore.open(store_path(tmp_path, "cmu_small_region"))
    feats, fraction = store.features("tf_efficientnet_lite0"), store.tissue_fraction
    assert feats.shape[1] == 1280 and np.isfinite(feats).all()
    tissue, glass = feats[fraction > 0.9], feats[fraction < 0.02]
    assert len(tissue) >= 5 and len(glass) >= 5
    correct = 0
    for group, other in ((tissue, glass), (glass, tissue)):
        for i in range(len(group)):  # leave-one-out nearest centroid
            rest = np.delete(group, i, axis=0)
            d_same = np.linalg.norm(group[i] - rest.mean(0))
            d_other = np.linalg.norm(group[i] - other.mean(0))
            correct += d_same < d_other
    assert correct / (len(tissue) + len(glass)) >= 0.95


def test_cli_extract_runs_on_a_scheduler_address(dask_cluster, tiny_vit, tmp_path, capsys):
    from wsi.cli import main as wsi_main

    write_store(tmp_path, "a", tissue_like(12, 32, 12))
    args = ["extract", "--out", str(tmp_path), "--encoder", "test_vit", "--checkpoint", str(tiny_vit),
            "--cluster", dask_cluster.scheduler_address, "--batch-size", "4", "--no-progress"]
    assert wsi_main(args) == 0
    assert SlideStore.open(store_path(tmp_path, "a")).has_features("test_vit")
    assert "Dask dashboard: http" in capsys.readouterr().err
    assert wsi_main([*args[:-1], "--checkpoint", str(tmp_path / "nowhere.pth")]) == 2
    assert "nowhere.pth: checkpoint does not exist" in capsys.readouterr().err
