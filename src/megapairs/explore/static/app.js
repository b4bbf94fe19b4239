// The megapairs explorer page: plain ES2020, no framework, no build step.
// Views (hash routes): #/pairs?<filters>, #/pair/<id>, #/overview, #/flags, #/search?image=&text=&k=
"use strict";

const PLACEHOLDER = "__MEGAPAIRS_" + "TOKEN__"; // split so a server-side replace never touches it
const FLAG_REASONS = ["unrelated_pair", "wrong_instruction", "false_negative", "near_duplicate", "other"];
const VIEWS = ["pairs", "pair", "overview", "flags", "search"];
const DEFAULT_LIMIT = 50;
const DEFAULT_K = 20;
const LIMITS = [25, 50, 100, 200, 500];
const TEXT_FILTERS = ["backend", "min_instructions", "max_instructions", "q", "status", "failure", "flagged"];

const state = {
  token: "",
  route: null,
  busy: 0,
  channels: null, // the run's channels (config order)
  formBuilt: false,
  appliedHash: null, // the hash the filter form itself just wrote (do not rewrite the form from it)
  overview: null,
  overviewPromise: null,
  pairs: { key: null, data: null, seq: 0 },
  selected: 0,
  pendingSelect: null, // "first" | "last" after j/k crossed a page
  lastOpened: null,
  listHash: "#/pairs",
  listIds: [],
  pair: { id: null, data: null, seq: 0 },
  flagReason: FLAG_REASONS[0],
  flags: null,
  overviewRendered: null,
  search: { status: null, poll: null, key: null, data: null, seq: 0, appliedHash: null },
  toastTimer: null,
  qTimer: null,
};

/* ---------- small helpers ---------- */

const ESC_MAP = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function esc(value) {
  if (value === null || value === undefined) return "";
  return String(value).replace(/[&<>"']/g, (c) => ESC_MAP[c]);
}

function $(id) {
  return document.getElementById(id);
}

function fmtScore(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
}

function fmtNum(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return esc(x ?? "–");
  return Number.isInteger(x) ? String(x) : x.toFixed(3);
}

function fmtMs(ms) {
  return typeof ms === "number" ? `${ms.toFixed(1)} ms` : "";
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
}

function imgUrl(id, size) {
  return `/api/image/${encodeURIComponent(String(id))}?size=${size}`;
}

function thumb(id, px, extraClass = "", attrs = "") {
  const cls = `thumb${extraClass ? " " + extraClass : ""}`;
  return `<img${attrs} class="${cls}" src="${esc(imgUrl(id, "thumb"))}" loading="lazy" width="${px}" height="${px}" alt="image ${esc(id)}" data-id="${esc(id)}">`;
}

function pairHash(id) {
  return `#/pair/${encodeURIComponent(id)}`;
}

function searchHash(image, text, k) {
  const p = new URLSearchParams();
  if (image !== null && image !== undefined && String(image) !== "") p.set("image", String(image));
  if (text) p.set("text", text);
  if (k && Number(k) !== DEFAULT_K) p.set("k", String(k));
  const qs = p.toString();
  return qs ? `#/search?${qs}` : "#/search";
}

function badge(text, cls) {
  return `<span class="badge ${esc(cls)}">${esc(text)}</span>`;
}

function statusBadge(status, reason) {
  const title = reason ? ` title="${esc(reason)}"` : "";
  const extra = status === "failed" && reason ? `<div class="muted small">${esc(reason)}</div>` : "";
  return `<span class="badge status-${esc(status)}"${title}>${esc(status)}</span>${extra}`;
}

function kvTable(obj, cls = "kv") {
  const rows = Object.entries(obj || {}).map(([k, v]) => {
    const val = Array.isArray(v) ? v.join(", ") : typeof v === "object" && v !== null ? JSON.stringify(v) : v;
    return `<tr><th>${esc(k)}</th><td>${esc(val)}</td></tr>`;
  });
  return `<table class="${cls}">${rows.join("") || '<tr><td class="muted">none</td></tr>'}</table>`;
}

const NON_TEXT_INPUTS = new Set(["checkbox", "radio", "button", "submit", "reset", "file", "range", "color"]);

function isTyping(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target instanceof HTMLInputElement) return !NON_TEXT_INPUTS.has(target.type);
  // The filter bar's selects apply on change and keep no typing state: the list keys work there.
  if (target instanceof HTMLSelectElement) return !target.closest("#filters");
  return target.isContentEditable || target.tagName === "TEXTAREA";
}

function blurAfterMouseClick(ev) {
  // A button clicked with the mouse must not keep the focus: Enter then opens the selected row.
  const el = ev.target instanceof Element ? ev.target.closest("button, input[type=checkbox]") : null;
  if (el && ev.detail > 0) el.blur();
}

/* ---------- errors, busy state, toast ---------- */

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function detailText(data, raw, resp) {
  const detail = data && typeof data === "object" ? data.detail : undefined;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        if (!d || typeof d !== "object") return String(d);
        const loc = Array.isArray(d.loc) ? d.loc.filter((x) => x !== "query" && x !== "body").join(".") : "";
        return `${loc ? loc + ": " : ""}${d.msg || JSON.stringify(d)}`;
      })
      .join("; ");
  }
  if (detail !== undefined) return JSON.stringify(detail);
  return (raw || "").slice(0, 300) || resp.statusText || "request failed";
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function report(err) {
  showError(err instanceof Error ? err.message : String(err));
}

function busy(delta) {
  state.busy = Math.max(0, state.busy + delta);
  $("loading").hidden = state.busy === 0;
  document.body.classList.toggle("busy", state.busy > 0);
}

function toast(message) {
  const el = $("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(state.toastTimer);
  state.toastTimer = setTimeout(() => {
    el.hidden = true;
  }, 2500);
}

/* ---------- API ---------- */

async function api(path, { method = "GET", json, form } = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers["X-Megapairs-Token"] = state.token;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const where = `${method} ${path.split("?")[0]}`;
  busy(1);
  try {
    let resp;
    try {
      resp = await fetch(path, { method, headers, body, credentials: "same-origin" });
    } catch (err) {
      throw new ApiError(`network error (${where}): ${err.message}`, 0);
    }
    const raw = await resp.text();
    let data = null;
    try {
      data = raw ? JSON.parse(raw) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) throw new ApiError(`${resp.status}: ${detailText(data, raw, resp)} (${where})`, resp.status);
    return data;
  } finally {
    busy(-1);
  }
}

function ensureOverview() {
  if (!state.overviewPromise) {
    const promise = api("/api/overview").then((ov) => {
      state.overview = ov;
      $("run-path").textContent = ov.run || "";
      return ov;
    });
    promise.catch(() => {
      if (state.overviewPromise === promise) state.overviewPromise = null;
    });
    state.overviewPromise = promise;
  }
  return state.overviewPromise;
}

function invalidateCaches() {
  state.pairs.key = null;
  state.overviewPromise = null;
  state.flags = null;
}

/* ---------- images: "no preview" boxes, lightbox ---------- */

function onImageError(ev) {
  const img = ev.target;
  if (!(img instanceof HTMLImageElement)) return;
  if (img.id === "lightbox-img") {
    $("lightbox-caption").textContent = "no preview: the image cannot be shown";
    return;
  }
  if (!img.classList.contains("thumb")) return;
  const box = document.createElement("span");
  box.className = "no-preview";
  box.style.width = `${img.width}px`;
  box.style.height = `${img.height}px`;
  box.dataset.id = img.dataset.id || "";
  const label = document.createElement("span");
  label.textContent = "no preview";
  box.append(label);
  img.replaceWith(box);
  if (img.dataset.why !== undefined) explainImage(img.src, box);
}

async function explainImage(src, box) {
  // The <img> cannot read the error body: ask once more for the reason (shown, not thrown).
  try {
    await api(src.replace(location.origin, ""));
  } catch (err) {
    const small = document.createElement("small");
    small.textContent = err.message.replace(/ \(GET [^)]*\)$/, "").replace(/^\d+: /, "");
    box.title = small.textContent;
    box.append(small);
  }
}

