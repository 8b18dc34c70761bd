"""The run report: one ``OUT/report.html`` (no network) over the cohort; the first :data:`_INLINE_CARDS` heatmap
pictures are inlined, later ones load from ``OUT/heatmaps`` as they are scrolled to (the report stays a few MB at
10,000 slides). Every slide links to its page in ``wsi view`` (:mod:`wsi.viewer`).

It reads only documented outputs: the stores (:mod:`wsi.store`), ``failures.csv``, the labels table,
``OUT/predictions/<run>/predictions.csv``, the model run folder (``run.json``, ``cv_predictions.csv``,
``metrics.json``, ``roc.png``; :mod:`wsi.mil.training`) and ``OUT/heatmaps/<run>/<slide>/`` (``overlay.png``,
``heatmap.json``; :mod:`wsi.heatmap`).

What a reader can trust is kept apart from what they cannot:

* **Performance** is measured only on predictions from models that never trained on the slide: for a training
  run, the out-of-fold predictions of cross-validation (``cv_predictions.csv``, scored in ``metrics.json``), shown
  with their per-slide table; for a prediction run, the predictions of slides that have a label and were not in
  the model's training cohort (external validation, scored by predict in ``predictions/<run>/metrics.json``), with
  the model's own cross-validated figures beside them for reference. With a site column in the labels table, both
  give the figures per site too, and a site holding one class is named among the warnings.
* **The final model's predictions on its own training slides** (the fold ensemble, each of whose members
  trained on all but one fold) are in-sample: they are listed in their own, labelled section and never scored.
* **Warnings** open the report when a shown AUROC's 95% interval includes 0.5 (or has no interval), when a
  class has fewer than :data:`MIN_SLIDES_PER_CLASS` slides, or when slides exceed the slide-QC limits
  (:data:`wsi.qc.REPORT_LIMITS`: percent of their tissue in blurred, fold or bubble tiles, from ``OUT/qc.csv``)
  or failed QC; the section ``quality`` lists every QC'd slide, those over a limit first.

Then come the heatmaps (each slide's overlay panel with its label, out-of-fold and final predictions, and the
colour scale), the per-slide quality table (tiles, MPP), the failures (``failures.csv``) and the provenance.
Each section is an HTML ``<section>`` with a fixed ``id`` (``warnings``, ``performance``, ``heatmaps``,
``predictions``, ``in-sample``, ``slides``, ``quality``, ``failures``, ``provenance``) for scripts and tests.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image

from . import __version__, atomic
from . import qc as slide_qc
from .config import StageConfig, scoring_run_dir
from .errors import ConfigError
from .failures import read_failures
from .layout import Layout
from .runner import StageSummary
from .store import OOD_WARNING, open_cohort
from .viewer import slide_url

# Below this many slides in a class, each cross-validation fold trains on a handful of bags and the AUROC
# interval spans most of [0, 1]: the figures say the pipeline runs, not that the model works.
MIN_SLIDES_PER_CLASS = 10
_THUMB_PX = 400       # heatmap panel width in the gallery (three to a row in a 1400 px window)
_SCALE_STOPS = 11     # colour-bar gradient stops
# Cards whose picture is inlined; later ones load their overlay.png from OUT as they are scrolled to, so a report
# of 10,000 slides is a few MB rather than 250 (inlined, a card is about 25 KB).
_INLINE_CARDS = 60


def _img_data_uri(image: Image.Image | Path, max_px: int | None = None) -> str:
    image = (Image.open(image) if isinstance(image, Path) else image).convert("RGB")
    if max_px:
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if max_px else "PNG", quality=88)
    mime = "image/jpeg" if max_px else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _newest_run(out_dir: Path) -> str:
    runs = sorted(Layout(out_dir).predictions_csvs(), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(out_dir, "no predictions to report", "run `wsi predict` first or name --model-run")
    return runs[-1].parent.name


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _esc(value) -> str:
    return html.escape(str(value))


def _section(anchor: str, title: str, body: str, css: str = "") -> str:
    cls = f" class={css}" if css else ""
    return f"<section id={anchor}{cls}><h2>{_esc(title)}</h2>{body}</section>"


# ------------------------------------------------------------------------------------------ metrics
def _figure_cell(fig: dict) -> str:
    lo, hi = fig.get("ci95") or [None, None]
    return f"{_fmt(fig.get('value'))} <span class=ci>[{_fmt(lo)}, {_fmt(hi)}]</span>"


def _auroc_figures(metrics: dict) -> list[tuple[str, dict]]:
    figures = list(metrics.get("auroc", {}).items())
    if "auroc_macro" in metrics:
        figures.append(("macro", metrics["auroc_macro"]))
    return figures


def _metrics_html(metrics: dict, title: str, intro: str, roc: Path | None = None) -> str:
    """The figures table, confusion matrix, calibration note, the ROC curve and the reliability diagram beside
    ``roc`` (``reliability.png``), and the per-site table."""
    rows = [f"<tr><th>AUROC ({_esc(c)})</th><td>{_figure_cell(f)}</td></tr>" for c, f in _auroc_figures(metrics)]
    for key, name in (("balanced_accuracy", "Balanced accuracy"), ("f1", "F1"), ("brier", "Brier score"),
                      ("ece", "Expected calibration error")):
        if key in metrics:
            rows.append(f"<tr><th>{name}</th><td>{_figure_cell(metrics[key])}</td></tr>")
    cm = metrics.get("confusion_matrix")
    cm_html = ""
    if cm:
        head = "".join(f"<th>predicted {_esc(c)}</th>" for c in cm["labels"])
        body = "".join(f"<tr><th>true {_esc(c)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for c, row in zip(cm["labels"], cm["counts"]))
        cm_html = f"<table class=cm><tr><th></th>{head}</tr>{body}</table>"
    boot = metrics.get("bootstrap", {})
    support = ", ".join(f"{n} {c}" for c, n in zip(metrics.get("classes", []), metrics.get("support", [])))
    note = (f"{metrics.get('n_slides', '?')} slides ({support}), {metrics.get('n_patients', '?')} patients; "
            f"95% intervals from {boot.get('resamples', '?')} bootstrap resamples by {boot.get('unit', 'slide')}")
    images = [(roc, "ROC curve")] + ([(roc.with_name("reliability.png"), "reliability diagram")] if roc else [])
    roc_html = "".join(f"<img class=roc alt='{alt}' src='{_img_data_uri(path)}'>" for path, alt in images
                       if path and path.exists())
    calibration = metrics.get("calibration")
    if calibration and calibration.get("temperature") is not None:
        before = calibration["uncalibrated"]
        how = (f"temperature {calibration['temperature']:.2f}" if calibration.get("method") != "site" else
               f"each site's own temperature and offsets ({len(calibration.get('sites', {}))} sites; other sites: "
               f"temperature {calibration['temperature']:.2f})")
        note += (f". Probabilities calibrated by {how} (Brier and ECE "
                 f"{calibration['measured'].split(':')[0]}; uncalibrated: Brier {before['brier']:.3f}, ECE "
                 f"{before['ece']:.3f}). Calibration lets n slides of a class vouch for at most about (n + 1) / "
                 "(n + 2) confidence: where every call is right, the ECE measures that cap, not a fault")
    if "max_wrong_confidence" in metrics:
        note += (f". Most confident wrong call: p = {metrics['max_wrong_confidence']:.2f}; wrong calls above 0.95: "
                 f"{metrics['confident_wrong']}")
    return (f"<h3>{_esc(title)}</h3><p>{_esc(intro)}</p><p class=note>{_esc(note)}</p>"
            f"<div class=figures><div><table>{''.join(rows)}</table>{cm_html}</div>{roc_html}</div>"
            f"{_per_site_html(metrics)}")


def _per_site_html(metrics: dict) -> str:
    """AUROC, balanced accuracy and ECE within each site (``per_site``), or nothing without sites."""
    per_site = metrics.get("per_site")
    if not per_site:
        return ""
    classes = metrics.get("classes", [])
    rows = []
    for site, m in per_site.items():
        support = ", ".join(f"{n} {c}" for c, n in zip(classes, m.get("support", [])))
        auroc = "".join(f"<td>{_figure_cell(f)}</td>" for _, f in _auroc_figures(m))
        ece = f"<td>{_figure_cell(m['ece'])}</td>" if "ece" in m else "<td></td>"  # older runs: none
        rows.append(f"<tr><td>{_esc(site)}</td><td>{_esc(support)}</td>{auroc}"
                    f"<td>{_figure_cell(m['balanced_accuracy'])}</td>{ece}</tr>")
    head = "".join(f"<th>AUROC ({_esc(c)})</th>" for c, _ in _auroc_figures(next(iter(per_site.values()))))
    return ("<h4>Per site</h4><p class=note>The same figures within each site (the labels table's site column). A "
            "model that learnt a site's stain rather than the tissue scores well pooled and near chance within "
            "a site; a site with one class has no AUROC.</p>"
            f"<table class=sites><tr><th>site</th><th>slides</th>{head}<th>Balanced accuracy</th>"
            "<th>Expected calibration error</th></tr>"
            f"{''.join(rows)}</table>")


def _warnings(scope: str, metrics: dict) -> list[str]:
    """Why the figures of ``metrics`` (``scope`` says which) must not be read as evidence that the model works."""
    out = []
    for name, fig in _auroc_figures(metrics):
        value, (lo, hi) = fig.get("value"), fig.get("ci95") or [None, None]
        if value is None or lo is None or hi is None:
            out.append(f"{scope}: the AUROC ({name}) has no 95% interval (a class too rare in the resamples, or "
                       "no bootstrap), so how good the model is cannot be told.")
        elif lo <= 0.5 <= hi:
            out.append(f"{scope}: AUROC ({name}) {value:.2f} with a 95% interval of [{lo:.2f}, {hi:.2f}], which "
                       "includes 0.5 (chance). The model may be no better than a coin toss on these slides: do "
                       "not read its predictions or heatmaps as findings.")
    for site, m in (metrics.get("per_site") or {}).items():
        present = [c for c, n in zip(metrics.get("classes", []), m.get("support", [])) if n]
        if len(present) == 1:
            out.append(f"{scope}: site {site} holds only {present[0]} slides, so its label is confounded with its "
                       "stain and scanner: a model can score well by recognising the site. Cross-validate with "
                       "mil.cv: site, and read the per-site figures.")
    small = [(c, n) for c, n in zip(metrics.get("classes", []), metrics.get("support", []))
             if n < MIN_SLIDES_PER_CLASS]
    if small:
        counts = ", ".join(f"{n} {c}" for c, n in small)
        out.append(f"{scope}: only {counts} slides ({metrics.get('n_slides', '?')} in all); fewer than "
                   f"{MIN_SLIDES_PER_CLASS} per class is too few to learn from or to measure: these figures show "
                   "that the pipeline runs, not that the model works.")
    return out


# ------------------------------------------------------------------------------------------ tables
def _prediction_table(rows: list[dict], classes: list[str], labels: dict, *, fold: bool = False) -> str:
    """One row per slide: id, label, [fold], P(class)..., predicted, OOD score (flagged ones marked); a wrong call
    is shaded."""
    head = "<th>slide</th><th>label</th>" + ("<th>fold</th>" if fold else "") + "".join(
        f"<th>P({_esc(c)})</th>" for c in classes) + "<th>predicted</th><th>OOD score</th>"
    body = []
    for r in sorted(rows, key=lambda r: r["slide_id"]):
        label = r.get("label") or labels.get(r["slide_id"], ("",))[0]
        wrong = " class=wrong" if label in classes and label != r["predicted"] else ""
        probs = "".join(f"<td>{_fmt(float(r[f'prob_{c}']))}</td>" for c in classes)
        body.append(f"<tr{wrong}><td>{_esc(r['slide_id'])}</td><td>{_esc(label)}</td>"
                    + (f"<td>{_esc(r.get('fold', ''))}</td>" if fold else "")
                    + f"{probs}<td>{_esc(r['predicted'])}</td>"
                    + f"<td{' class=ood' if _is_ood(r) else ''}>{_esc(r.get('ood_score') or '–')}"
                    + f"{' ⚠ unlike the training slides' if _is_ood(r) else ''}</td></tr>")
    return f"<table class=slides><tr>{head}</tr>{''.join(body)}</table>"


def _slides_table(slide_ids, stores, labels, failures) -> str:
    rows = []
    for sid in slide_ids:
        store = stores.get(sid)
        mpp = f"{store.slide.mpp_x:.3f} ({_esc(store.slide.mpp_source)})" if store else "–"
        status = "failed" if sid in failures else "ok"
        rows.append(f"<tr><td><a href='{_esc(slide_url(sid))}'>{_esc(sid)}</a></td>"
                    f"<td>{_esc(labels.get(sid, ('',))[0])}</td>"
                    f"<td>{store.n_tiles if store else '–'}</td><td>{mpp}</td>"
                    f"<td class={status}>{status}</td></tr>")
    return ("<table class=slides><tr><th>slide</th><th>label</th><th>tiles</th><th>MPP (source)</th>"
            f"<th>status</th></tr>{''.join(rows)}</table>")


def _failures_table(failures: list[dict]) -> str:
    if not failures:
        return "<p>No slide failed.</p>"
    rows = "".join(f"<tr><td>{_esc(f['slide_id'])}</td><td>{_esc(f['stage'])}</td><td>{_esc(f['source'])}</td>"
                   f"<td class=fail>{_esc(f['cause'])}</td></tr>" for f in failures)
    return (f"<p>{len(failures)} failure(s), one row per slide and stage (<code>failures.csv</code>); the other "
            "slides carried on.</p><table class=slides><tr><th>slide</th><th>stage</th><th>file</th>"
            f"<th>cause</th></tr>{rows}</table>")


# ------------------------------------------------------------------------------------------ heatmaps
def _quality_table(rows: list[dict]) -> str:
    """``qc.csv`` as a table, the slides over a limit (or failed) first and marked."""
    limits = ", ".join(f"{k.removesuffix('_pct')} {v:g}%" for k, v in slide_qc.REPORT_LIMITS.items())
    marked = [(bool(slide_qc.over_limits(r)) or r.get("status") == "failed", r) for r in rows]
    body = "".join(
        f"<tr{' class=fail' if bad else ''}><td>{_esc(r['slide_id'])}</td>"
        + "".join(f"<td>{_esc(r.get(k, ''))}</td>" for k in ("blur_pct", "fold_pct", "bubble_pct", "focus_median",
                                                               "excluded_tiles", "status"))
        + f"<td>{_esc('; '.join(slide_qc.over_limits(r)) or r.get('cause', ''))}</td></tr>"
        for bad, r in sorted(marked, key=lambda t: (not t[0], t[1]["slide_id"])))
    return (f"<p>Percent of each slide's tissue in tiles flagged blurred, fold or bubble (<code>qc.csv</code>, "
            f"<code>tiling.qc</code>: flag marks them, exclude leaves them out of the features and the model); "
            f"limits: {limits}. The QC image <code>qc/&lt;slide&gt;.png</code> shows blurred tiles in blue, folds "
            f"in yellow and bubbles in cyan.</p><table><tr><th>slide</th><th>blur %</th><th>fold %</th>"
            f"<th>bubble %</th><th>focus (median)</th><th>excluded tiles</th><th>status</th><th>over limits</th>"
            f"</tr>{body}</table>")


def _panel(overlay: Path) -> Image.Image:
    """The overlay's slide panel, without its title and colour-bar strips (the report writes those as text,
    legibly); the box is in the PNG's Description (:mod:`wsi.heatmap.images`)."""
    image = Image.open(overlay)
    try:
        x, y, w, h = json.loads(image.text["Description"])["panel"]
        return image.crop((x, y, x + w, y + h))
    except (KeyError, ValueError, TypeError, AttributeError):  # an overlay from elsewhere: show it whole
        return image


