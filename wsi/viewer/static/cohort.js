// The cohort table: all rows arrive as one JSON document; sorting, filtering and paging happen here, and only
// one page of rows (and of lazily loaded thumbnails) is in the DOM, so 10,000 slides open as fast as 100.
"use strict";
const PAGE_ROWS = 100;
const COLUMNS = [
  {key: "thumb", title: ""},
  {key: "slide_id", title: "slide"},
  {key: "label", title: "label"},
  {key: "predicted", title: "predicted"},
  {key: "probability", title: "P(call)"},
  {key: "source", title: "call from"},
  {key: "site", title: "site"},
  {key: "failures", title: "failures"},
  {key: "ood", title: "OOD"},
];
const state = {rows: [], shown: [], sortKey: "slide_id", descending: false, filters: {}, page: 0};

function cellText(row, key) {
  const v = row[key];
  if (key === "probability") return v === null ? "" : v.toFixed(3);
  if (key === "ood") return v === null ? "" : (v ? "⚠ unlike training" : "no");
  return v === null || v === undefined ? "" : String(v);
}

function compare(a, b) {
  const wrongFirst = document.getElementById("wrong-first").checked;
  if (wrongFirst && a.wrong !== b.wrong) return a.wrong ? -1 : 1;
  const x = a[state.sortKey], y = b[state.sortKey];
  let order = 0;
  if (x === y) order = 0;
  else if (x === null || x === "" || x === undefined) return 1;     // blanks last, either direction
  else if (y === null || y === "" || y === undefined) return -1;
  else order = x < y ? -1 : 1;
  return state.descending ? -order : order;
}

function refresh() {
  const filters = Object.entries(state.filters).filter(([, text]) => text);
  state.shown = state.rows.filter(row => filters.every(
    ([key, text]) => cellText(row, key).toLowerCase().includes(text.toLowerCase())));
  state.shown.sort(compare);
  state.page = Math.min(state.page, Math.max(0, Math.ceil(state.shown.length / PAGE_ROWS) - 1));
  render();
}

function render() {
  const start = state.page * PAGE_ROWS;
  const rows = state.shown.slice(start, start + PAGE_ROWS);
  const body = document.querySelector("#cohort tbody");
  body.replaceChildren(...rows.map(row => {
    const tr = document.createElement("tr");
    tr.dataset.slide = row.slide_id;
    if (row.wrong) tr.className = "wrong";
    for (const column of COLUMNS) {
      if (column.key === "ood" && !state.hasOod) continue;
      const td = document.createElement("td");
      td.className = column.key;
      if (column.key === "thumb") {
        if (row.has_store) {
          const img = document.createElement("img");
          img.loading = "lazy";
          img.alt = "";
          img.src = "/thumb/" + encodeURIComponent(row.slide_id);
          td.append(img);
        }
      } else if (column.key === "slide_id") {
        const a = document.createElement("a");
        a.href = "/slide?id=" + encodeURIComponent(row.slide_id);
        a.textContent = row.slide_id;
        td.append(a);
      } else {
        td.textContent = cellText(row, column.key);
      }
      tr.append(td);
    }
    return tr;
  }));
  const pages = Math.max(1, Math.ceil(state.shown.length / PAGE_ROWS));
  document.getElementById("page").textContent = ` page ${state.page + 1} of ${pages} `;
  document.getElementById("count").textContent = `${state.shown.length} of ${state.rows.length} slides`;
  for (const th of document.querySelectorAll("#heads th")) {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("descending", th.dataset.key === state.sortKey && state.descending);
  }
  if (document.body.dataset.state !== "ready") performance.mark("cohort-ready");  // for bench/viewer.py
  document.body.dataset.state = "ready";
}

function buildHeader() {
  const heads = document.getElementById("heads"), filters = document.getElementById("filters");
  for (const column of COLUMNS) {
    if (column.key === "ood" && !state.hasOod) continue;
    const th = document.createElement("th");
    th.textContent = column.title;
    th.dataset.key = column.key;
    const filter = document.createElement("th");
    if (column.key !== "thumb") {
      th.addEventListener("click", () => {
        state.descending = state.sortKey === column.key ? !state.descending : false;
        state.sortKey = column.key;
        refresh();
      });
      const input = document.createElement("input");
      input.placeholder = "filter";
      input.dataset.key = column.key;
      input.addEventListener("input", () => { state.filters[column.key] = input.value; state.page = 0; refresh(); });
      filter.append(input);
    }
    heads.append(th);
    filters.append(filter);
  }
}

async function main() {
  const cohort = await (await fetch("/api/cohort")).json();
  state.rows = cohort.rows;
  state.hasOod = cohort.has_ood;
  document.getElementById("run").textContent = cohort.run ? `run ${cohort.run}` : "no predictions yet";
  buildHeader();
  document.getElementById("wrong-first").addEventListener("change", refresh);
  document.getElementById("prev").addEventListener("click", () => {
    state.page = Math.max(0, state.page - 1); render();
  });
  document.getElementById("next").addEventListener("click", () => {
    state.page = Math.min(Math.ceil(state.shown.length / PAGE_ROWS) - 1, state.page + 1); render();
  });
  refresh();
}
main();