function openLightbox(id, caption) {
  const img = $("lightbox-img");
  img.src = imgUrl(id, "full");
  img.alt = `image ${id}`;
  $("lightbox-caption").textContent = `#${id}${caption ? " · " + caption : ""}`;
  $("lightbox").hidden = false;
}

function closeLightbox() {
  $("lightbox").hidden = true;
  $("lightbox-img").removeAttribute("src");
}

function lightboxOpen() {
  return !$("lightbox").hidden;
}

function onZoomClick(ev) {
  const btn = ev.target instanceof Element ? ev.target.closest(".zoom") : null;
  if (!btn || !btn.querySelector("img")) return;
  ev.preventDefault();
  openLightbox(btn.dataset.id, btn.dataset.caption || "");
}

/* ---------- routing ---------- */

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const qi = raw.indexOf("?");
  const path = qi < 0 ? raw : raw.slice(0, qi);
  const params = new URLSearchParams(qi < 0 ? "" : raw.slice(qi + 1));
  const parts = path.split("/");
  let arg = null;
  if (parts.length > 1 && parts.slice(1).join("/") !== "") {
    try {
      arg = decodeURIComponent(parts.slice(1).join("/"));
    } catch (_) {
      arg = parts.slice(1).join("/");
    }
  }
  return { view: parts[0] || "", arg, params, hash: location.hash };
}

function navigate(hash, { replace = false } = {}) {
  if (hash === location.hash) {
    route();
  } else if (replace) {
    history.replaceState(null, "", hash);
    route();
  } else {
    location.hash = hash;
  }
}

