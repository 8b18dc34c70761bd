"""Stain normalisation applied on the tiles' device: the Lab conversions are torchstain's, written as batched
torch ops, so a GPU batch never goes to the host for them."""

import numpy as np
import pytest
import torch
from factories import H_E, stained

from wsi.features.stain import StainTransform, fit_stain, lab_to_rgb, rgb_to_lab


def _as_batch(tiles: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255


def test_lab_conversions_equal_torchstains():
    from torchstain.torch.utils import lab2rgb, lab_merge, lab_split, rgb2lab

    x = _as_batch(np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8))
    lab = rgb_to_lab(x)
    for i in range(len(x)):
        expected = torch.stack(lab_split(rgb2lab(x[i].clone())))
        torch.testing.assert_close(lab[i], expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lab_to_rgb(lab[i:i + 1])[0], lab2rgb(lab_merge(*expected)).permute(2, 0, 1),
                                   rtol=1e-5, atol=1e-5)


def test_reinhard_equals_torchstains_transform():
    from torchstain.torch.utils import lab2rgb, lab_merge, lab_split, rgb2lab

    reference, tiles = stained(H_E["reference"], n=4, px=32, seed=5), stained(H_E["lab"], n=4, px=32)
    stain = {"method": "reinhard", "target": fit_stain("reinhard", reference, "ref", "reference"),
             "slide": fit_stain("reinhard", tiles, "lab", "lab")}
    got = StainTransform(stain, torch.device("cpu"))(_as_batch(tiles))
    for i, tile in enumerate(_as_batch(tiles)):  # torchstain's own mapping, tile by tile on the CPU
        channels = lab_split(rgb2lab(tile.clone()))
        mapped = [(c - mu) / sd * sd_ref + mu_ref for c, mu, sd, mu_ref, sd_ref
                  in zip(channels, *stain["slide"].values(), *stain["target"].values())]
        torch.testing.assert_close(got[i], lab2rgb(lab_merge(*mapped)).permute(2, 0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_transform_stays_on_the_tiles_device(method):
    """On ``meta`` tensors (shapes, no data): a copy to the host, as torchstain's CPU constants forced, fails."""
    fit = fit_stain(method, stained(H_E["lab"], n=4, px=32), "lab", "lab")
    meta = torch.device("meta")
    y = StainTransform({"method": method, "target": fit, "slide": fit}, meta)(torch.empty(2, 3, 16, 16,
                                                                                          device=meta))
    assert y.device == meta and y.shape == (2, 3, 16, 16)
