// The slide page: the original slide in OpenSeadragon, and the heatmap painted here on a canvas over it from the
// per-tile scores (one JSON request), so the layer, opacity and threshold redraw without touching the network.
"use strict";
// viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's values); the legend and the tiles interpolate the same stops
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const TOP_K = 8;
const LEGENDS = {
  evidence: "Tumour evidence: the tile's tumour probability × its attention relative to the most attended tile × "
    + "the slide's tumour probability. Bright = tissue that drove a tumour call.",
  tumour: "Tumour probability of each tile (uncalibrated where the model did not look).",
  attention: "Attention: where the model looked, as the tile's rank within this slide (1 = most attended).",
};
// slide QC's colours, as on the QC image (wsi.qc): flag bit -> colour
const QC_COLOURS = [[1, "rgb(40,110,255)"], [2, "rgb(255,210,0)"], [4, "rgb(0,220,230)"]];
const params = new URLSearchParams(location.search);
const slideId = params.get("id");
const page = {redraws: 0, lastRedrawMs: 0, ready: false};
window.wsiView = page;  // for tests and the benchmark: the viewer, redraw counts, and readiness

function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * f));
}
const PALETTE = Array.from({length: 256}, (_, i) => `rgb(${colour(i / 255).join(",")})`);

function layerValues(scores) {
  const n = scores.attention.length;
  const top = scores.attention.reduce((a, b) => Math.max(a, b), 0) || 1;  // no spread: 100,000s of tiles
  const ranks = new Float32Array(n);
  Array.from(scores.attention.keys()).sort((a, b) => scores.attention[a] - scores.attention[b])
    .forEach((tile, rank) => { ranks[tile] = n > 1 ? rank / (n - 1) : 1; });
  return {
    evidence: Float32Array.from(scores.tumour, (p, i) => p * scores.attention[i] / top * scores.slide_probability),
    tumour: Float32Array.from(scores.tumour),
    attention: ranks,
  };
}

function controls() {
  return {
    layer: document.querySelector("input[name=layer]:checked").value,
    opacity: Number(document.getElementById("opacity").value),
    threshold: Number(document.getElementById("threshold").value),
  };
}

function fail(message) {
  const box = document.getElementById("error");
  box.textContent = `This slide cannot be shown: ${message}`;
  box.hidden = false;
  document.body.dataset.state = "error";
}

function niceLength(um) {  // 1, 2 or 5 x 10^k micrometres, at most um
  const p = 10 ** Math.floor(Math.log10(um));
  return [5, 2, 1].map(m => m * p).find(v => v <= um) || p;
}

