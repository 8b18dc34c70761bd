"""Shared fixtures: tiny slides made by :mod:`wsi_synth` (written once per test session), the real slide, and
one Dask cluster for the session.

``make_slide(name, **kwargs)`` writes ``<session tmp>/slides/<name>`` with
:func:`wsi_synth.write_synthetic_slide` the first time and returns the same :class:`~wsi_synth.SyntheticSlide`
afterwards; asking for one name with other arguments is an error, so two tests never share a slide by
accident. Tests must not modify these files (copy one first).
"""

from __future__ import annotations

import os
from pathlib import Path

# Dask's own diagnostics, quieter for the whole session and every process it starts (Snakemake's jobs, their
# clusters, SLURM's worker jobs: all inherit this environment). An idle cluster of two workers otherwise costs
# about a fifth of a core (event-loop health checks every 20 ms, the workers' stack sampling every 10 ms), and a
# test session holds one per pytest worker beside the clusters its runs start: on 2 cores that is CPU the tests
# need. No result depends on them; set in the environment, they apply before any process imports dask.
QUIET_DASK = {"DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
              "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
              "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
              "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s"}
for name, value in QUIET_DASK.items():
    os.environ.setdefault(name, value)

import pytest  # noqa: E402

from wsi_synth import SyntheticSlide, write_synthetic_slide  # noqa: E402

REAL_SLIDE = Path(__file__).parent / "data" / "cmu_small_region.svs"
# Test files that run first, in this order: under pytest-xdist (pyproject's addopts) each takes a worker while
# the others share the rest. The SLURM lane spends most of its minutes waiting on SLURM's status polls, and the
# workflow's Snakemake runs are the longest file; started last, either would be the run's tail.
FIRST = ("test_slurm.py", "test_workflow.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: within a rank, collection order


@pytest.fixture(scope="session")
def dask_cluster():
    """Two single-threaded local worker processes for the whole session. Tests that extract or train on Dask
    point their config at it (:func:`factories.on_cluster`) instead of starting worker processes of their own
    (each start imports torch in every worker); tests of a cluster's own shape still start theirs. Its workers are
    forked with both stages' modules imported, as the product's clusters are with their stage's."""
    from wsi.cluster import local_cluster

    with local_cluster({"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"}, gpus=[],
                       preload=["wsi.features.extract", "wsi.mil.training"]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A randomly initialised tiny timm ViT (``test_vit``, 64 features) saved as safetensors, for the session."""
    from factories import save_tiny

    return save_tiny(tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors")


@pytest.fixture(scope="session")
def real_slide_path() -> Path:
    """A real Aperio SVS (CC0, 2220 x 2967 px at 0.499 um/px, one level); see tests/data/README.md."""
    return REAL_SLIDE


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory):
    """``make_slide(name, **write_synthetic_slide kwargs) -> SyntheticSlide``, written once per session."""
    folder = tmp_path_factory.mktemp("slides")
    made: dict[str, tuple[dict, SyntheticSlide]] = {}

    def make(name: str, **kwargs) -> SyntheticSlide:
        if name in made:
            if made[name][0] != kwargs:
                raise ValueError(f"slide {name!r} was already made with {made[name][0]}, not {kwargs}")
            return made[name][1]
        slide = write_synthetic_slide(folder / name, **kwargs)
        made[name] = (kwargs, slide)
        return slide

    return make


@pytest.fixture(scope="session")
def small_slide(make_slide) -> SyntheticSlide:
    """2048 x 1536 px Aperio-like slide at 0.5 um/px, levels 1/4/16, two small tumour foci."""
    return make_slide("small.svs", width=2048, height=1536, mpp=0.5, seed=0, tumour_tiles=2)


@pytest.fixture(scope="session")
def artefact_slide(make_slide) -> SyntheticSlide:
    """4096 x 3072 px at 0.5 um/px with pen strokes of every colour, dust specks, smudges and a tumour focus."""
    return make_slide("artefacts.svs", width=4096, height=3072, mpp=0.5, seed=1, tumour_tiles=1, pen_marks=True,
                      specks=True)
