"""The report as a pathologist opens it: real runs written into OUT, rendered by headless Chromium.

The cohort: small synthetic slides tiled for real (so thumbnails, masks, tiles and a failure come from the
tiler); each tile's features are drawn here from its ground truth (tumour tiles shifted), so a model trained
on them (real training on a Dask LocalCluster, real prediction and heatmaps) learns when the labels are true
and cannot when they are shuffled. A learning run on 10 + 10 slides must report no warning; a run on 4 + 4
slides with shuffled labels must open with both warnings.
"""

import csv
import html.parser
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi.config import load_config
from wsi.heatmap import HeatmapConfig, heatmaps
from wsi.mil import PredictConfig, TrainConfig, predict, train
from wsi.report import MIN_SLIDES_PER_CLASS, ReportConfig, write_report
from wsi.slide import expand_slide_paths
from wsi.store import FeatureAttrs, SlideStore, store_path
from wsi.tiling import TileConfig, tile_slides
from wsi_synth import write_synthetic_slide

ENCODER = "toy-encoder"
DIM = 16
SECTIONS = ("performance", "heatmaps", "in-sample", "slides", "failures", "provenance")
WARNING_RGB = (255, 244, 214)  # the warning box's background (#fff4d6 in wsi.report's CSS)


def config_for(labels: Path, run_name: str, cluster, **mil) -> dict:
    return load_config(overrides={
        "labels": str(labels), "extract": {"encoder": ENCODER},
        "cluster": {"kind": "address", "address": cluster.scheduler_address},
        "mil": {"run_name": run_name, "hidden_dim": 32, "dropout": 0.1, "folds": 3, "epochs": 10, "min_epochs": 4,
                "patience": 3, "lr": 5e-3, "bootstrap": 200, **mil}})


def tumour_share(coords: np.ndarray, size: float, boxes) -> np.ndarray:
    """Share of each tile's level-0 footprint inside the tumour boxes."""
    share = np.zeros(len(coords))
    for x0, y0, x1, y1 in boxes:
        w = np.clip(np.minimum(coords[:, 0] + size, x1) - np.maximum(coords[:, 0], x0), 0, None)
        h = np.clip(np.minimum(coords[:, 1] + size, y1) - np.maximum(coords[:, 1], y0), 0, None)
        share += w * h / size**2
    return share


def write_features(store: SlideStore, tumour: np.ndarray, rng) -> None:
    x = rng.normal(size=(store.n_tiles, DIM)).astype(np.float32)
    x[tumour, :8] += 2.5
    store.create_features(ENCODER, DIM, chunk_tiles=32)[:] = x
    store.complete_features(ENCODER, FeatureAttrs(
        encoder=ENCODER, dim=DIM, weights_source="test", weights_sha256="a" * 64, input_size=(3, 8, 8),
        interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), precision="fp32"))


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """OUT with 20 tiled slides (10 with tumour foci: copies of four slides under other names, which keeps the
    test fast) and their features, a corrupt slide in failures.csv, and the true labels table."""
    root = tmp_path_factory.mktemp("report")
    slides, out = root / "slides", root / "out"
    templates = {("normal", k): write_synthetic_slide(root / f"normal{k}.svs", width=2048, height=1536, mpp=0.5,
                                                      seed=k) for k in range(2)}
    templates.update({("tumour", k): write_synthetic_slide(root / f"tumour{k}.svs", width=3072, height=2304,
                                                           mpp=0.5, seed=k, tumour_tiles=3) for k in range(2)})
    slides.mkdir()
    truth, rows = {}, []
    for i in range(20):
        label, sid = ("tumour" if i % 2 else "normal"), f"case{i:02d}"
        truth[sid] = templates[label, i // 2 % 2]
        shutil.copy(truth[sid].path, slides / f"{sid}.svs")
        rows.append({"slide_id": sid, "label": label, "patient_id": f"p{i:02d}"})
    (slides / "broken.svs").write_bytes(b"II*\x00" + os.urandom(2048))
    tile_slides(out, TileConfig.from_config(load_config()), expand_slide_paths([slides]), progress=False)
    rng = np.random.default_rng(0)
    for sid, slide in truth.items():
        store = SlideStore.open(store_path(out, sid))
        write_features(store, tumour_share(store.coords, store.tiling.tile_px_level0, slide.tumour_boxes) > 0.3, rng)
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label", "patient_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out, labels, rows


def run_and_report(out: Path, labels: Path, run_name: str, painted: list[str], cluster) -> Path:
    """Train (on ``cluster``), predict, paint the heatmaps of ``painted`` slides (all of them take a while) and
    report."""
    config = config_for(labels, run_name, cluster)
    run_dir = train(out, TrainConfig.from_config(config), progress=False).outputs["model run"]
    predict(out, PredictConfig.from_config(config), run_dir)
    if painted:
        heatmaps(out, HeatmapConfig.from_config(config), run_dir.name, slide_ids=painted, progress=False)
    return write_report(out, ReportConfig.from_config(config), run=run_dir.name).outputs["report"]


PAINTED = ["case00", "case01", "case02", "case03", "case04", "case05"]


@pytest.fixture(scope="module")
def learning_report(tiled, dask_cluster):
    out, labels, _ = tiled
    return run_and_report(out, labels, "learns", PAINTED, dask_cluster)


@pytest.fixture(scope="module")
def chance_report(tiled, tmp_path_factory, dask_cluster):
    """4 + 4 slides whose labels are shuffled against their tumour foci, in an OUT of its own."""
    out, _, rows = tiled
    root = tmp_path_factory.mktemp("chance")
    picked = rows[:8]  # true labels alternate normal, tumour; these agree with them on 4 slides of 8
    shuffled = ["tumour", "tumour", "normal", "normal", "tumour", "tumour", "normal", "normal"]
    for r in picked:
        shutil.copytree(store_path(out, r["slide_id"]), store_path(root / "out", r["slide_id"]))
    shutil.copy2(out / "failures.csv", root / "out" / "failures.csv")
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n"
                      + "".join(f"{r['slide_id']},{lab},{r['patient_id']}\n" for r, lab in zip(picked, shuffled)))
    return run_and_report(root / "out", labels, "chance", [], dask_cluster)