async function main() {
  if (params.has("opacity")) document.getElementById("opacity").value = params.get("opacity");
  if (params.has("threshold")) document.getElementById("threshold").value = params.get("threshold");
  if (params.get("qc") === "1") document.getElementById("qc-layer").checked = true;
  if (params.has("layer")) {
    const radio = document.querySelector(`input[name=layer][value="${CSS.escape(params.get("layer"))}"]`);
    if (radio) radio.checked = true;
  }
  const answer = await fetch("/api/slide/" + encodeURIComponent(slideId));
  if (!answer.ok) return fail(answer.status === 404 ? "no such slide in this run" : answer.statusText);
  const slide = await answer.json();
  document.getElementById("title").textContent = slide.slide_id;
  const row = slide.row;
  document.getElementById("call").textContent = row.predicted ? `label ${row.label || "none"} · ${row.source} call `
    + `${row.predicted} (${row.probability === null ? "–" : row.probability.toFixed(2)})`
    + (row.ood ? " · ⚠ unlike the training slides" : "") : "";
  if (slide.error) return fail(slide.error);

  const tileSource = {
    width: slide.width, height: slide.height, tileSize: slide.tile_px, tileOverlap: 0, minLevel: 0, maxLevel: slide.max_level,
    getTileUrl: (level, x, y) => `/tiles/${encodeURIComponent(slideId)}/${level}/${x}_${y}.jpg`,
  };
  // the 2D-canvas drawer: OpenSeadragon 5's WebGL drawer fell back to software WebGL on a machine without a GPU
  // and took 5.7 s to a full first view of a 10,000 x 7,500 slide, against 1.1 s (bench/viewer.py).
  // immediateRender for the first view only (its level alone, no coarser ones first: 1.1 s against 1.5 s on a
  // 40,000 x 30,000 slide); afterwards zooming shows the coarser level while the finer one loads
  const options = {tileSources: tileSource, prefixUrl: "/static/vendor/openseadragon/images/", maxZoomPixelRatio: 2,
                   showNavigationControl: true, immediateRender: true, imageLoaderLimit: 16, drawer: "canvas"};
  const viewer = OpenSeadragon({...options, element: document.getElementById("main-view"), showNavigator: true,
                                navigatorPosition: "BOTTOM_RIGHT", navigatorAutoFade: false});
  page.viewer = viewer;
  const scores = slide.scores;
  const values = scores ? layerValues(scores) : null;
  const size = scores ? scores.tile_px_level0 : 0, stride = scores ? scores.stride_px_level0 : 0;
  document.getElementById("layers").disabled = !scores;
  const qc = slide.qc;
  document.getElementById("qc-layer").disabled = !qc;
  document.getElementById("qc-text").textContent = qc ? `${qc.blur_pct.toFixed(1)}% of the tissue blurred, `
    + `${qc.fold_pct.toFixed(1)}% in folds, ${qc.bubble_pct.toFixed(1)}% under bubbles`
    + (qc.excluded ? `; ${qc.excluded} flagged tiles left out of the features (tiling.qc: exclude)` : "")
    : "Slide QC did not run on this slide (tiling.qc: off).";

  const canvas = document.createElement("canvas");
  canvas.id = "heatmap";
  viewer.canvas.append(canvas);  // inside OpenSeadragon's canvas element: above the tiles, under the controls

  function redraw() {
    const started = performance.now();
    const c = controls();
    document.getElementById("threshold-value").textContent = c.threshold.toFixed(2);
    document.getElementById("legend-text").textContent = scores ? LEGENDS[c.layer] + ` Tiles at or below `
      + `${c.threshold.toFixed(2)} are not painted` + (c.threshold > 0 ? "; a white line outlines the rest" : "")
      + `. Scores: ${scores.source} model.` : "No scores of this run for this slide.";
    const ratio = window.devicePixelRatio || 1, w = viewer.canvas.clientWidth, h = viewer.canvas.clientHeight;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (values && viewer.world.getItemCount()) {
      const origin = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
      const corner = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(slide.width, 0));
      const scale = (corner.x - origin.x) / slide.width;
      ctx.setTransform(ratio * scale, 0, 0, ratio * scale, ratio * origin.x, ratio * origin.y);
      ctx.globalAlpha = c.opacity;
      const shown = values[c.layer], coords = scores.coords;
      const x0 = -origin.x / scale - size, y0 = -origin.y / scale - size, x1 = x0 + w / scale + size,
            y1 = y0 + h / scale + size;
      const outline = size * scale > 24;  // tile outlines once a tile is large on screen
      ctx.lineWidth = 1 / scale;
      ctx.strokeStyle = "rgba(0,0,0,0.35)";
      for (let i = 0; i < shown.length; i++) {
        const v = shown[i], x = coords[2 * i], y = coords[2 * i + 1];
        if (v <= c.threshold || x < x0 || x > x1 || y < y0 || y > y1) continue;
        ctx.fillStyle = PALETTE[Math.round(v * 255)];
        ctx.fillRect(x, y, size, size);
        if (outline) ctx.strokeRect(x, y, size, size);
      }
      ctx.globalAlpha = 1;
      if (c.threshold > 0) outlineRegions(ctx, shown, c.threshold, scale, [x0, y0, x1, y1]);
      if (page.selected !== undefined) {
        ctx.lineWidth = 3 / scale;
        ctx.strokeStyle = "#ff2020";
        ctx.strokeRect(coords[2 * page.selected], coords[2 * page.selected + 1], size, size);
      }
    }
    if (qc && document.getElementById("qc-layer").checked && viewer.world.getItemCount()) drawQc(ctx, ratio);
    updateScaleBar();
    page.redraws += 1;
    page.lastRedrawMs = performance.now() - started;
  }
  page.redraw = redraw;

  // slide QC: each flagged tile outlined and tinted in its flag's colour (a tile with two flags in both)
  function drawQc(ctx, ratio) {
    const origin = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const corner = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(slide.width, 0));
    const scale = (corner.x - origin.x) / slide.width, side = qc.tile_px_level0;
    ctx.setTransform(ratio * scale, 0, 0, ratio * scale, ratio * origin.x, ratio * origin.y);
    ctx.lineWidth = 3 / scale;
    for (const [bit, rgb] of QC_COLOURS) {
      ctx.strokeStyle = rgb;
      ctx.fillStyle = rgb;
      for (let i = 0; i < qc.flags.length; i++) {
        if (!(qc.flags[i] & bit)) continue;
        const x = qc.coords[2 * i], y = qc.coords[2 * i + 1];
        ctx.globalAlpha = 0.3;
        ctx.fillRect(x, y, side, side);
        ctx.globalAlpha = 1;
        ctx.strokeRect(x, y, side, side);
      }
    }
    page.qcDrawn = qc.flags.length;
  }

  // the region outline: every edge between a tile above the threshold and one that is not (or no tile), so the
  // thresholded tiles read as regions, as the GeoJSON's tumour region does in QuPath
  const byCell = new Map(scores ? Array.from(scores.attention.keys(), i =>
    [`${scores.coords[2 * i]},${scores.coords[2 * i + 1]}`, i]) : []);
  function outlineRegions(ctx, shown, threshold, scale, [x0, y0, x1, y1]) {
    const above = (x, y) => { const j = byCell.get(`${x},${y}`); return j !== undefined && shown[j] > threshold; };
    ctx.beginPath();
    for (let i = 0; i < shown.length; i++) {
      const x = scores.coords[2 * i], y = scores.coords[2 * i + 1];
      if (shown[i] <= threshold || x < x0 || x > x1 || y < y0 || y > y1) continue;
      if (!above(x, y - stride)) { ctx.moveTo(x, y); ctx.lineTo(x + size, y); }
      if (!above(x, y + stride)) { ctx.moveTo(x, y + size); ctx.lineTo(x + size, y + size); }
      if (!above(x - stride, y)) { ctx.moveTo(x, y); ctx.lineTo(x, y + size); }
      if (!above(x + stride, y)) { ctx.moveTo(x + size, y); ctx.lineTo(x + size, y + size); }
    }
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 2.5 / scale;
    ctx.stroke();
  }

  function updateScaleBar() {
    if (!viewer.world.getItemCount()) return;
    const zoom = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));  // screen px per level-0 px
    const um = niceLength(150 * slide.mpp / zoom);
    const bar = document.getElementById("scale-bar");
    bar.querySelector(".bar").style.width = `${um * zoom / slide.mpp}px`;
    bar.querySelector("span").textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
  }

  function saveState() {
    if (!viewer.world.getItemCount()) return;
    const centre = viewer.viewport.viewportToImageCoordinates(viewer.viewport.getCenter());
    const c = controls();
    const query = new URLSearchParams({id: slideId, zoom: viewer.viewport.getZoom().toPrecision(6),
      x: Math.round(centre.x), y: Math.round(centre.y), layer: c.layer, threshold: c.threshold, opacity: c.opacity,
      qc: document.getElementById("qc-layer").checked ? 1 : 0});
    history.replaceState(null, "", "/slide?" + query);
  }

  function flyTo(i) {
    page.selected = i;
    viewer.viewport.fitBounds(viewer.viewport.imageToViewportRectangle(
      scores.coords[2 * i] - size, scores.coords[2 * i + 1] - size, 3 * size, 3 * size));
    showTile(i);
  }

  function showTile(i) {
    const box = document.getElementById("tile-info");
    if (i === undefined) { box.innerHTML = "<p>No scored tile here.</p>"; return; }
    const x = scores.coords[2 * i], y = scores.coords[2 * i + 1];
    const items = [["tile", `#${i}`], ["level-0 x, y", `${x}, ${y} px`],
      ["position", `${(x * slide.mpp / 1000).toFixed(2)}, ${(y * slide.mpp / 1000).toFixed(2)} mm`],
      [`P(${scores.tumour_class})`, scores.tumour[i].toFixed(3)],
      ["attention", `${scores.attention[i].toExponential(2)} (rank ${values.attention[i].toFixed(3)})`],
      ["tumour evidence", values.evidence[i].toFixed(3)]];
    box.replaceChildren(...items.map(([k, v]) => {
      const p = document.createElement("p");
      p.innerHTML = "<b></b> <span></span>";
      p.children[0].textContent = k;
      p.children[1].textContent = v;
      return p;
    }));
    page.shownTile = i;
  }

  function tileAt(point) {
    for (let i = 0; i < scores.attention.length; i++) {
      const x = scores.coords[2 * i], y = scores.coords[2 * i + 1];
      if (point.x >= x && point.x < x + size && point.y >= y && point.y < y + size) return i;
    }
    return undefined;
  }

  if (scores) {
    const order = Array.from(scores.attention.keys()).sort((a, b) => scores.attention[b] - scores.attention[a]);
    page.topTiles = order.slice(0, TOP_K);
    document.getElementById("gallery").replaceChildren(...page.topTiles.map((i, rank) => {
      const button = document.createElement("button");
      button.dataset.tile = i;
      button.title = `tile #${i}: attention rank ${rank + 1}, P(${scores.tumour_class}) ${scores.tumour[i].toFixed(2)}`;
      const img = document.createElement("img");
      img.alt = button.title;
      img.src = `/tile-image/${encodeURIComponent(slideId)}/${i}.jpg`;
      img.onerror = () => { img.replaceWith(`#${i}`); };
      button.append(img);
      button.addEventListener("click", () => flyTo(i));
      return button;
    }));
    page.flyTo = flyTo;
    viewer.addHandler("canvas-click", event => {
      if (!event.quick) return;
      const i = tileAt(viewer.viewport.viewerElementToImageCoordinates(event.position));
      page.selected = i;
      showTile(i);
      redraw();
    });
  }

  let heViewer = null, syncing = false;
  function sync(from, to) {
    from.addHandler("viewport-change", () => {
      if (syncing || !to.world.getItemCount()) return;
      syncing = true;
      to.viewport.zoomTo(from.viewport.getZoom(), null, true);
      to.viewport.panTo(from.viewport.getCenter(), true);
      syncing = false;
    });
  }
  document.getElementById("side-by-side").addEventListener("change", event => {
    const he = document.getElementById("he-view");
    he.hidden = !event.target.checked;
    document.getElementById("views").classList.toggle("split", event.target.checked);
    if (event.target.checked && !heViewer) {
      heViewer = page.heViewer = OpenSeadragon({...options, element: he, showNavigator: false});
      heViewer.addOnceHandler("open", () => {
        heViewer.viewport.zoomTo(viewer.viewport.getZoom(), null, true);
        heViewer.viewport.panTo(viewer.viewport.getCenter(), true);
      });
      sync(viewer, heViewer);
      sync(heViewer, viewer);
    }
  });

  viewer.addHandler("update-viewport", redraw);
  viewer.addHandler("animation-finish", saveState);
  for (const input of document.querySelectorAll("#controls input:not(#side-by-side)")) {
    input.addEventListener("input", () => { redraw(); saveState(); });
  }
  viewer.addOnceHandler("open", () => {
    if (params.has("zoom")) {
      viewer.viewport.zoomTo(Number(params.get("zoom")), null, true);
      viewer.viewport.panTo(viewer.viewport.imageToViewportCoordinates(
        Number(params.get("x")), Number(params.get("y"))), true);
    }
    viewer.world.getItemAt(0).addHandler("fully-loaded-change", event => {
      page.fullyLoaded = event.fullyLoaded;
      if (event.fullyLoaded && !page.firstFullView) {
        page.firstFullView = performance.now();
        viewer.world.getItemAt(0).immediateRender = false;
      }
    });
    redraw();
    page.ready = true;
    document.body.dataset.state = "ready";
  });
  viewer.addHandler("open-failed", event => fail(event.message));
}
main();
