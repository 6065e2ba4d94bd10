// lorasearch web page: search by upload, browse, "similar to" by id; labels shown. Plain DOM, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 25;
let browseOffset = 0;
let latest = 0;   // only the newest request may draw (a slow earlier answer must not overwrite it)

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function headers() {
  const token = sessionStorage.getItem("lorasearch-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.error ? body.error.message : `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message ? "Error: " + message : "";
  box.hidden = !message;
}

function busy(on) {
  $("search-button").disabled = on;
  document.body.setAttribute("aria-busy", on ? "true" : "false");
}

// ---- stats -------------------------------------------------------------------------------------
async function loadStats() {
  try {
    const s = await api("/stats");
    const fams = Object.entries(s.families || {}).map(([f, n]) => `${f} (${n})`).join(", ") || "empty";
    $("stats").textContent = `${s.count} adapters · ${fams} · encoder ${s.encoder ? s.encoder.spec : "–"}`;
    const sel = $("family");
    for (const f of Object.keys(s.families || {})) {
      if (![...sel.options].some((o) => o.value === f)) sel.append(el("option", { value: f, text: f }));
    }
  } catch (e) {
    $("stats").textContent = "index unavailable";
    showError(e.message);
  }
}

// ---- result tables -----------------------------------------------------------------------------
function scoreCell(score) {
  const pct = Math.max(0, Math.min(1, score)) * 100;
  const fill = el("span");
  fill.style.width = `${pct.toFixed(1)}%`;   // CSSOM, not a style attribute: allowed by the page's CSP
  return el("td", {}, el("div", { class: "score" },
    el("div", { class: "bar", role: "img", "aria-label": `score ${score.toFixed(4)}` }, fill),
    el("code", { text: score.toFixed(4) })));
}

function baseName(path) {
  return String(path).split(/[\\/]/).pop();
}

function similarLink(id, label) {
  return el("a", { href: `#similar/${id}`, title: `adapters similar to #${id}` }, label);
}

function detailsRow(cols, id) {
  const row = el("tr", { class: "details", id: `details-${id}`, hidden: "" });
  row.append(el("td", { colspan: String(cols), text: "loading…" }));
  return row;
}

async function fillDetails(row, id) {
  const td = row.firstChild;
  try {
    const info = await api(`/adapters/${id}`);
    const dl = el("dl");
    const add = (k, v) => { dl.append(el("dt", { text: k }), el("dd", {}, v)); };
    const words = info.trigger_words || [];
    add("trigger words", words.length ? el("span", {}, ...words.map((w) => el("span", { class: "tag", text: w }))) : "none");
    const labels = info.index.labels || [];
    add("labels", labels.length ? labelTags(labels) : "none");
    add("path", el("code", { text: info.index.path }));
    add("sha256", el("code", { text: info.index.sha256 }));
    add("modules", `${info.index.n_modules} · ranks ${(info.index.ranks || []).join(", ")}`);
    const meta = info.metadata || {};
    const keys = Object.keys(meta);
    add("metadata", keys.length ? el("span", {}, ...keys.slice(0, 30).map((k) =>
      el("div", { text: `${k}: ${String(typeof meta[k] === "object" ? JSON.stringify(meta[k]) : meta[k]).slice(0, 200)}` })))
      : "none");
    td.replaceChildren(dl);
  } catch (e) {
    td.textContent = e.message;
  }
}

function toggleButton(row, id) {
  const btn = el("button", { type: "button", class: "link", "aria-expanded": "false",
    "aria-controls": `details-${id}`, text: "details" });
  btn.addEventListener("click", () => {
    const open = btn.getAttribute("aria-expanded") === "true";
    btn.setAttribute("aria-expanded", String(!open));
    row.hidden = open;
    if (!open && !row.dataset.loaded) { row.dataset.loaded = "1"; fillDetails(row, id); }
  });
  return btn;
}

function showTable(title, note, columns, rows) {
  $("results-title").textContent = title;
  $("results-note").textContent = note;
  const thead = $("results-table").tHead;
  thead.replaceChildren(el("tr", {}, ...columns.map((c) => el("th", { scope: "col", text: c }))));
  $("results-table").tBodies[0].replaceChildren(...rows);
  $("results").hidden = false;
}

function labelTags(labels) {
  // a space between the chips: copied text and screen readers keep the labels apart
  return el("span", { class: "labels" },
    ...(labels || []).flatMap((l, i) => [...(i ? [" "] : []), el("span", { class: "tag", text: l })]));
}

function renderQuery(res, title) {
  // each hit carries its ranks and labels: no request per row
  const cols = ["Rank", "Adapter", "Score", "Match", "Family", "Format", "Ranks", "Labels", ""];
  const rows = [];
  for (const r of res.results) {
    const details = detailsRow(cols.length, r.id);
    rows.push(el("tr", { "data-id": String(r.id) },
      el("td", { class: "num", text: String(r.rank) }),
      el("td", { class: "name" }, similarLink(r.id, baseName(r.path)),
        el("div", { class: "muted", text: `#${r.id}` })),
      scoreCell(r.score),
      el("td", {}, el("span", { class: `match ${r.match}`, text: r.match })),
      el("td", { text: r.family }),
      el("td", { text: r.format }),
      el("td", { text: (r.ranks || []).join(", ") }),
      el("td", {}, labelTags(r.labels)),
      el("td", {}, toggleButton(details, r.id))), details);
  }
  const q = res.query;
  // what the score is: the exact ΔW cosine, or the fusion a learned encoder's checkpoint records
  const meaning = !q.ranking || q.ranking === "exact" ? "score: exact ΔW cosine"
    : q.ranking === "encoder" ? "score: learned-encoder cosine"
    : `score: ${q.ranking.replace("fusion ", "")} · encoder + (1−w) · exact ΔW cosine`;
  const note = `${q.path} · family ${q.family} · format ${q.format} · ${q.indexed_in_family} indexed in this family`
    + (res.results.length ? ` · ${meaning}` : " · no results");
  showTable(title, note, cols, rows);
}

// ---- search ------------------------------------------------------------------------------------
async function search(files) {
  if (!files || !files.length) { showError("choose an adapter file first"); return; }
  const mine = ++latest;
  showError("");
  busy(true);
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const params = new URLSearchParams({ k: $("k").value || "10" });
  if ($("threshold").value !== "") params.set("threshold", $("threshold").value);
  try {
    const res = await api(`/query?${params}`, { method: "POST", body: form });
    if (mine !== latest) return;
    const label = files.length > 1 ? [...files].map((f) => f.name).join(" + ") : res.query.path;
    renderQuery(res, `Adapters like ${label}`);
  } catch (e) {
    if (mine === latest) showError(e.message);
  } finally {
    busy(false);
  }
}

async function similar(id) {
  const mine = ++latest;
  showError("");
  busy(true);
  try {
    const res = await api(`/adapters/${id}/similar?k=${encodeURIComponent($("k").value || "10")}`);
    if (mine !== latest) return;
    renderQuery(res, `Adapters similar to #${id} (${baseName(res.query.path)})`);
  } catch (e) {
    if (mine !== latest) return;
    $("results").hidden = true;
    showError(e.message);
  } finally {
    busy(false);
  }
}

// ---- browse ------------------------------------------------------------------------------------
async function browse() {
  const mine = ++latest;
  showError("");
  const params = new URLSearchParams({ sort: $("sort").value, limit: String(PAGE), offset: String(browseOffset) });
  if ($("family").value) params.set("family", $("family").value);
  try {
    const res = await api(`/adapters?${params}`);
    if (mine !== latest) return;
    const cols = ["#", "Adapter", "Family", "Format", "Ranks", "Added", ""];
    const rows = [];
    for (const a of res.adapters) {
      const details = detailsRow(cols.length, a.id);
      rows.push(el("tr", { "data-id": String(a.id) },
        el("td", { class: "num", text: String(a.id) }),
        el("td", { class: "name" }, similarLink(a.id, a.name)),
        el("td", { text: a.family }),
        el("td", { text: a.format }),
        el("td", { text: (a.ranks || []).join(", ") }),
        el("td", { text: (a.added_at || "").replace("T", " ").slice(0, 19) }),
        el("td", {}, toggleButton(details, a.id))), details);
    }
    const last = Math.min(res.offset + res.adapters.length, res.total);
    $("page-info").textContent = res.total ? `${res.offset + 1}–${last} of ${res.total}` : "nothing indexed";
    $("prev").disabled = res.offset === 0;
    $("next").disabled = last >= res.total;
    showTable("Indexed adapters", "Select a name to see the adapters most similar to it.", cols, rows);
  } catch (e) {
    if (mine === latest) showError(e.message);
  }
}

// ---- routing: #search, #browse, #similar/ID ----------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#/, "") || "search";
  const m = hash.match(/^similar\/(\d+)$/);
  const view = m ? "search" : (hash === "browse" ? "browse" : "search");
  $("view-search").hidden = view !== "search";
  $("view-browse").hidden = view !== "browse";
  for (const [id, on] of [["nav-search", view === "search"], ["nav-browse", view === "browse"]]) {
    if (on) $(id).setAttribute("aria-current", "page"); else $(id).removeAttribute("aria-current");
  }
  if (m) similar(m[1]);
  else if (view === "browse") browse();
  else { latest++; $("results").hidden = true; showError(""); }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", () => search($("file").files));
  $("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search($("file").files); });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => search(e.dataTransfer.files));
  $("family").addEventListener("change", () => { browseOffset = 0; browse(); });
  $("sort").addEventListener("change", () => { browseOffset = 0; browse(); });
  $("prev").addEventListener("click", () => { browseOffset = Math.max(0, browseOffset - PAGE); browse(); });
  $("next").addEventListener("click", () => { browseOffset += PAGE; browse(); });
  const token = $("token");
  token.value = sessionStorage.getItem("lorasearch-token") || "";
  token.addEventListener("change", () => {
    if (token.value) sessionStorage.setItem("lorasearch-token", token.value);
    else sessionStorage.removeItem("lorasearch-token");
    loadStats();
  });
  $("token-form").addEventListener("submit", (ev) => { ev.preventDefault(); token.dispatchEvent(new Event("change")); });
  window.addEventListener("hashchange", route);
  loadStats();
  route();
}

document.addEventListener("DOMContentLoaded", init);