def _colour_scale(colormap: str, subject: str) -> str:
    from .heatmap.raster import colour_table

    table = colour_table(colormap)
    stops = ", ".join("rgb({},{},{})".format(*table[round(i * 255 / (_SCALE_STOPS - 1))])
                      for i in range(_SCALE_STOPS))
    return (f"<div class=scale><div class=bar style='background:linear-gradient(to right, {stops})'></div>"
            f"<div class=ticks><span>0</span><span>0.5</span><span>1</span></div>"
            f"<div class=subject>{_esc(subject)}</div></div>")


def _call(row: dict | None, cls: str) -> str:
    if not row:
        return "–"
    return f"<b>{_esc(row['predicted'])}</b>, P({_esc(cls)}) {float(row[f'prob_{cls}']):.2f}"


def _heatmap_card(out_dir: Path, folder: Path, sid: str, label: str, oof: dict | None, final: dict | None,
                  in_sample: bool, classes: list[str], inline: bool) -> str:
    doc = _read_json(folder / "heatmap.json")
    params = doc.get("params", {})
    cls = params.get("tumour_class") or (classes[-1] if classes else "")
    if params.get("value") == "attention":
        subject = "attention" + (" (rank within slide)" if params.get("normalize") == "percentile" else "")
    else:
        subject = f"P({cls}) per tile" + (" (rank within slide)" if params.get("normalize") == "percentile"
                                           else "")
    rel = os.path.relpath(folder, Layout(out_dir).report.parent)  # links from the report
    links = " · ".join([f"<a href='{_esc(slide_url(sid))}'>viewer</a>"] + [
        f"<a href='{_esc(rel)}/{name}'>{text}</a>" for name, text in (
        ("overlay.png", "overlay"), ("heatmap.tif", "pyramidal TIFF"), ("tiles.geojson", "QuPath GeoJSON"),
        ("top_tiles.png", "top tiles")) if (folder / name).exists()])
    lines = [f"<div class=title>{_esc(sid)}</div>", f"<div>label: <b>{_esc(label or 'none')}</b></div>"]
    if oof:
        lines.append(f"<div>out-of-fold: {_call(oof, cls)} <span class=tag>fold {_esc(oof.get('fold', '?'))}"
                     "</span></div>")
    tag = "<span class='tag insample'>in-sample</span>" if in_sample else ""
    lines.append(f"<div>final model: {_call(final, cls)} {tag}</div>")
    if _is_ood(final) or _is_ood(oof):
        score = (oof if _is_ood(oof) else final)["ood_score"]
        lines.append(f"<div class=ood>⚠ {_esc(OOD_WARNING)} (OOD score {_esc(score)})</div>")
    image = _img_data_uri(_panel(folder / "overlay.png"), _THUMB_PX) if inline else f"{_esc(rel)}/overlay.png"
    return (f"<figure><a href='{_esc(rel)}/overlay.png'><img loading=lazy alt='heatmap of {_esc(sid)}' "
            f"src='{image}'></a>"
            f"<figcaption>{''.join(lines)}{_colour_scale(params.get('colormap', 'viridis'), subject)}"
            f"<div class=links>{links}</div></figcaption></figure>")


