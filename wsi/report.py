"""The run report: one self-contained ``OUT/report.html`` (images inlined, no network) over the cohort.

It reads only documented outputs: the stores (:mod:`wsi.store`), ``failures.csv``,
``OUT/predictions/<run>/predictions.csv``, the model run folder (``run.json``, ``metrics.json``, ``roc.png``)
and ``OUT/heatmaps/<run>/<slide>/``. Sections: provenance, metrics with 95% confidence intervals and the ROC
curve, the cohort table (slide, label, prediction, probabilities, tiles, MPP, failures) and a thumbnail per
slide linked to its heatmap files.

Metrics: for a training run, the cross-validated (out-of-fold) metrics of ``metrics.json``; the fold ensemble's
predictions on its own training slides are in-sample and are not scored. For a prediction run on slides
with labels, the metrics of those predictions are computed here (external validation).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

from PIL import Image

from . import __version__
from .errors import ConfigError, read_failures
from .store import SlideStore, open_cohort

_THUMB_PX = 280


def _img_data_uri(path: Path, max_px: int | None = None) -> str:
    image = Image.open(path).convert("RGB")
    if max_px:
        image.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    image.save(buf, format="PNG" if not max_px else "JPEG", quality=85)
    mime = "image/png" if not max_px else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _newest_run(out_dir: Path) -> str:
    runs = sorted((out_dir / "predictions").glob("*/predictions.csv"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(out_dir, "no predictions to report", "run `wsi predict` first or name --model-run")
    return runs[-1].parent.name


def _model_dir(out_dir: Path, run: str, config: dict) -> Path:
    if config.get("mode") == "predict" and config.get("model_dir"):
        return Path(config["model_dir"])
    return out_dir / "models" / run


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _figure_cell(fig: dict) -> str:
    lo, hi = fig.get("ci95", [None, None])
    return f"{_fmt(fig.get('value'))} <span class=ci>[{_fmt(lo)}, {_fmt(hi)}]</span>"


def _metrics_html(metrics: dict, title: str) -> str:
    rows = [f"<tr><th>AUROC ({html.escape(c)})</th><td>{_figure_cell(f)}</td></tr>"
            for c, f in metrics.get("auroc", {}).items()]
    if "auroc_macro" in metrics:
        rows.append(f"<tr><th>AUROC (macro)</th><td>{_figure_cell(metrics['auroc_macro'])}</td></tr>")
    for key, name in (("balanced_accuracy", "Balanced accuracy"), ("f1", "F1")):
        if key in metrics:
            rows.append(f"<tr><th>{name}</th><td>{_figure_cell(metrics[key])}</td></tr>")
    cm = metrics.get("confusion_matrix")
    cm_html = ""
    if cm:
        head = "".join(f"<th>pred {html.escape(c)}</th>" for c in cm["labels"])
        body = "".join(f"<tr><th>true {html.escape(c)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for c, row in zip(cm["labels"], cm["counts"]))
        cm_html = f"<table class=cm><tr><th></th>{head}</tr>{body}</table>"
    boot = metrics.get("bootstrap", {})
    note = (f"{metrics.get('n_slides', '?')} slides, {metrics.get('n_patients', '?')} patients; 95% CI from "
            f"{boot.get('resamples', '?')} bootstrap resamples by {boot.get('unit', 'slide')}")
    return (f"<h2>{html.escape(title)}</h2><p class=note>{html.escape(note)}</p>"
            f"<table>{''.join(rows)}</table>{cm_html}")


def _external_metrics(predictions: list[dict], labels: dict[str, str], classes: list[str]) -> dict | None:
    from .mil.metrics import classification_metrics

    rows = [r for r in predictions if labels.get(r["slide_id"]) in classes]
    if len(rows) < 2 or len({labels[r["slide_id"]] for r in rows}) < 2:
        return None
    y = [classes.index(labels[r["slide_id"]]) for r in rows]
    probs = [[float(r[f"prob_{c}"]) for c in classes] for r in rows]
    return classification_metrics(y, probs, classes)


def write_report(out_dir, config: dict, *, run: str | None = None) -> Path:
    """Write ``OUT/report.html`` for model run ``run`` (default: the newest predictions) and return its path."""
    out_dir = Path(out_dir)
    run = run or _newest_run(out_dir)
    model_dir = _model_dir(out_dir, run, config)
    pred_path = out_dir / "predictions" / run / "predictions.csv"
    predictions = _read_csv(pred_path) if pred_path.exists() else []
    by_slide = {r["slide_id"]: r for r in predictions}
    run_info = json.loads((model_dir / "run.json").read_text()) if (model_dir / "run.json").exists() else {}
    classes = [str(c) for c in run_info.get("classes", [])] or [
        k[len("prob_"):] for k in (predictions[0] if predictions else {}) if k.startswith("prob_")]
    labels = {}
    if config.get("labels") and Path(config["labels"]).exists():
        labels = {r["slide_id"]: r["label"] for r in _read_csv(Path(config["labels"]))}
    failures: dict[str, list[str]] = {}
    for f in read_failures(out_dir):
        failures.setdefault(f["slide_id"], []).append(f"{f['stage']}: {f['cause']}")
    stores = {s.slide_id: s for s in open_cohort(out_dir)}
    slide_ids = sorted(set(stores) | set(failures) | set(by_slide))

    sections = [_provenance_html(out_dir, run, model_dir, run_info, config)]
    if (model_dir / "metrics.json").exists() and config.get("mode") != "predict":
        sections.append(_metrics_html(json.loads((model_dir / "metrics.json").read_text()),
                                      "Cross-validated metrics (out-of-fold predictions)"))
        if (model_dir / "roc.png").exists():
            sections.append(f"<img class=roc alt='ROC curve' src='{_img_data_uri(model_dir / 'roc.png')}'>")
    elif classes and labels:
        external = _external_metrics(predictions, labels, classes)
        if external:
            sections.append(_metrics_html(external, "Metrics of these predictions against the labels table"))
    sections.append(_cohort_table(slide_ids, stores, by_slide, labels, classes, failures))
    sections.append(_heatmap_gallery(out_dir, run, slide_ids, by_slide))

    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>wsi report: {html.escape(run)}</title>"
           f"<style>{_CSS}</style></head><body><h1>wsi report: {html.escape(run)}</h1>{''.join(sections)}"
           "</body></html>")
    path = out_dir / "report.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(doc)
    os.replace(tmp, path)
    return path


def _provenance_html(out_dir: Path, run: str, model_dir: Path, run_info: dict, config: dict) -> str:
    items = [("wsi version", __version__), ("output folder", str(out_dir.resolve())), ("model run", run),
             ("model folder", str(model_dir)), ("model", run_info.get("model", {}).get("name", "–")),
             ("encoder", run_info.get("encoder", config.get("extract", {}).get("encoder", "–"))),
             ("mode", config.get("mode", "–"))]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items)
    cfg = html.escape(json.dumps(config, indent=1, sort_keys=True, default=str))
    return f"<h2>Provenance</h2><table>{rows}</table><details><summary>configuration</summary><pre>{cfg}</pre></details>"


def _cohort_table(slide_ids, stores: dict[str, SlideStore], by_slide, labels, classes, failures) -> str:
    head = "".join(f"<th>P({html.escape(c)})</th>" for c in classes)
    rows = []
    for sid in slide_ids:
        store, pred = stores.get(sid), by_slide.get(sid, {})
        label, predicted = labels.get(sid, ""), pred.get("predicted", "")
        cls = " class=wrong" if label and predicted and label != predicted else ""
        probs = "".join(f"<td>{_fmt(float(pred[f'prob_{c}'])) if f'prob_{c}' in pred else '–'}</td>" for c in classes)
        tiles = store.n_tiles if store else "–"
        mpp = f"{store.slide.mpp_x:.3f} ({store.slide.mpp_source})" if store else "–"
        fail = "<br>".join(html.escape(f) for f in failures.get(sid, []))
        rows.append(f"<tr{cls}><td>{html.escape(sid)}</td><td>{html.escape(label)}</td>"
                    f"<td>{html.escape(predicted)}</td>{probs}<td>{tiles}</td><td>{mpp}</td>"
                    f"<td class=fail>{fail}</td></tr>")
    n_fail = sum(1 for s in slide_ids if s in failures)
    return (f"<h2>Cohort ({len(slide_ids)} slides, {n_fail} with failures)</h2><table class=cohort><tr>"
            f"<th>slide</th><th>label</th><th>prediction</th>{head}<th>tiles</th><th>MPP (source)</th>"
            f"<th>failures</th></tr>{''.join(rows)}</table>")


def _heatmap_gallery(out_dir: Path, run: str, slide_ids, by_slide) -> str:
    cards = []
    for sid in slide_ids:
        folder = out_dir / "heatmaps" / run / sid
        overlay = folder / "overlay.png"
        if not overlay.exists():
            continue
        rel = os.path.relpath(folder, out_dir)
        links = " · ".join(f"<a href='{html.escape(rel)}/{name}'>{label}</a>" for name, label in (
            ("overlay.png", "overlay"), ("heatmap.tif", "pyramidal TIFF"), ("tiles.geojson", "QuPath GeoJSON"),
            ("top_tiles.png", "top tiles")) if (folder / name).exists())
        predicted = by_slide.get(sid, {}).get("predicted", "")
        cards.append(f"<figure><a href='{html.escape(rel)}/overlay.png'><img alt='{html.escape(sid)}' "
                     f"src='{_img_data_uri(overlay, _THUMB_PX)}'></a><figcaption><b>{html.escape(sid)}</b> "
                     f"{html.escape(predicted)}<br>{links}</figcaption></figure>")
    if not cards:
        return "<h2>Heatmaps</h2><p>No heatmaps for this run.</p>"
    return f"<h2>Heatmaps</h2><div class=gallery>{''.join(cards)}</div>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.ci{color:#666;font-size:90%}.note{color:#555}.wrong{background:#fff1f0}
.fail{color:#a00;font-size:90%}.roc{max-width:480px}.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:6px;width:300px}figure img{max-width:100%}
pre{background:#f7f7f7;padding:1em;font-size:85%}
"""