# ------------------------------------------------------------------------------------------ the DOM
class Sections(html.parser.HTMLParser):
    """Text of each <section id=...> and the <img> count inside it, from Chromium's serialised DOM."""

    def __init__(self):
        super().__init__()
        self.text, self.images, self.stack = {}, {}, []

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.stack.append(dict(attrs)["id"])
            self.text[self.stack[-1]], self.images[self.stack[-1]] = "", 0
        elif tag == "img" and self.stack:
            self.images[self.stack[-1]] += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self.stack.pop()

    def handle_data(self, data):
        if self.stack:
            self.text[self.stack[-1]] += data


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("no chromium in CI: .ci/run installs Debian's chromium package")
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def render(report: Path, tmp_path: Path) -> tuple[Sections, np.ndarray]:
    """Chromium's DOM of the report (sections) and a 1400 px wide screenshot of the whole page."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<section" in dom.stdout, dom.stderr[-2000:]
    sections = Sections()
    sections.feed(dom.stdout)
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1400,7000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return sections, np.asarray(Image.open(shot).convert("RGB"))


def count(pixels: np.ndarray, rgb) -> int:
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= 2).sum())


@pytest.mark.slow
def test_learning_run_reports_out_of_fold_figures_apart_from_in_sample_calls(learning_report, tiled, tmp_path):
    out, _, rows = tiled
    sections, pixels = render(learning_report, tmp_path)
    assert set(SECTIONS) <= set(sections.text) and "warnings" not in sections.text
    assert count(pixels, WARNING_RGB) == 0

    performance = sections.text["performance"]
    assert "Cross-validated metrics (out-of-fold predictions)" in performance
    assert "Out-of-fold predictions per slide" in performance
    with open(out / "models" / "learns" / "cv_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert len(oof) == len(rows)
    for r in oof:  # every out-of-fold call is shown under performance, with its fold
        assert f"{r['slide_id']}{r['label']}{r['fold']}{float(r['prob_normal']):.3f}" in performance
    assert "in-sample" in sections.text["in-sample"] and "not a measure of performance" in sections.text["in-sample"]
    with open(out / "predictions" / "learns" / "predictions.csv", newline="") as f:
        final = {r["slide_id"]: r for r in csv.DictReader(f)}
    for r in oof:  # the final model's call lives in the in-sample section, never under performance
        assert f"{r['slide_id']}{r['label']}{float(final[r['slide_id']]['prob_normal']):.3f}" in \
            sections.text["in-sample"]

    # one legible card per slide: label, out-of-fold and final calls, the colour scale
    assert sections.images["heatmaps"] == len(PAINTED)
    gallery = sections.text["heatmaps"]
    for sid in PAINTED:
        assert sid in gallery
    assert gallery.count("out-of-fold:") == gallery.count("final model:") == len(PAINTED)
    assert gallery.count("P(tumour) per tile") == len(PAINTED) and gallery.count("label: tumour") == 3
    page = learning_report.read_text()
    assert all(f"/slide?id={r['slide_id']}'" in page for r in rows)  # every slide links into wsi view
    assert "broken" in sections.text["failures"] and "tile" in sections.text["failures"]
    assert "with failures" in sections.text["slides"]


@pytest.mark.slow
def test_chance_run_on_a_small_cohort_opens_with_both_warnings(chance_report, tmp_path):
    sections, pixels = render(chance_report, tmp_path)
    warning = sections.text.get("warnings", "")
    assert "includes 0.5 (chance)" in warning
    assert f"fewer than {MIN_SLIDES_PER_CLASS} per class" in warning
    assert "only 4 normal, 4 tumour slides (8 in all)" in warning
    assert count(pixels, WARNING_RGB) > 100 * 1000  # the box is drawn, not hidden
    assert "broken" in sections.text["failures"]