def _is_ood(row: dict | None) -> bool:
    """A predictions row (csv text) flagged out of distribution."""
    return bool(row) and row.get("ood") == "True"


# ------------------------------------------------------------------------------------------ the report
@dataclass(frozen=True)
class ReportConfig(StageConfig):
    """The sections the report reads (:meth:`~wsi.config.StageConfig.from_config`); its provenance shows them."""

    stage: ClassVar[str] = "report"
    labels: str | None
    mode: str
    model_dir: str | None
    extract: dict
    mil: dict
    heatmap: dict


def write_report(out_dir, params: ReportConfig, *, run: str | None = None) -> StageSummary:
    """Write ``OUT/report.html`` for model run ``run`` (default: the newest predictions): the summary's output
    ``report``."""
    out_dir, layout = Path(out_dir), Layout(out_dir)
    run = run or _newest_run(out_dir)
    config = asdict(params)
    model_dir = scoring_run_dir(config, layout, run)
    predict_mode = config.get("mode") == "predict"
    predictions = _read_csv(layout.predictions_csv(run))
    by_slide = {r["slide_id"]: r for r in predictions}
    run_info = _read_json(model_dir / "run.json")
    oof_rows = _read_csv(model_dir / "cv_predictions.csv")
    trained = {r["slide_id"]: r for r in oof_rows}  # the model's training cohort, with its out-of-fold calls
    classes = [str(c) for c in run_info.get("classes", [])] or [
        k[len("prob_"):] for k in (predictions or oof_rows or [{}])[0] if k.startswith("prob_")]
    labels: dict[str, tuple[str, str]] = {}  # slide id -> (label, patient id)
    if config.get("labels") and Path(config["labels"]).is_file():
        from .mil import read_labels

        table = read_labels(config["labels"])
        labels = dict(zip(table["slide_id"], zip(table["label"], table["patient_id"])))
    labels.update({r["slide_id"]: (r["label"], r["patient_id"]) for r in oof_rows if r["slide_id"] not in labels})
    failure_rows = read_failures(out_dir)
    failures = {f["slide_id"] for f in failure_rows}
    stores = {s.slide_id: s for s in open_cohort(out_dir)}
    slide_ids = sorted(set(stores) | failures | set(by_slide) | (set() if predict_mode else set(trained)))

    # performance: only predictions of models that never saw the slide
    cv_metrics = _read_json(model_dir / "metrics.json")
    blocks, warnings = [], []
    if predict_mode:
        external = _read_json(out_dir / "predictions" / run / "metrics.json")
        if external:
            blocks.append(_metrics_html(external, "Metrics on these slides (external validation)",
                                        "Predictions of slides with a label that the model never trained on "
                                        "(predictions/<run>/metrics.json).",
                                        out_dir / "predictions" / run / "roc.png"))
            warnings += _warnings("On these slides", external)
        else:
            blocks.append("<p>No labelled slides outside the model's training cohort: the model's performance on "
                          "these slides cannot be measured here.</p>")
    if cv_metrics:
        blocks.append(_metrics_html(
            cv_metrics, ("The model's cross-validated metrics on its own training cohort" if predict_mode
                         else "Cross-validated metrics (out-of-fold predictions)"),
            "Every slide was predicted by the fold model that did not train on it (cv_predictions.csv). These are "
            "the figures to quote.", model_dir / "roc.png"))
        warnings += _warnings("The model's own cross-validation" if predict_mode else "Cross-validated", cv_metrics)
        if not predict_mode:
            blocks.append(f"<h3>Out-of-fold predictions per slide</h3>"
                          f"{_prediction_table(oof_rows, classes, labels, fold=True)}")
    elif not predict_mode:
        warnings.append(f"No cross-validated metrics in {model_dir}: nothing here measures how well the model "
                        "works.")

    painted = [sid for sid in slide_ids if (layout.heatmap_dir(run, sid) / "overlay.png").exists()]
    cards = [_heatmap_card(out_dir, layout.heatmap_dir(run, sid), sid, labels.get(sid, ("",))[0],
                           trained.get(sid) if not predict_mode else None, by_slide.get(sid), sid in trained,
                           classes, inline=n < _INLINE_CARDS)
             for n, sid in enumerate(painted)]
    calls = ("the final model's prediction" if predict_mode else "its out-of-fold prediction (the honest one) and "
             "the final model's (in-sample: the model that paints the heatmap trained on the slide)")
    gallery = (f"<p>Each slide's heatmap over its thumbnail, with its label and {calls} under it; click a picture "
               "for the full overlay, or <i>viewer</i> for the slide at full resolution under its heatmap (start "
               f"it with <code>wsi view {_esc(out_dir)} --run {_esc(run)}</code>).</p>"
               f"<div class=gallery>{''.join(cards)}</div>" if cards else "<p>No heatmaps for this run.</p>")

    unlike = sorted(r["slide_id"] for r in predictions if r["slide_id"] not in trained and _is_ood(r))
    if unlike:
        warnings.append(f"{len(unlike)} slide(s) are unlike the slides this model was trained on (out-of-"
                        f"distribution score above 1): {', '.join(unlike[:8])}{' ...' if len(unlike) > 8 else ''}. "
                        "Their predictions may be wrong however confident they look.")
    qc_rows = slide_qc.read_qc(out_dir)
    over = [(r, slide_qc.over_limits(r)) for r in qc_rows]
    over = [(r, why) for r, why in over if why or r.get("status") == "failed"]
    if over:
        named = ", ".join(f"{r['slide_id']} ({'; '.join(why) or r.get('cause') or 'failed'})" for r, why in over[:8])
        warnings.append(f"{len(over)} slide(s) failed slide quality control or exceed its limits (percent of the "
                        f"tissue in blurred, fold or bubble tiles): {named}{' ...' if len(over) > 8 else ''}. "
                        "Check their QC images (qc/<slide>.png) before trusting their calls; see Slide quality "
                        "control below.")
    new = [r for r in predictions if r["slide_id"] not in trained]
    in_sample = [r for r in predictions if r["slide_id"] in trained]
    sections = []
    if warnings:
        sections.append(_section("warnings", "Read this first", "".join(f"<p>⚠ {_esc(w)}</p>" for w in warnings),
                                 "warning"))
    sections.append(_section("performance", "Performance", "".join(blocks)))
    sections.append(_section("heatmaps", "Heatmaps", gallery))
    if new:
        sections.append(_section("predictions", "Predictions" if predict_mode else
                                 "Predictions on slides outside the training cohort",
                                 f"<p>The final model (the ensemble of the fold models) on slides it never trained "
                                 f"on.</p>{_prediction_table(new, classes, labels)}"))
    if in_sample:
        sections.append(_section(
            "in-sample", "Final model on its own training slides (in-sample: not a measure of performance)",
            "<p class=insample-note>The final model is the ensemble of the fold models, and each of these slides "
            "trained all of them but one. Agreement with the labels here is expected and says nothing about new "
            "slides; quote the cross-validated figures above. Kept for checking the heatmaps, which are painted "
            f"by this model.</p>{_prediction_table(in_sample, classes, labels)}", "insample"))
    sections.append(_section("slides", f"Slides ({len(slide_ids)}, {len(failures & set(slide_ids))} with failures)",
                             _slides_table(slide_ids, stores, labels, failures)))
    if qc_rows:
        sections.append(_section("quality", "Slide quality control", _quality_table(qc_rows)))
    sections.append(_section("failures", "Failures", _failures_table(failure_rows)))
    sections.append(_section("provenance", "Provenance",
                             _provenance_html(out_dir, run, model_dir, run_info, config)))

    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>wsi report: {_esc(run)}</title>"
           f"<style>{_CSS}</style></head><body><h1>wsi report: {_esc(run)}</h1>"
           f"<p class=note>{'prediction run' if predict_mode else 'training run'} · {len(slide_ids)} slides · "
           f"wsi {__version__}</p>{''.join(sections)}</body></html>")
    return StageSummary("report", outputs={"report": atomic.write_text(layout.report, doc)})


