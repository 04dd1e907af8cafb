// The page: pick or drop an image, send it to the API as a multipart upload, show what comes back.
// Plain browser JavaScript, no build step; it only uses the public HTTP API (and /info for what to show).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

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

async function post(endpoint, file, k) {
  const form = new FormData();
  form.append("images", file, file.name || "image");
  if (k !== null) form.append("k", String(k));
  const response = await fetch(endpoint, { method: "POST", body: form });
  if (!response.ok) throw new Error(`${endpoint}: ${await errorOf(response)}`);
  return response.json();
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

function renderNeighbours(neighbours) {
  const list = $("neighbours");
  list.replaceChildren();
  for (const n of neighbours) {
    const li = document.createElement("li");
    li.className = "neighbour";
    li.dataset.id = String(n.id);
    const img = document.createElement("img");
    img.src = n.thumbnail;
    img.alt = n.path;
    img.loading = "lazy";
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
    li.append(img, path, meta);
    list.append(li);
  }
  $("neighbours-count").textContent = neighbours.length ? `(${neighbours.length})` : "";
}

async function query(file) {
  if (!file) return;
  setError("");
  $("preview").src = URL.createObjectURL(file);
  show($("preview"), true);
  $("drop-text").textContent = file.name || "pasted image";
  const k = Math.max(1, Math.min(100, parseInt($("k").value, 10) || 8));
  $("status").textContent = "working…";
  const started = performance.now();
  const jobs = [];
  if (info && info.index) jobs.push(post("/search", file, k).then((r) => renderNeighbours(r.neighbours[0])));
  if (info && info.labels) jobs.push(post("/classify", file, Math.min(k, 5)).then((r) => renderLabels(r.predictions[0])));
  if (!info || (!info.index && !info.labels)) {
    jobs.push(post("/embed", file, null).then((r) => {
      const v = r.embeddings[0];
      $("embedding").textContent = `${r.dim} numbers: [${v.slice(0, 6).map((x) => x.toFixed(3)).join(", ")}, …]`;
      show($("embedding-panel"), true);
    }));
  }
  const results = await Promise.allSettled(jobs);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) {
    setError(failed.join("\n"));
    renderNeighbours([]);
    show($("labels-panel"), false);
  }
  $("status").textContent = failed.length ? "failed" : `done in ${Math.round(performance.now() - started)} ms`;
  document.body.dataset.state = failed.length ? "error" : "done";
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
}

async function start() {
  wire();
  try {
    const response = await fetch("/info");
    if (!response.ok) throw new Error(await errorOf(response));
    info = await response.json();
    describeModel();
    document.body.dataset.state = "ready";
  } catch (e) {
    setError(`cannot read /info: ${e.message}`);
  }
}

start();