function showView(view) {
  for (const name of VIEWS) $(`${name}-view`).hidden = name !== view;
  const tab = view === "pair" ? "pairs" : view;
  for (const a of document.querySelectorAll("#nav a")) {
    const on = a.dataset.view === tab;
    a.classList.toggle("active", on);
    if (on) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function route() {
  const r = parseHash();
  if (!VIEWS.includes(r.view) || (r.view === "pair" && !r.arg)) {
    history.replaceState(null, "", "#/pairs");
    route();
    return;
  }
  const changedView = !state.route || state.route.view !== r.view;
  state.route = r;
  clearError();
  if (r.view !== "search") stopPolling();
  showView(r.view);
  const handlers = { pairs: showPairs, pair: showPair, overview: showOverview, flags: showFlags, search: showSearch };
  handlers[r.view](r).catch(report);
  if (changedView) window.scrollTo(0, 0);
}

/* ---------- pairs: filter form ---------- */

function filterFormHtml(channels) {
  const chs = channels
    .map(
      (ch) => `<div class="fch">
        <label class="check"><input type="checkbox" id="f-channel-${esc(ch)}" data-channel="${esc(ch)}"> ${esc(ch)}</label>
        <span class="range" title="score range of ${esc(ch)}">
          <input type="number" step="any" id="f-score-${esc(ch)}-min" data-channel="${esc(ch)}" placeholder="min">
          <span class="muted">–</span>
          <input type="number" step="any" id="f-score-${esc(ch)}-max" data-channel="${esc(ch)}" placeholder="max">
        </span></div>`
    )
    .join("");
  const sorts = [
    ["order", "run order"],
    ["-order", "run order, reversed"],
    ["-instructions", "most instructions"],
    ["instructions", "fewest instructions"],
  ];
  for (const ch of channels) {
    sorts.push([`-score:${ch}`, `${ch} score, high first`], [`score:${ch}`, `${ch} score, low first`]);
  }
  const sortOpts = sorts.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("");
  const limitOpts = LIMITS.map((n) => `<option value="${n}">${n} / page</option>`).join("");
  return `
    <fieldset class="fchannels"><legend>found by (all checked) &middot; score range</legend>${chs}</fieldset>
    <div class="frow">
      <label class="grow">text <input type="search" id="f-q" placeholder="instruction contains… ( / )"></label>
      <label>combination <select id="f-combo"><option value="">any</option></select></label>
      <label>status <select id="f-status">
        <option value="">any</option><option value="annotated">annotated</option>
        <option value="failed">failed</option><option value="pending">pending</option></select></label>
      <label>failure <input type="text" id="f-failure" list="f-failure-list" size="10" placeholder="reason">
        <datalist id="f-failure-list"></datalist></label>
      <label>flagged <select id="f-flagged">
        <option value="">any</option><option value="yes">yes</option><option value="no">no</option></select></label>
    </div>
    <div class="frow">
      <label>backend <input type="text" id="f-backend" size="10" placeholder="any"></label>
      <label>instructions
        <input type="number" id="f-min-instructions" min="0" step="1" placeholder="min" class="short">
        <span class="muted">–</span>
        <input type="number" id="f-max-instructions" min="0" step="1" placeholder="max" class="short"></label>
      <label>sort <select id="f-sort">${sortOpts}</select></label>
      <label>page <select id="f-limit">${limitOpts}</select></label>
      <span class="grow"></span>
      <button type="button" id="f-reset">reset</button>
      <button type="submit" id="f-apply" class="primary">apply</button>
    </div>`;
}

function ensureFilterForm(channels) {
  if (state.formBuilt || !Array.isArray(channels)) return;
  state.channels = channels;
  $("filters").innerHTML = filterFormHtml(channels);
  state.formBuilt = true;
  if (state.overview) fillOverviewOptions(state.overview);
  if (state.route && state.route.view === "pairs") writeForm(state.route.params);
}

function fillOverviewOptions(ov) {
  if (!state.formBuilt) return;
  const select = $("f-combo");
  const current = state.route && state.route.view === "pairs" ? state.route.params.get("combo") || "" : select.value;
  const combos = (ov.combinations || []).map((c) => [c.channels.join("+"), `${c.channels.join(" + ")} (${c.pairs})`]);
  if (current && !combos.some(([v]) => v === current)) combos.push([current, current]);
  select.innerHTML =
    '<option value="">any</option>' +
    combos.map(([v, l]) => `<option value="${esc(v)}">${esc(l)}</option>`).join("");
  select.value = current;
  const failures = ((ov.annotation || {}).failures || []).map((f) => `<option value="${esc(f.reason)}">`);
  $("f-failure-list").innerHTML = failures.join("");
}

function readForm() {
  const p = new URLSearchParams();
  for (const ch of state.channels) if ($(`f-channel-${ch}`).checked) p.append("channel", ch);
  const combo = $("f-combo").value;
  if (combo) p.set("combo", combo);
  for (const ch of state.channels) {
    const lo = $(`f-score-${ch}-min`).value.trim();
    const hi = $(`f-score-${ch}-max`).value.trim();
    if (lo || hi) p.append("score", `${ch}:${lo}:${hi}`);
  }
  for (const name of TEXT_FILTERS) {
    const value = $(`f-${name.replace("_", "-")}`).value.trim();
    if (value) p.set(name, value);
  }
  const sort = $("f-sort").value;
  if (sort && sort !== "order") p.set("sort", sort);
  const limit = Number($("f-limit").value);
  if (limit && limit !== DEFAULT_LIMIT) p.set("limit", String(limit));
  return p;
}

function parseScore(spec) {
  const parts = spec.split(":");
  if (parts.length < 3) return null;
  const hi = parts.pop();
  const lo = parts.pop();
  return { channel: parts.join(":"), lo, hi };
}

function setSelect(select, value) {
  if (value && !Array.from(select.options).some((o) => o.value === value)) {
    select.insertAdjacentHTML("beforeend", `<option value="${esc(value)}">${esc(value)}</option>`);
  }
  select.value = value;
}

function writeForm(params) {
  if (!state.formBuilt) return;
  const chosen = new Set(params.getAll("channel"));
  const scores = new Map();
  for (const spec of params.getAll("score")) {
    const s = parseScore(spec);
    if (s) scores.set(s.channel, s);
  }
  for (const ch of state.channels) {
    $(`f-channel-${ch}`).checked = chosen.has(ch);
    const s = scores.get(ch);
    $(`f-score-${ch}-min`).value = s ? s.lo : "";
    $(`f-score-${ch}-max`).value = s ? s.hi : "";
  }
  setSelect($("f-combo"), params.get("combo") || "");
  for (const name of TEXT_FILTERS) {
    const el = $(`f-${name.replace("_", "-")}`);
    const value = params.get(name) || "";
    if (el.tagName === "SELECT") setSelect(el, value);
    else el.value = value;
  }
  setSelect($("f-sort"), params.get("sort") || "order");
  setSelect($("f-limit"), params.get("limit") || String(DEFAULT_LIMIT));
}

function applyForm({ replace = false } = {}) {
  if (!state.formBuilt) return;
  clearTimeout(state.qTimer);
  const qs = readForm().toString();
  const hash = qs ? `#/pairs?${qs}` : "#/pairs";
  state.selected = 0;
  if (hash !== location.hash) state.appliedHash = hash;
  navigate(hash, { replace });
}

function onFilterInput(ev) {
  if (ev.target.id !== "f-q") return;
  clearTimeout(state.qTimer);
  state.qTimer = setTimeout(() => applyForm({ replace: true }), 300);
}

function onFilterChange(ev) {
  if (ev.target.id === "f-q") return; // debounced on input
  applyForm();
}

function onFilterSubmit(ev) {
  ev.preventDefault();
  applyForm();
}

function onFilterClick(ev) {
  if (ev.target.id === "f-reset") {
    state.selected = 0;
    navigate("#/pairs");
  }
}

/* ---------- pairs: table, pager, selection ---------- */

function listParams(params) {
  const p = new URLSearchParams(params);
  if (!p.get("limit")) p.set("limit", String(DEFAULT_LIMIT));
  return p;
}

async function showPairs(r) {
  state.listHash = r.hash || "#/pairs";
  $("nav-pairs").setAttribute("href", state.listHash);
  if (r.hash !== state.appliedHash) writeForm(r.params);
  state.appliedHash = null;
  ensureOverview()
    .then((ov) => {
      ensureFilterForm((ov.channels || []).map((c) => c.name));
      fillOverviewOptions(ov);
    })
    .catch(report);
  const key = listParams(r.params).toString();
  if (state.pairs.key === key && state.pairs.data) {
    renderPairs(state.pairs.data);
    return;
  }
  const seq = ++state.pairs.seq;
  $("pairs-table").classList.add("stale");
  try {
    const data = await api(`/api/pairs?${key}`);
    if (seq !== state.pairs.seq) return;
    state.pairs = { key, data, seq };
    ensureFilterForm(data.channels);
    if (state.route.view === "pairs") renderPairs(data);
  } finally {
    if (seq === state.pairs.seq) $("pairs-table").classList.remove("stale");
  }
}

function channelChips(channels, scores) {
  return (channels || [])
    .map((ch, i) => `<span class="chip" title="${esc(ch)}">${esc(ch)} <b>${fmtScore((scores || [])[i])}</b></span>`)
    .join("");
}

function rowHtml(row, i) {
  const flag = row.flagged ? '<span class="flag-marker" title="pair flagged">&#9873;</span>' : "";
  const fi = row.flagged_instructions
    ? `<span class="flag-instr" title="flagged instructions">${esc(row.flagged_instructions)} instr.</span>`
    : "";
  const first = row.first_instruction || "";
  return `<tr class="pair-row${row.flagged ? " flagged" : ""}" data-pair-id="${esc(row.pair_id)}" data-index="${i}">
    <td class="mono id"><a href="${esc(pairHash(row.pair_id))}">${esc(row.pair_id)}</a></td>
    <td class="img">${thumb(row.query_id, 96)}</td>
    <td class="img">${thumb(row.target_id, 96)}</td>
    <td class="chips">${channelChips(row.channels, row.channel_scores)}</td>
    <td>${statusBadge(row.status, row.failure_reason)}<div class="muted small">${esc(row.backend)}</div></td>
    <td class="num">${esc(row.num_instructions)}</td>
    <td class="instr"><div class="clamp" title="${esc(first)}">${esc(first)}</div></td>
    <td class="flag">${flag}${fi}</td></tr>`;
}

function renderPairs(data) {
  const rows = data.rows || [];
  const body = $("pairs-table").tBodies[0];
  body.innerHTML =
    rows.map(rowHtml).join("") || '<tr class="empty"><td colspan="8">no pair matches these filters</td></tr>';
  state.listIds = rows.map((r) => r.pair_id);
  const opened = state.listIds.indexOf(state.lastOpened);
  if (state.pendingSelect === "last") state.selected = rows.length - 1;
  else if (state.pendingSelect === "first") state.selected = 0;
  else if (opened >= 0) state.selected = opened;
  state.pendingSelect = null;
  state.lastOpened = null;
  state.selected = Math.max(0, Math.min(state.selected, rows.length - 1));
  highlight(false);
  renderPager(data);
}

function renderPager(data) {
  const total = data.total || 0;
  const offset = data.offset || 0;
  const n = (data.rows || []).length;
  const a = n ? offset + 1 : 0;
  const b = offset + n;
  $("pager-info").textContent = `rows ${a}-${b} of ${total}`;
  $("pager-elapsed").textContent = fmtMs(data.elapsed_ms);
  $("pager-prev").disabled = offset <= 0;
  $("pager-next").disabled = offset + n >= total;
}

function highlight(scroll) {
  const rows = $("pairs-table").tBodies[0].querySelectorAll("tr.pair-row");
  rows.forEach((tr, i) => tr.classList.toggle("selected", i === state.selected));
  const row = rows[state.selected];
  if (row && scroll) row.scrollIntoView({ block: "nearest" });
}

function page(delta, select = "first") {
  const data = state.pairs.data;
  if (!data || state.route.view !== "pairs") return;
  const limit = data.limit || DEFAULT_LIMIT;
  const offset = Math.max(0, (data.offset || 0) + delta * limit);
  if (delta > 0 && offset >= (data.total || 0)) return;
  if (delta < 0 && (data.offset || 0) === 0) return;
  const p = new URLSearchParams(state.route.params);
  if (offset) p.set("offset", String(offset));
  else p.delete("offset");
  state.pendingSelect = select;
  state.appliedHash = null;
  const qs = p.toString();
  navigate(qs ? `#/pairs?${qs}` : "#/pairs");
}

function moveSelection(delta) {
  const n = state.listIds.length;
  const next = state.selected + delta;
  if (next >= n) page(1, "first");
  else if (next < 0) page(-1, "last");
  else {
    state.selected = next;
    highlight(true);
  }
}

function openPair(id) {
  const i = state.listIds.indexOf(id);
  if (i >= 0) state.selected = i;
  navigate(pairHash(id));
}

function onTableClick(ev) {
  const tr = ev.target.closest("tr.pair-row");
  if (!tr || ev.button !== 0) return;
  if (ev.target.closest("a")) {
    state.selected = Number(tr.dataset.index);
    return; // the link navigates (ctrl-click opens a tab)
  }
  openPair(tr.dataset.pairId);
}

/* ---------- pair view ---------- */

async function showPair(r) {
  const id = r.arg;
  const view = $("pair-view");
  if (state.pair.id === id && state.pair.data) {
    renderPair(state.pair.data);
    return;
  }
  view.innerHTML = `<p class="muted">loading pair <span class="mono">${esc(id)}</span>…</p>`;
  const seq = ++state.pair.seq;
  try {
    const data = await api(`/api/pairs/${encodeURIComponent(id)}`);
    if (seq !== state.pair.seq) return;
    state.pair = { id, data, seq };
    if (state.route.view === "pair") renderPair(data);
  } catch (err) {
    if (seq !== state.pair.seq) return;
    view.innerHTML = `<div class="pair-head"><a id="pair-back" href="${esc(state.listHash)}">&larr; list</a>
      <h2 class="mono">${esc(id)}</h2></div><p class="muted">This pair could not be loaded.</p>`;
    throw err;
  }
}

function figure(role, img, extra = "") {
  if (!img) return "";
  const roleCls = role.replace(/\s+/g, "-");
  const cap = img.caption || "";
  const size = img.width && img.height ? `${img.width}×${img.height}` : "";
  return `<figure class="img-card role-${esc(roleCls)}${extra ? " " + extra : ""}">
    <button type="button" class="zoom" data-id="${esc(img.id)}" data-caption="${esc(cap)}" title="enlarge">
      ${thumb(img.id, 160)}</button>
    <figcaption><div><b>${esc(role)}</b> <span class="mono">#${esc(img.id)}</span>
      <span class="muted small">${esc(size)}</span></div>
      <div class="caption">${esc(cap) || '<span class="muted">no caption</span>'}</div></figcaption></figure>`;
}

function flagLabel(flag) {
  return flag && flag.reason ? `flagged: ${flag.reason}` : "flagged";
}

function qualityCells(q) {
  if (!q) return '<td colspan="6" class="muted">–</td>';
  const shortcuts = [q.text_shortcut ? badge("text shortcut", "warn") : "", q.image_shortcut ? badge("image shortcut", "warn") : ""]
    .join(" ")
    .trim();
  const judge = q.judge_verdict === null || q.judge_verdict === undefined ? "–" : String(q.judge_verdict);
  return `<td class="num">${fmtNum(q.rank)}</td><td class="num">${fmtNum(q.margin)}</td>
    <td class="num">${fmtNum(q.text_only_rank)}</td><td class="num">${fmtNum(q.image_only_rank)}</td>
    <td>${shortcuts || '<span class="muted">–</span>'}</td>
    <td title="${esc(q.judge_reason || "")}">${esc(judge)}</td>`;
}

function instructionsHtml(d) {
  const list = d.instructions || [];
  if (!list.length) return '<p class="muted">no instructions</p>';
  const hasQuality = list.some((x) => x.quality);
  const head = hasQuality
    ? "<th>rank</th><th>margin</th><th>text-only rank</th><th>image-only rank</th><th>shortcut</th><th>judge</th>"
    : "";
  const rows = list
    .map((ins) => {
      const action = ins.flagged ? "unflag" : "flag";
      const state_ = ins.flagged ? badge(flagLabel(ins.flag), "flag-on") : "";
      return `<tr class="instruction${ins.flagged ? " flagged" : ""}" data-index="${esc(ins.index)}">
        <td class="num muted">${esc(ins.index)}</td>
        <td class="instr-text">${esc(ins.text)} ${state_}</td>
        ${hasQuality ? qualityCells(ins.quality) : ""}
        <td><button type="button" class="instr-flag small" data-index="${esc(ins.index)}" data-action="${action}"
          title="${action} this instruction with the reason chosen below">${ins.flagged ? "unflag" : "&#9873; flag"}</button></td></tr>`;
    })
    .join("");
  const scorers = [...new Set(list.filter((x) => x.quality && x.quality.scorer).map((x) => x.quality.scorer))];
  const scorer = scorers.length ? `<p class="muted small">scorer: <span class="mono">${esc(scorers.join(", "))}</span></p>` : "";
  return `<table id="instructions" class="grid instructions"><thead><tr><th>#</th><th>instruction</th>${head}<th></th></tr></thead>
    <tbody>${rows}</tbody></table>${scorer}`;
}

function droppedHtml(d) {
  const dropped = d.dropped_instructions || [];
  const items = dropped.map((x) => `<li>${esc(x)}</li>`).join("");
  return `<details class="dropped"><summary>dropped instructions (${dropped.length})</summary>
    ${items ? `<ul>${items}</ul>` : '<p class="muted">none</p>'}</details>`;
}

function flagPanelHtml(d) {
  const opts = FLAG_REASONS.map(
    (r) => `<option value="${r}"${r === state.flagReason ? " selected" : ""}>${r}</option>`
  ).join("");
  return `<div class="panel flag-panel"><h3>Curation</h3>
    <div class="flag-controls">
      <label>reason <select id="flag-reason">${opts}</select></label>
      <input type="text" id="flag-note" placeholder="note (optional, free text)">
      <div class="flag-buttons">
        <button type="button" id="flag-button" class="primary">&#9873; Flag pair</button>
        <button type="button" id="unflag-button"${d.flagged ? "" : " disabled"}>Unflag</button>
      </div></div>
    <p class="muted small">The reason and note also apply to an instruction's own flag button.</p></div>`;
}

function provenanceHtml(d) {
  if (d.failure) {
    const f = d.failure;
    const raw = f.raw_output ? `<details><summary>raw output</summary><pre>${esc(f.raw_output)}</pre></details>` : "";
    const { raw_output: _raw, ...rest } = f;
    return `<div class="panel failure"><h3>Annotation failure</h3>${kvTable(rest)}${raw}</div>`;
  }
  if (d.provenance) return `<div class="panel"><h3>Provenance</h3>${kvTable(d.provenance)}</div>`;
  return '<div class="panel"><h3>Provenance</h3><p class="muted">not annotated yet</p></div>';
}

function historyHtml(events) {
  if (!events || !events.length) return '<p class="muted">no flag on this pair yet</p>';
  const rows = events
    .map(
      (e) => `<tr class="action-${esc(e.action)}"><td class="small">${esc(fmtTime(e.time))}</td><td>${esc(e.user)}</td>
      <td>${esc(e.action)}</td><td>${e.instruction_index === null || e.instruction_index === undefined ? "pair" : "#" + esc(e.instruction_index)}</td>
      <td>${esc(e.reason)}</td></tr>`
    )
    .join("");
  return `<table id="flag-history" class="grid small"><thead><tr><th>time</th><th>user</th><th>action</th><th>on</th><th>reason</th></tr></thead>
    <tbody>${rows}</tbody></table>`;
}

function channelsHtml(d) {
  const rows = (d.channels || [])
    .map((ch, i) => `<tr><td>${esc(ch)}</td><td class="num">${fmtScore((d.channel_scores || [])[i])}</td></tr>`)
    .join("");
  return `<table class="grid"><thead><tr><th>channel</th><th>score</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function pairHeadHtml(d) {
  const i = state.listIds.indexOf(d.pair_id);
  const prevDis = i <= 0 ? " disabled" : "";
  const nextDis = i < 0 || i >= state.listIds.length - 1 ? " disabled" : "";
  const first = (d.instructions || [])[0];
  const search = searchHash(d.query && d.query.id, first ? first.text : "", null);
  const flag = d.flagged
    ? `<span id="pair-flag-status" class="badge flag-on">${esc(flagLabel(d.flag))}</span>`
    : '<span id="pair-flag-status" class="badge flag-off">not flagged</span>';
  return `<div class="pair-head">
    <a id="pair-back" href="${esc(state.listHash)}" title="back to the list (Esc)">&larr; list</a>
    <button type="button" id="pair-prev"${prevDis} title="previous pair (k)">&lsaquo; prev</button>
    <button type="button" id="pair-next"${nextDis} title="next pair (j)">next &rsaquo;</button>
    <h2 class="mono">${esc(d.pair_id)}</h2>
    ${statusBadge(d.status, d.failure && d.failure.reason)} ${flag}
    <span class="muted small">${esc(d.part)} &middot; rank ${esc(d.rank)}</span>
    <span class="grow"></span>
    <a id="pair-search-link" href="${esc(search)}">Search from this query &rarr;</a></div>`;
}

function renderPair(d) {
  const negs = (d.negatives || [])
    .map((n) => figure(n.false_negative ? "false negative" : "negative", n, n.false_negative ? "false-negative" : ""))
    .join("");
  const topped = d.hard_negative_topped_up ? `<p class="muted small">${esc(d.hard_negative_topped_up)} negative(s) topped up</p>` : "";
  $("pair-view").innerHTML = `${pairHeadHtml(d)}
    <div class="images">
      <div class="pair-main">${figure("query", d.query)}<span class="arrow">&rarr;</span>${figure("target", d.target)}</div>
      <div class="negatives"><h3>hard negatives (${(d.negatives || []).length})</h3><div class="neg-grid">${negs || '<p class="muted">none</p>'}</div>${topped}</div>
    </div>
    <div class="pair-cols">
      <div class="pair-left">
        <h3>Description</h3><p class="description">${d.description ? esc(d.description) : '<span class="muted">none</span>'}</p>
        <h3>Instructions</h3>${instructionsHtml(d)}${droppedHtml(d)}
      </div>
      <div class="pair-right">
        ${flagPanelHtml(d)}
        <div class="panel"><h3>Channels</h3>${channelsHtml(d)}</div>
        ${provenanceHtml(d)}
        <div class="panel"><h3>Flag history</h3>${historyHtml(d.flags)}</div>
      </div>
    </div>`;
  state.lastOpened = d.pair_id;
}

function composeReason() {
  const reason = $("flag-reason").value;
  const note = $("flag-note").value.trim();
  if (!note) return reason;
  return reason === "other" ? note : `${reason}: ${note}`;
}

function currentFlagReason(d, index) {
  if (index === null) return d.flag && d.flag.reason;
  const ins = (d.instructions || []).find((x) => x.index === index);
  return ins && ins.flag && ins.flag.reason;
}

async function postFlag(index, action) {
  const d = state.pair.data;
  if (!d) return;
  const reason = (action === "unflag" && currentFlagReason(d, index)) || composeReason();
  const buttons = $("pair-view").querySelectorAll("#flag-button, #unflag-button, .instr-flag");
  buttons.forEach((b) => {
    b.disabled = true;
  });
  try {
    await api("/api/flags", { method: "POST", json: { pair_id: d.pair_id, instruction_index: index, reason, action } });
    invalidateCaches();
    const what = index === null ? "pair" : `instruction ${index}`;
    toast(action === "flag" ? `${what} flagged: ${reason}` : `${what} unflagged`);
    const fresh = await api(`/api/pairs/${encodeURIComponent(d.pair_id)}`);
    if (state.pair.id === d.pair_id) {
      state.pair.data = fresh;
      if (state.route.view === "pair") renderPair(fresh);
    }
  } catch (err) {
    report(err);
    if (state.route.view === "pair" && state.pair.data) renderPair(state.pair.data);
  }
}

function stepPair(delta) {
  const d = state.pair.data;
  if (!d) return;
  const i = state.listIds.indexOf(d.pair_id);
  const j = i + delta;
  if (i < 0 || j < 0 || j >= state.listIds.length) return;
  state.selected = j;
  navigate(pairHash(state.listIds[j]));
}

function onPairClick(ev) {
  const t = ev.target;
  if (!(t instanceof Element)) return;
  if (t.closest("#flag-button")) postFlag(null, "flag");
  else if (t.closest("#unflag-button")) postFlag(null, "unflag");
  else if (t.closest("#pair-prev")) stepPair(-1);
  else if (t.closest("#pair-next")) stepPair(1);
  else if (t.closest(".instr-flag")) {
    const b = t.closest(".instr-flag");
    postFlag(Number(b.dataset.index), b.dataset.action);
  }
}

function onPairChange(ev) {
  if (ev.target.id === "flag-reason") state.flagReason = ev.target.value;
}

/* ---------- charts (inline SVG) ---------- */

function niceLabel(x) {
  if (typeof x !== "number") return "";
  return Math.abs(x) >= 100 || Number.isInteger(x) ? String(Math.round(x)) : x.toFixed(2);
}

function histogramSvg(h, { cls, channel = null, window: win = null, label = "" }) {
  const edges = (h && h.edges) || [];
  const counts = (h && h.counts) || [];
  if (edges.length < 2 || !counts.length) return '<p class="muted">no data</p>';
  const W = 370, H = 170, L = 36, R = 30, T = 24, B = 26;
  const x0 = edges[0], x1 = edges[edges.length - 1], span = x1 - x0 || 1;
  const maxC = Math.max(1, ...counts);
  const sx = (v) => L + ((Math.min(Math.max(v, x0), x1) - x0) / span) * (W - L - R);
  const sy = (c) => H - B - (c / maxC) * (H - T - B);
  const parts = [];
  let lo = null, hi = null;
  if (Array.isArray(win) && win.length === 2) {
    lo = typeof win[0] === "number" ? win[0] : x0;
    hi = typeof win[1] === "number" ? win[1] : x1;
    const a = sx(lo), b = sx(hi);
    parts.push(`<rect class="window-band" x="${a}" y="${T}" width="${Math.max(1, b - a)}" height="${H - T - B}"><title>window ${lo} – ${hi}</title></rect>`,
      `<line class="window-edge" x1="${a}" x2="${a}" y1="${T - 4}" y2="${H - B}"/>`,
      `<line class="window-edge" x1="${b}" x2="${b}" y1="${T - 4}" y2="${H - B}"/>`,
      `<text class="window-label" x="${Math.max(a - 3, 28)}" y="${T - 8}" text-anchor="end">${esc(niceLabel(lo))}</text>`,
      `<text class="window-label" x="${Math.min(b + 3, W - 28)}" y="${T - 8}" text-anchor="start">${esc(niceLabel(hi))}</text>`);
  }
  counts.forEach((c, i) => {
    const a = sx(edges[i]), b = sx(edges[i + 1]);
    const inside = lo !== null && edges[i] >= lo - 1e-9 && edges[i + 1] <= hi + 1e-9;
    parts.push(`<rect class="bar${inside ? " in" : ""}" x="${a + 0.5}" y="${sy(c)}" width="${Math.max(0.5, b - a - 1)}" height="${H - B - sy(c)}"><title>${esc(niceLabel(edges[i]))}–${esc(niceLabel(edges[i + 1]))}: ${c}</title></rect>`);
  });
  parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`,
    `<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`,
    `<text class="tick" x="${L}" y="${H - B + 15}" text-anchor="start">${esc(niceLabel(x0))}</text>`,
    `<text class="tick" x="${W - R}" y="${H - B + 15}" text-anchor="end">${esc(niceLabel(x1))}</text>`,
    `<text class="tick" x="${L - 4}" y="${T + 4}" text-anchor="end">${maxC}</text>`,
    `<text class="tick" x="${L - 4}" y="${H - B}" text-anchor="end">0</text>`);
  if (label) parts.push(`<text class="chart-label" x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">${esc(label)}</text>`);
  const data = channel !== null ? ` data-channel="${esc(channel)}"` : "";
  return `<svg class="${esc(cls)}"${data} viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${esc(label || cls)}">${parts.join("")}</svg>`;
}

function hbarSvg(items, { id, cls = "chart barchart" }) {
  if (!items.length) return '<p class="muted">no data</p>';
  const W = 720, rowH = 22, L = 260, R = 56, H = items.length * rowH + 6;
  const maxV = Math.max(1, ...items.map((x) => x.value));
  const rows = items.map((it, i) => {
    const y = 3 + i * rowH;
    const w = (it.value / maxV) * (W - L - R);
    const text = it.label.length > 40 ? it.label.slice(0, 39) + "…" : it.label;
    return `<g><title>${esc(it.label)}: ${it.value}</title>
      <text class="tick" x="${L - 8}" y="${y + 15}" text-anchor="end">${esc(text)}</text>
      <rect class="bar" x="${L}" y="${y + 3}" width="${Math.max(1, w)}" height="${rowH - 6}"/>
      <text class="value" x="${L + w + 5}" y="${y + 15}">${it.value}</text></g>`;
  });
  return `<svg id="${esc(id)}" class="${esc(cls)}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">${rows.join("")}</svg>`;
}

function vbarSvg(items, { id, cls = "chart barchart", label = "" }) {
  if (!items.length) return '<p class="muted">no data</p>';
  const W = 370, H = 170, L = 36, R = 12, T = 18, B = 30;
  const maxV = Math.max(1, ...items.map((x) => x.value));
  const slot = (W - L - R) / items.length;
  const bars = items.map((it, i) => {
    const h = (it.value / maxV) * (H - T - B);
    const x = L + i * slot;
    return `<g><title>${esc(it.label)}: ${it.value}</title>
      <rect class="bar" x="${x + slot * 0.15}" y="${H - B - h}" width="${slot * 0.7}" height="${h}"/>
      <text class="tick" x="${x + slot / 2}" y="${H - B + 13}" text-anchor="middle">${esc(it.label)}</text></g>`;
  });
  const axis = `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>
    <text class="tick" x="${L - 4}" y="${T + 4}" text-anchor="end">${maxV}</text>
    <text class="tick" x="${L - 4}" y="${H - B}" text-anchor="end">0</text>
    ${label ? `<text class="chart-label" x="${(L + W - R) / 2}" y="${H - 3}" text-anchor="middle">${esc(label)}</text>` : ""}`;
  return `<svg id="${esc(id)}" class="${esc(cls)}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">${bars.join("")}${axis}</svg>`;
}

/* ---------- overview ---------- */

async function showOverview() {
  const view = $("overview-view");
  if (!state.overviewPromise) view.innerHTML = '<p class="muted">loading overview…</p>';
  let ov;
  try {
    ov = await ensureOverview();
  } catch (err) {
    view.innerHTML = '<p class="muted">The overview could not be loaded.</p>';
    state.overviewRendered = null;
    throw err;
  }
  if (state.route.view === "overview" && state.overviewRendered !== ov) {
    renderOverview(ov);
    state.overviewRendered = ov;
  }
}

function stagesHtml(stages) {
  const rows = (stages || [])
    .map((s) => {
      const counts = Object.entries(s.counts || {})
        .map(([k, v]) => `<span class="kvp">${esc(k)} <b>${fmtNum(v)}</b></span>`)
        .join(" ");
      const planned = s.parts_planned === undefined || s.parts_planned === null ? null : s.parts_planned;
      const done = planned === null || s.parts_done === planned ? "done" : "partial";
      const parts = planned === null ? esc(s.parts_done) : `${esc(s.parts_done)}/${esc(planned)}`;
      return `<tr><td>${esc(s.stage)}</td><td class="num ${done}">${parts}</td><td>${counts}</td></tr>`;
    })
    .join("");
  return `<table id="stages-table" class="grid"><thead><tr><th>stage</th><th>parts</th><th>counts</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function rejectsHtml(rejects) {
  if (!rejects || !rejects.length) return '<p class="muted">no rejects</p>';
  const rows = rejects
    .map((r) => {
      const thumbs = (r.examples || [])
        .slice(0, 8)
        .map((id) => `<button type="button" class="zoom" data-id="${esc(id)}" data-caption="${esc(r.reason)}">${thumb(id, 64, "small", " data-why")}</button>`)
        .join("");
      return `<tr><td>${esc(r.stage)}</td><td>${esc(r.reason)}</td><td class="num">${fmtNum(r.count)}</td><td class="thumbs">${thumbs}</td></tr>`;
    })
    .join("");
  return `<table id="rejects-table" class="grid"><thead><tr><th>stage</th><th>reason</th><th>count</th><th>examples</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function channelHistogramsHtml(channels) {
  if (!channels || !channels.length) return '<p class="muted">no channels</p>';
  return channels
    .map((c) => {
      const win = Array.isArray(c.window) ? c.window.map((x) => niceLabel(x)).join(" – ") : "–";
      return `<figure class="chart-card"><figcaption><b>${esc(c.name)}</b> <span class="muted">window ${esc(win)} &middot; ${fmtNum(c.pairs)} pairs</span></figcaption>
        ${histogramSvg(c.histogram, { cls: "chart histogram", channel: c.name, window: c.window, label: "neighbour score" })}</figure>`;
    })
    .join("");
}

function annotationHtml(a) {
  if (!a) return '<p class="muted">no annotation stage</p>';
  const fails = (a.failures || [])
    .map((f) => `<tr><td><a href="#/pairs?status=failed&failure=${encodeURIComponent(f.reason)}">${esc(f.reason)}</a></td><td class="num">${fmtNum(f.count)}</td></tr>`)
    .join("");
  return `<p><span class="kvp">annotated <b>${fmtNum(a.annotated)}</b></span> <span class="kvp">failed <b>${fmtNum(a.failed)}</b></span>
    <span class="kvp">pending <b>${fmtNum(a.pending)}</b></span></p>
    ${fails ? `<table id="failures-table" class="grid"><thead><tr><th>failure reason</th><th>count</th></tr></thead><tbody>${fails}</tbody></table>` : '<p class="muted">no annotation failure</p>'}`;
}

function countTable(obj, keyName, id) {
  const entries = Object.entries(obj || {}).sort((a, b) => b[1] - a[1]);
  if (!entries.length) return '<p class="muted">none</p>';
  const rows = entries.map(([k, v]) => `<tr><td>${esc(k)}</td><td class="num">${fmtNum(v)}</td></tr>`).join("");
  return `<table id="${esc(id)}" class="grid"><thead><tr><th>${esc(keyName)}</th><th>count</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function flagsSummaryHtml(s, prefix) {
  if (!s) return '<p class="muted">no flags</p>';
  return `<p><span class="kvp">flagged pairs <b>${fmtNum(s.flagged_pairs)}</b></span>
    <span class="kvp">flagged instructions <b>${fmtNum(s.flagged_instructions)}</b></span>
    <span class="kvp">events <b>${fmtNum(s.events)}</b></span></p>
    <div class="two">${countTable(s.by_reason, "reason", `${prefix}-by-reason`)}${countTable(s.by_user, "user", `${prefix}-by-user`)}</div>`;
}

function renderOverview(ov) {
  const rec = ov.records || {};
  const combos = (ov.combinations || []).map((c) => ({ label: c.channels.join(" + "), value: c.pairs }));
  const ipp = (ov.instructions_per_pair || []).map((x) => ({ label: String(x.instructions), value: x.pairs }));
  $("overview-view").innerHTML = `
    <h2>Overview <span class="muted mono small">${esc(ov.run)}</span></h2>
    <div class="two">
      <section class="panel"><h3>Stages</h3>${stagesHtml(ov.stages)}
        <p><span class="kvp">corpus <b>${fmtNum(rec.corpus)}</b></span> <span class="kvp">rejected <b>${fmtNum(rec.rejected)}</b></span></p></section>
      <section class="panel"><h3>Annotation</h3>${annotationHtml(ov.annotation)}</section>
    </div>
    <section class="panel"><h3>Rejects by reason</h3>${rejectsHtml(ov.rejects)}</section>
    <section class="panel"><h3>Neighbour scores per channel</h3><p class="muted small">shaded: the channel's mining window</p>
      <div class="charts">${channelHistogramsHtml(ov.channels)}</div></section>
    <section class="panel"><h3>Pairs per channel combination</h3>${hbarSvg(combos, { id: "combo-chart" })}</section>
    <div class="two">
      <section class="panel"><h3>Instructions per pair</h3>${vbarSvg(ipp, { id: "ipp-chart", label: "instructions" })}</section>
      <section class="panel"><h3>Instruction length</h3>${histogramSvg(ov.instruction_words, { cls: "chart words-histogram", label: "words" })}</section>
    </div>
    <section class="panel"><h3>Flags</h3>${flagsSummaryHtml(ov.flags, "overview-flags")}</section>`;
}

/* ---------- flags ---------- */

async function showFlags() {
  if (!state.flags) {
    $("flags-view").innerHTML = '<p class="muted">loading flags…</p>';
    try {
      state.flags = await api("/api/flags");
    } catch (err) {
      $("flags-view").innerHTML =
        '<p class="muted">The flags could not be loaded. <button type="button" id="flags-refresh">retry</button></p>';
      throw err;
    }
  }
  if (state.route.view === "flags") renderFlags(state.flags);
}

function renderFlags(f) {
  const events = [...(f.events || [])].reverse();
  const rows = events
    .map((e) => {
      const on = e.instruction_index === null || e.instruction_index === undefined
        ? "pair"
        : `instr. ${esc(e.instruction_index)}${e.instruction ? `: <span class="muted">${esc(e.instruction)}</span>` : ""}`;
      return `<tr class="flag-event action-${esc(e.action)}"><td class="small">${esc(fmtTime(e.time))}</td><td>${esc(e.user)}</td>
        <td>${esc(e.action)}</td><td class="mono"><a class="pair-link" href="${esc(pairHash(e.pair_id))}">${esc(e.pair_id)}</a></td>
        <td>${on}</td><td>${esc(e.reason)}</td></tr>`;
    })
    .join("");
  $("flags-view").innerHTML = `
    <div class="view-head"><h2>Flags</h2><span class="grow"></span>
      <a href="#/pairs?flagged=yes">flagged pairs in the list &rarr;</a>
      <button type="button" id="flags-refresh">reload</button></div>
    <section class="panel"><h3>Summary</h3>${flagsSummaryHtml(f.summary, "flags")}</section>
    <section class="panel"><h3>Events (newest first)</h3>
      ${rows ? `<table id="flags-table" class="grid"><thead><tr><th>time</th><th>user</th><th>action</th><th>pair</th><th>on</th><th>reason</th></tr></thead><tbody>${rows}</tbody></table>` : '<p class="muted">no flag yet</p>'}
    </section>`;
}

function onFlagsClick(ev) {
  if (ev.target.id === "flags-refresh") {
    state.flags = null;
    route();
  }
}

/* ---------- search ---------- */

function stopPolling() {
  clearTimeout(state.search.poll);
  state.search.poll = null;
}

function renderSearchStatus(st) {
  state.search.status = st;
  const stateCls = `state-${esc(st.state)}`;
  const disabled = st.enabled === false ? '<p class="warn-text">Search is disabled on this server.</p>' : "";
  const err = st.error ? `<p class="warn-text">gallery error: ${esc(st.error)}</p>` : "";
  $("search-status").innerHTML = `${disabled}
    <span class="kvp">retriever <b>${esc(st.retriever)}</b></span>
    <span class="kvp">model <b class="mono">${esc(st.model || "–")}</b></span>
    <span class="kvp">gallery <span id="search-state" class="badge ${stateCls}">${esc(st.state)}</span></span>
    <span class="kvp">images <b>${fmtNum(st.total)}</b></span>${err}`;
  const build = $("search-build");
  build.hidden = !(st.enabled !== false && (st.state === "missing" || st.state === "error"));
  build.disabled = false;
  build.textContent = st.state === "error" ? "Retry building the gallery" : "Build gallery";
  const showProgress = st.state === "building";
  $("search-progress").hidden = !showProgress;
  const total = Number(st.total) || 0;
  const done = Number(st.done) || 0;
  $("search-progress").firstElementChild.style.width = `${total ? Math.min(100, (100 * done) / total) : 0}%`;
  $("search-progress-text").textContent = showProgress ? `${done}/${total}` : "";
}

async function refreshSearchStatus() {
  const st = await api("/api/search/status");
  renderSearchStatus(st);
  if (st.state === "building") schedulePoll();
  return st;
}

function schedulePoll() {
  stopPolling();
  state.search.poll = setTimeout(pollSearchStatus, 500);
}

async function pollSearchStatus() {
  state.search.poll = null;
  if (!state.route || state.route.view !== "search") return;
  try {
    const st = await refreshSearchStatus();
    if (st.state === "ready") {
      toast("search gallery ready");
      maybeRunRouteSearch();
    } else if (st.state === "error") {
      showError(`building the search gallery failed: ${st.error || "unknown error"}`);
    }
  } catch (err) {
    report(err);
  }
}

async function buildGallery() {
  $("search-build").disabled = true;
  try {
    const st = await api("/api/search/build", { method: "POST" });
    renderSearchStatus(st);
    if (st.state === "building") schedulePoll();
    else if (st.state === "ready") maybeRunRouteSearch();
  } catch (err) {
    $("search-build").disabled = false;
    report(err);
  }
}

function updatePreview() {
  const box = $("search-image-preview");
  const file = $("search-file").files[0];
  const id = $("search-image-id").value.trim();
  $("search-file-clear").hidden = !file;
  if (file) {
    const url = URL.createObjectURL(file);
    box.innerHTML = `<img class="upload-preview" alt="upload" width="120" height="120">`;
    box.firstElementChild.src = url;
    box.firstElementChild.onload = () => URL.revokeObjectURL(url);
  } else if (/^\d+$/.test(id)) {
    if (box.dataset.id !== id) box.innerHTML = `<button type="button" class="zoom" data-id="${esc(id)}" data-caption="query">${thumb(id, 120)}</button>`;
  } else {
    box.innerHTML = '<span class="no-preview">no image</span>';
  }
  box.dataset.id = file ? "" : id;
}

function searchFromRoute() {
  const p = state.route.params;
  return { image: (p.get("image") || "").trim(), text: p.get("text") || "", k: Number(p.get("k")) || DEFAULT_K };
}

async function showSearch(r) {
  if (r.hash !== state.search.appliedHash) {
    const q = searchFromRoute();
    $("search-image-id").value = q.image;
    $("search-text").value = q.text;
    $("search-k").value = String(q.k);
  }
  state.search.appliedHash = null;
  updatePreview();
  const st = await refreshSearchStatus();
  if (st.enabled !== false && st.state === "missing") {
    await buildGallery(); // first use: embed the gallery now, with its progress bar
    return;
  }
  maybeRunRouteSearch();
}

function maybeRunRouteSearch() {
  if (!state.route || state.route.view !== "search") return;
  const q = searchFromRoute();
  if (!q.image && !q.text) return;
  const st = state.search.status;
  if (!st || st.state !== "ready") {
    $("search-meta").textContent = "The search gallery is being built: the search runs when it is ready.";
    return;
  }
  runSearch(q, null, false).catch(report);
}

async function runSearch(q, file, force) {
  const key = JSON.stringify(q);
  if (!file && !force && state.search.key === key && state.search.data) {
    renderResults(state.search.data);
    return;
  }
  const seq = ++state.search.seq;
  $("search-results").classList.add("stale");
  try {
    let data;
    if (file) {
      const form = new FormData();
      form.append("image", file);
      form.append("text", q.text);
      form.append("k", String(q.k));
      data = await api("/api/search/upload", { method: "POST", form });
    } else {
      const imageId = q.image === "" ? null : Number(q.image);
      data = await api("/api/search", { method: "POST", json: { image_id: imageId, text: q.text, k: q.k } });
    }
    if (seq !== state.search.seq) return;
    state.search.key = file ? null : key;
    state.search.data = data;
    if (state.route.view === "search") renderResults(data);
  } finally {
    if (seq === state.search.seq) $("search-results").classList.remove("stale");
  }
}

function renderResults(data) {
  const q = data.query || {};
  const text = q.text || "";
  const k = Number($("search-k").value) || DEFAULT_K;
  const what = [q.image_id !== null && q.image_id !== undefined ? `image #${q.image_id}` : "", text ? `“${text}”` : ""]
    .filter(Boolean)
    .join(" + ");
  $("search-meta").textContent = `${(data.results || []).length} results for ${what || "an uploaded image"} · ${data.retriever} · ${fmtMs(data.elapsed_ms)}`;
  const hits = (data.results || [])
    .map(
      (h, i) => `<a class="search-hit" data-id="${esc(h.id)}" href="${esc(searchHash(h.id, text, k))}" title="search from this image">
      ${thumb(h.id, 150)}
      <div class="hit-meta"><span class="muted">${i + 1}.</span> <span class="mono">#${esc(h.id)}</span><span class="score">${fmtScore(h.score)}</span></div>
      <div class="hit-caption" title="${esc(h.caption || "")}">${esc(h.caption || "")}</div></a>`
    )
    .join("");
  $("search-results").innerHTML = hits || '<p class="muted">no result</p>';
}

function onSearchSubmit(ev) {
  ev.preventDefault();
  const file = $("search-file").files[0];
  const image = $("search-image-id").value.trim();
  const text = $("search-text").value.trim();
  const k = Math.max(1, Math.min(500, Number($("search-k").value) || DEFAULT_K));
  if (file) {
    runSearch({ image: "", text, k }, file, true).catch(report);
    return;
  }
  const hash = searchHash(image, text, k);
  if (hash === location.hash) {
    clearError();
    runSearch({ image, text, k }, null, true).catch(report);
  } else {
    state.search.appliedHash = hash;
    location.hash = hash;
  }
}

function onSearchInput(ev) {
  if (ev.target.id === "search-image-id") {
    if (ev.target.value.trim()) $("search-file").value = "";
    updatePreview();
  }
}

function onSearchChange(ev) {
  if (ev.target.id === "search-file") {
    if (ev.target.files[0]) $("search-image-id").value = "";
    updatePreview();
  }
}

function onSearchClick(ev) {
  if (ev.target.id === "search-build") buildGallery();
  else if (ev.target.id === "search-file-clear") {
    $("search-file").value = "";
    updatePreview();
  }
}

/* ---------- keyboard, help ---------- */

function toggleHelp(force) {
  const help = $("help");
  help.hidden = force === undefined ? !help.hidden : !force;
}

function focusTextFilter() {
  if (state.route.view !== "pairs") navigate(state.listHash || "#/pairs");
  const el = $("f-q");
  if (el) el.focus();
}

function onEscape(ev) {
  if (lightboxOpen()) closeLightbox();
  else if (!$("help").hidden) toggleHelp(false);
  else if (isTyping(ev.target)) ev.target.blur();
  else if (state.route && state.route.view === "pair") navigate(state.listHash || "#/pairs");
  else return;
  ev.preventDefault();
}

function onPairsKey(key, target) {
  if (key === "j") moveSelection(1);
  else if (key === "k") moveSelection(-1);
  else if (key === "n") page(1);
  else if (key === "p") page(-1);
  else if (key === "Enter") {
    if (target instanceof Element && target.closest("button, a")) return false;
    const id = state.listIds[state.selected];
    if (id === undefined) return false;
    openPair(id);
  } else return false;
  return true;
}

function onPairKey(key) {
  if (key === "j" || key === "n") stepPair(1);
  else if (key === "k" || key === "p") stepPair(-1);
  else if (key === "f") {
    const el = $("flag-reason");
    if (!el) return false;
    el.focus();
  } else return false;
  return true;
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !state.route) return;
  if (ev.key === "Escape") {
    onEscape(ev);
    return;
  }
  if (isTyping(ev.target) || lightboxOpen()) return;
  let handled = true;
  if (ev.key === "?") toggleHelp();
  else if (ev.key === "/") focusTextFilter();
  else if (state.route.view === "pairs") handled = onPairsKey(ev.key, ev.target);
  else if (state.route.view === "pair") handled = onPairKey(ev.key);
  else handled = false;
  if (handled) ev.preventDefault();
}

/* ---------- start ---------- */

function readToken() {
  const meta = document.querySelector('meta[name="megapairs-token"]');
  const token = meta ? meta.getAttribute("content") || "" : "";
  return token === PLACEHOLDER ? "" : token;
}

function bind() {
  const filters = $("filters");
  filters.addEventListener("input", onFilterInput);
  filters.addEventListener("change", onFilterChange);
  filters.addEventListener("submit", onFilterSubmit);
  filters.addEventListener("click", onFilterClick);
  $("pairs-table").addEventListener("click", onTableClick);
  $("pairs-view").addEventListener("click", blurAfterMouseClick);
  $("pager-prev").addEventListener("click", () => page(-1));
  $("pager-next").addEventListener("click", () => page(1));
  const pairView = $("pair-view");
  pairView.addEventListener("click", onPairClick);
  pairView.addEventListener("change", onPairChange);
  $("flags-view").addEventListener("click", onFlagsClick);
  const search = $("search-view");
  search.addEventListener("click", onSearchClick);
  search.addEventListener("input", onSearchInput);
  search.addEventListener("change", onSearchChange);
  $("search-form").addEventListener("submit", onSearchSubmit);
  document.addEventListener("click", onZoomClick);
  document.addEventListener("error", onImageError, true);
  document.addEventListener("keydown", onKey);
  $("lightbox").addEventListener("click", closeLightbox);
  $("error-close").addEventListener("click", clearError);
  $("help-toggle").addEventListener("click", () => toggleHelp());
  $("help").addEventListener("click", () => toggleHelp(false));
  window.addEventListener("hashchange", route);
  window.addEventListener("unhandledrejection", (ev) => report(ev.reason));
  window.addEventListener("error", (ev) => {
    if (ev.error) report(ev.error);
  });
}

function start() {
  state.token = readToken();
  if (state.token) {
    const value = /^[\w.~-]+$/.test(state.token) ? state.token : encodeURIComponent(state.token);
    document.cookie = `megapairs_token=${value}; path=/; SameSite=Strict`;
  }
  bind();
  route();
}

document.addEventListener("DOMContentLoaded", start);