def _provenance_html(out_dir: Path, run: str, model_dir: Path, run_info: dict, config: dict) -> str:
    items = [("wsi version", __version__), ("output folder", str(out_dir.resolve())), ("model run", run),
             ("model folder", str(model_dir)), ("model", run_info.get("model", {}).get("name", "–")),
             ("encoder", run_info.get("encoder", config.get("extract", {}).get("encoder", "–"))),
             ("classes", ", ".join(map(str, run_info.get("classes", []))) or "–"),
             ("mode", config.get("mode", "–"))]
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    cfg = _esc(json.dumps(config, indent=1, sort_keys=True, default=str))
    return f"<table>{rows}</table><details><summary>configuration</summary><pre>{cfg}</pre></details>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px;font-size:15px}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.ci{color:#666;font-size:90%}.note{color:#555}.wrong{background:#ffe3e0}
.fail,.failed{color:#a00}.roc{max-width:420px}.figures{display:flex;gap:2em;align-items:flex-start;flex-wrap:wrap}
.warning{background:#fff4d6;border:2px solid #d08a00;padding:.2em 1em;margin:1em 0}
.warning h2{border:0;color:#8a4b00}.warning p{font-size:16px}
.insample{background:#f4f4f4;border:1px dashed #999;padding:.2em 1em;color:#444}
.insample h2{color:#555}.insample-note{font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #ccc;padding:8px;width:400px;background:#fafafa}figure img{width:100%}
figcaption{font-size:14px;line-height:1.5}figcaption .title{font-size:16px;font-weight:700}
.tag{font-size:12px;background:#e6eef8;border-radius:3px;padding:0 4px}.tag.insample{background:#eee;border:0}
.scale{margin:6px 0}.scale .bar{height:12px;border:1px solid #888}
.scale .ticks{display:flex;justify-content:space-between;font-size:12px}.scale .subject{font-size:12px;color:#444}
.ood{color:#8a4b00;font-weight:600}.links{font-size:13px}pre{background:#f7f7f7;padding:1em;font-size:85%}
"""
