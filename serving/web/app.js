// The page: pick or drop an image, send it to the API as a multipart upload, show what comes back; filter the
// search, ask for more like any result, and (with a write key) add images or delete items.
// Plain browser JavaScript, no build step; it only uses the public HTTP API (and /info for what to show).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "mae.apiKey";  // the key the user gave, kept in this browser only
let info = null;
let lastQuery = null;  // {file} or {id}: what the results show, rerun when the filters change
let queryRun = 0;  // the newest query; answers to older ones (a filter changed meanwhile) are dropped, not shown

function show(el, visible) { el.hidden = !visible; }

function setError(message) {
  $("error").textContent = message || "";
  show($("error"), Boolean(message));
}

// Errors come as {"error": "...", "detail"?: [...]}.
async function errorOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return body.error + (body.detail ? ": " + JSON.stringify(body.detail) : "");
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText} ${text.slice(0, 200)}`;
}

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function withKey(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function api(endpoint, options = {}) {
  const response = await fetch(endpoint, { ...options, headers: withKey(options.headers) });
  if (!response.ok) {
    const error = new Error(`${endpoint.split("?")[0]}: ${await errorOf(response)}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

// The filter box as "where" conditions (retrieval/catalog.py): a label and a folder prefix.
function conditions() {
  const where = [];
  const label = $("filter-label").value.trim();
  const folder = $("filter-folder").value.trim();
  if (label) where.push(`label=${label}`);
  if (folder) where.push(`path^=${folder}`);
  return where;
}

async function post(endpoint, file, k, where = []) {
  const form = new FormData();
  form.append("images", file, file.name || "image");
  if (k !== null) form.append("k", String(k));
  for (const w of where) form.append("where", w);
  return api(endpoint, { method: "POST", body: form });
}

function canWrite() { return Boolean(info && info.index && info.auth && info.auth.scope === "write"); }

// Thumbnails are <img> elements, which cannot send a key: where reads need one, fetch them and show the bytes.
async function setThumbnail(img, url) {
  if (!(info && info.auth && info.auth.keys && !info.auth.public_read)) {
    img.src = url;
    return;
  }
  try {
    const response = await fetch(url, { headers: withKey() });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
  } catch (_) { /* the card keeps its empty frame */ }
}

function describeModel() {
  const parts = [
    `model ${info.model.slice(0, 12)}`,
    `${info.dim}-d embeddings`,
    `input ${info.input_size.join("×")}`,
    `backend ${info.backend.backend}`,
    info.labels ? `${info.labels.length} labels` : "no classification head",
    info.index ? `index of ${info.index.count} images` : "no index",
    info.batching.enabled ? `adaptive batching ≤ ${info.batching.max_batch_size}` : "batching off",
  ];
  $("model-info").textContent = parts.join(" · ");
  show($("no-index"), !info.index);
  show($("filters"), Boolean(info.index));
  show($("add-panel"), canWrite());
  const labels = $("label-list");
  labels.replaceChildren();
  for (const name of Object.keys((info.index && info.index.labels) || {})) {
    if (!name) continue;
    const option = document.createElement("option");
    option.value = name;
    labels.append(option);
  }
}

function renderLabels(predictions) {
  const list = $("labels");
  list.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    li.className = "label-row";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = p.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * p.probability).toFixed(1)}%`;
    const prob = document.createElement("span");
    prob.className = "p";
    prob.textContent = `${(100 * p.probability).toFixed(1)}%`;
    li.append(name, bar, prob);
    list.append(li);
  }
  show($("labels-panel"), predictions.length > 0);
}

function button(text, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function renderNeighbours(neighbours) {
  const list = $("neighbours");
  list.replaceChildren();
  for (const n of neighbours) {
    const li = document.createElement("li");
    li.className = "neighbour";
    li.dataset.id = String(n.id);
    const img = document.createElement("img");
    img.alt = n.path;
    img.loading = "lazy";
    setThumbnail(img, n.thumbnail);
    const path = document.createElement("span");
    path.className = "path mono";
    path.textContent = n.path.split(/[\\/]/).slice(-2).join("/");  // folder (often the class) and file name
    path.title = n.path;
    const meta = document.createElement("span");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = n.score.toFixed(4);
    meta.append(score);
    if (n.label !== null && n.label !== undefined) {
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = n.label;
      meta.append(label);
    }
    const actions = document.createElement("span");
    actions.className = "actions";
    actions.append(button("more like this", "similar", () => moreLike(n.id, n.path)));
    if (canWrite()) actions.append(button("delete", "delete", () => removeItem(n.id, li)));
    li.append(img, path, meta, actions);
    list.append(li);
  }
  $("neighbours-count").textContent = neighbours.length ? `(${neighbours.length})` : "";
}

function resultsK() { return Math.max(1, Math.min(100, parseInt($("k").value, 10) || 8)); }

function finish(started, failed) {
  if (failed.length) setError(failed.join("\n"));
  $("status").textContent = failed.length ? "failed" : `done in ${Math.round(performance.now() - started)} ms`;
  document.body.dataset.state = failed.length ? "error" : "done";
}

async function query(file) {
  if (!file) return;
  lastQuery = { file };
  const run = ++queryRun;
  const current = (render) => (answer) => { if (run === queryRun) render(answer); };
  setError("");
  $("preview").src = URL.createObjectURL(file);
  show($("preview"), true);
  $("drop-text").textContent = file.name || "pasted image";
  $("results-title").textContent = "Nearest neighbours";
  const k = resultsK();
  document.body.dataset.state = "working";
  $("status").textContent = "working…";
  const started = performance.now();
  const jobs = [];
  if (info && info.index) {
    jobs.push(post("/search", file, k, conditions()).then(current((r) => renderNeighbours(r.neighbours[0]))));
  }
  if (info && info.labels) {
    jobs.push(post("/classify", file, Math.min(k, 5)).then(current((r) => renderLabels(r.predictions[0]))));
  }
  if (!info || (!info.index && !info.labels)) {
    jobs.push(post("/embed", file, null).then(current((r) => {
      const v = r.embeddings[0];
      $("embedding").textContent = `${r.dim} numbers: [${v.slice(0, 6).map((x) => x.toFixed(3)).join(", ")}, …]`;
      show($("embedding-panel"), true);
    })));
  }
  const results = await Promise.allSettled(jobs);
  if (run !== queryRun) return;  // a newer query owns the page now
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) {
    renderNeighbours([]);
    show($("labels-panel"), false);
  }
  finish(started, failed);
}

// "More like this": the item's stored vector is the query (the item itself is left out of the answer).
async function moreLike(id, path) {
  lastQuery = { id, path };
  const run = ++queryRun;
  setError("");
  document.body.dataset.state = "working";
  const started = performance.now();
  const params = new URLSearchParams({ k: String(resultsK()) });
  for (const w of conditions()) params.append("where", w);
  try {
    const answer = await api(`/items/${id}/similar?${params}`);
    if (run !== queryRun) return;
    await setThumbnail($("preview"), answer.item.thumbnail);
    if (run !== queryRun) return;
    show($("preview"), true);
    $("drop-text").textContent = `item ${id}`;
    $("results-title").textContent = `More like ${path.split(/[\\/]/).slice(-2).join("/")}`;
    show($("labels-panel"), false);
    renderNeighbours(answer.neighbours);
    finish(started, []);
  } catch (e) {
    if (run === queryRun) finish(started, [e.message]);
  }
}

async function addImages() {
  const files = [...$("add-files").files];
  if (!files.length) return;
  setError("");
  document.body.dataset.state = "working";
  const started = performance.now();
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name || "image");
  const label = $("add-label").value.trim();
  if (label) form.append("label", label);
  try {
    const answer = await api("/items", { method: "POST", body: form });
    const added = answer.added.map((a) => `#${a.id}`).join(", ");
    $("add-status").textContent = `added ${answer.added.length}${added ? ` (${added})` : ""}` +
      (answer.duplicates.length ? `; ${answer.duplicates.length} already indexed` : "") +
      `; the index holds ${answer.count}`;
    info.index.count = answer.count;
    describeModel();
    $("add-files").value = "";
    finish(started, []);
  } catch (e) {
    $("add-status").textContent = "";
    finish(started, [e.message]);
  }
}

async function removeItem(id, card) {
  setError("");
  document.body.dataset.state = "working";
  const started = performance.now();
  try {
    const answer = await api(`/items/${id}`, { method: "DELETE" });
    card.remove();
    $("add-status").textContent = `deleted #${id}; the index holds ${answer.count}`;
    info.index.count = answer.count;
    describeModel();
    finish(started, []);
  } catch (e) {
    finish(started, [e.message]);
  }
}

function rerun() {
  if (!lastQuery) return;
  if (lastQuery.file) query(lastQuery.file);
  else moreLike(lastQuery.id, lastQuery.path);
}

function wire() {
  const drop = $("drop");
  $("preview").addEventListener("error", () => show($("preview"), false));  // not something the browser can show
  $("file").addEventListener("change", (e) => query(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => query(e.dataTransfer.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) query(item.getAsFile());
  });
  for (const id of ["filter-label", "filter-folder"]) $(id).addEventListener("change", rerun);
  $("add-button").addEventListener("click", addImages);
  $("key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORE, $("key").value.trim());
    start();
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    $("key").value = "";
    start();
  });
}

async function start() {
  setError("");
  document.body.dataset.state = "loading";
  try {
    info = await api("/info");
    describeModel();
    const scope = info.auth && info.auth.scope;
    $("key-status").textContent = scope ? `key accepted (${scope})` : (info.auth && info.auth.keys ? "reading without a key" : "");
    document.body.dataset.state = "ready";
  } catch (e) {
    info = null;
    if (e.status === 401) {
      $("key-status").textContent = apiKey() ? "this key is not accepted" : "";
      setError("This server needs an API key: enter it above.");
      document.body.dataset.state = "locked";
    } else {
      setError(`cannot read /info: ${e.message}`);
    }
  }
}

wire();
start();
