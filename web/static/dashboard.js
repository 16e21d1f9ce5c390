// Kiln dashboard: polls the JSON API with the token kept in sessionStorage.
"use strict";

const TOKEN_KEY = "kiln.token";
const FINISHED = ["succeeded", "failed", "cancelled"];
const $ = id => document.getElementById(id);
const state = {jobId: null, logOffset: 0, metricsKey: "", timers: [], jobs: [], models: [], view: "jobs",
               compare: new Set(), metricsCache: new Map(), sweep: null, trials: []};

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

class AuthError extends Error {}
// An API error: status, the error's code, message and details (field errors for a 422) as the server sent them.
class ApiError extends Error {
  constructor(status, statusText, body) {
    const err = (body && typeof body === "object" && body.error) || {};
    super(err.code ? err.code + ": " + err.message : status + " " + statusText);
    this.status = status;
    this.code = err.code || null;
    this.serverMessage = typeof err.message === "string" ? err.message : null;
    this.details = Array.isArray(err.details) ? err.details : [];
  }
}

function parseBody(text) { try { return JSON.parse(text); } catch (e) { return null; } }

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, {headers}));
  if (resp.status === 401) throw new AuthError("token missing, invalid or revoked");
  if (!resp.ok) throw new ApiError(resp.status, resp.statusText, parseBody(await resp.text()));
  return resp;
}
const getJSON = async path => (await api(path)).json();
const sendJSON = async (method, path, body) =>
  (await api(path, {method, headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})).json();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(sec).padStart(2, "0");
}
const fmtNum = v => typeof v === "number" ? v.toPrecision(4) : "–";
const fmtBytes = n => n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB";
const fmtTime = t => t ? new Date(t).toLocaleString() : "";

function progressBar(percent, big) {
  const inner = el("div", {"data-percent": String(percent || 0)});
  inner.style.width = Math.min(100, percent || 0) + "%";
  return el("div", {class: big ? "bar big" : "bar"}, inner);
}

function setConn(text, isError) {
  $("conn").textContent = text;
  $("conn").className = isError ? "error" : "muted";
}

// ---------------------------------------------------------------- token
function askToken(message) {
  $("app").hidden = true;
  $("token-panel").hidden = false;
  $("token-error").textContent = message || "";
  $("token-input").focus();
}

$("token-form").addEventListener("submit", ev => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
  $("token-input").value = "";
  start();
});
$("token-button").addEventListener("click", () => askToken(""));

// ---------------------------------------------------------------- jobs list
async function refreshJobs() {
  const data = await getJSON("/v1/jobs?limit=50");
  state.jobs = data.jobs;
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren(...data.jobs.map(job => {
    const p = job.progress || {};
    const row = el("tr", {class: "job-row" + (job.id === state.jobId ? " selected" : ""), "data-job": job.id},
      el("td", {}, el("code", {}, job.id.slice(0, 12))), el("td", {}, job.kind + (job.parent ? " (trial)" : "")),
      el("td", {}, el("span", {class: "state " + job.status}, job.status)),
      el("td", {}, progressBar(p.percent), " ", (p.percent || 0).toFixed(0) + "%"),
      el("td", {class: "muted"}, job.status === "running" ? fmtDuration(p.eta_s) : job.status === "queued" ? queueText(job) : ""),
      el("td", {}, fmtTime(job.created_at)));
    row.addEventListener("click", () => openJob(job.id));
    return row;
  }));
  $("jobs-count").textContent = "(" + data.jobs.length + " of " + data.total + ")";
  renderCompareList();
}

// ---------------------------------------------------------------- one job
function openJob(id) {
  state.jobId = id; state.logOffset = 0; state.metricsKey = "";
  $("job-action").textContent = "";
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("log").textContent = "";
  $("artifacts").replaceChildren();
  for (const c of ["loss-chart", "acc-chart"]) drawLineChart($(c), []);
  refreshJob().catch(report);
}

async function refreshJob() {
  const id = state.jobId;
  if (!id) return;
  let job;
  try { job = await getJSON("/v1/jobs/" + id); }
  catch (e) {
    if (e instanceof ApiError && e.status === 404 && id === state.jobId) { closeJob(); return; }  // deleted
    throw e;
  }
  if (id !== state.jobId) return;
  const p = job.progress || {}, latest = (job.metrics || {}).latest || {}, best = (job.metrics || {}).best || {};
  $("job-state").textContent = job.status;
  $("job-state").className = "state " + job.status;
  $("job-bar").style.width = Math.min(100, p.percent || 0) + "%";
  $("job-bar").dataset.percent = String(p.percent || 0);
  $("job-summary").textContent = "epoch " + (p.epoch || 0) + "/" + (p.epochs || "?") + " · step " + (p.step || 0) +
    "/" + (p.total_steps || "?") + " · " + (p.percent || 0).toFixed(1) + "%" +
    (job.status === "running" && p.eta_s != null ? " · ETA " + fmtDuration(p.eta_s) : "") +
    " · loss " + fmtNum(latest.train_loss) + " · val acc " + fmtNum(latest.val_accuracy) +
    (best.val_accuracy != null ? " · best " + fmtNum(best.val_accuracy) + " (epoch " + best.epoch + ")" : "") +
    " · attempt " + (job.attempts || 0) + (job.worker ? " on " + job.worker : "") +
    (job.status === "queued" && queueText(job) ? " · " + queueText(job) : "") +
    (job.stopped ? " · stopped early" + (job.stopped.reason ? ": " + job.stopped.reason : "") : "");
  $("job-error").textContent = job.error ? String(job.error.message || job.error) : "";
  $("cancel").disabled = FINISHED.includes(job.status) || job.status === "cancelling";
  $("retry").hidden = !["failed", "cancelled"].includes(job.status);
  $("job-sweep").hidden = job.kind !== "sweep";
  const key = job.status + ":" + (p.epoch || 0);
  if (key !== state.metricsKey) {  // curves change only per epoch: refetch then
    state.metricsKey = key;
    await refreshMetrics(id);
    await refreshArtifacts(id);
  }
  await refreshLog(id);
}

async function refreshMetrics(id) {
  const data = await getJSON("/v1/jobs/" + id + "/metrics");
  const rows = data.epochs || [];
  const series = data.series || {};
  const pick = name => series[name] || rows.map(r => r[name] ?? null);
  drawLineChart($("loss-chart"), [
    {name: "train loss", color: "#d9480f", values: pick("train_loss")},
    {name: "val loss", color: "#1c7ed6", values: pick("val_loss")}],
    {markers: pick("grad_alerts")});  // epochs with gradient alerts (training.grad_alert) get a marker
  const acc = [{name: "val accuracy", color: "#2b8a3e", values: pick("val_accuracy")}];
  if (pick("train_accuracy").some(v => v != null)) acc.push({name: "train accuracy", color: "#ae3ec9", values: pick("train_accuracy")});
  drawLineChart($("acc-chart"), acc);
}

async function refreshLog(id) {
  const resp = await api("/v1/jobs/" + id + "/logs?offset=" + state.logOffset);
  const text = await resp.text();
  if (id !== state.jobId) return;
  state.logOffset = Number(resp.headers.get("X-Next-Offset") || state.logOffset + text.length);
  if (!text) return;
  const log = $("log"), atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = (log.textContent + text).slice(-200000);  // keep the tail only
  if (atBottom) log.scrollTop = log.scrollHeight;
}

async function refreshArtifacts(id) {
  const data = await getJSON("/v1/jobs/" + id + "/artifacts");
  $("artifacts").replaceChildren(...(data.artifacts || []).map(a => {
    const link = el("a", {href: "/v1/jobs/" + id + "/artifacts/" + a.name.split("/").map(encodeURIComponent).join("/")}, a.name);
    link.addEventListener("click", ev => { ev.preventDefault(); download(link.href, a.name); });
    return el("li", {}, link, el("span", {class: "muted"}, " " + fmtBytes(a.size)));
  }));
}

// Links cannot carry the Authorization header: fetch the file, then save the blob.
async function download(url, name) {
  const blob = await (await api(url)).blob();
  const a = el("a", {href: URL.createObjectURL(blob), download: name.split("/").pop()});
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("cancel").addEventListener("click", async () => {
  if (!state.jobId) return;
  $("cancel").disabled = true;
  try { await api("/v1/jobs/" + state.jobId + "/cancel", {method: "POST"}); await refreshJob(); await refreshJobs(); }
  catch (e) { showError($("job-action"), e); }
});
function queueText(job) {
  const q = job.queue || {};
  if (q.reason) return String(q.reason);
  return typeof q.position === "number" ? "position " + q.position + " in the queue" : "";
}

$("retry").addEventListener("click", async () => {
  if (!state.jobId) return;
  $("retry").disabled = true;
  try { await api("/v1/jobs/" + state.jobId + "/retry", {method: "POST"}); state.logOffset = 0; $("log").textContent = "";
        await refreshJob(); await refreshJobs(); }
  catch (e) { showError($("job-action"), e); }
  finally { $("retry").disabled = false; }
});
$("job-sweep").addEventListener("click", async () => {
  const id = state.jobId;
  if (!id) return;
  showView("compare");
  await refreshSweeps();
  setSelect($("compare-sweep"), id);
});

function closeJob() { state.jobId = null; $("job").hidden = true; }
$("close-job").addEventListener("click", closeJob);

// ---------------------------------------------------------------- models
async function refreshModels() {
  const data = await getJSON("/v1/models");
  state.models = data.models || [];
  const rows = [];
  for (const m of state.models) {
    for (const v of m.versions || []) {
      const metrics = Object.assign({}, v.metrics || {});
      const promote = el("button", {type: "button", "data-action": "promote"}, "Promote…");
      promote.setAttribute("aria-label", "Promote " + m.name + " version " + v.version);
      promote.addEventListener("click", () => choosePromote(m.name, v.version));
      const tryIt = el("button", {type: "button", "data-action": "try"}, "Try…");
      tryIt.setAttribute("aria-label", "Try " + m.name + " version " + v.version);
      tryIt.addEventListener("click", () => { setSelect($("try-model"), m.name + ":" + v.version); $("drop-zone").focus(); });
      const del = el("button", {type: "button", class: "danger", "data-action": "delete"}, "Delete");
      del.setAttribute("aria-label", "Delete " + m.name + " version " + v.version);
      del.addEventListener("click", () => confirmDelete("model version " + m.name + ":" + v.version,
        "/v1/models/" + encodeURIComponent(m.name) + "/versions/" + v.version, refreshModels));
      rows.push(el("tr", {"data-model": m.name, "data-version": String(v.version)},
        el("td", {}, m.name), el("td", {}, v.version), el("td", {class: "aliases"}, (v.aliases || []).join(", ")),
        el("td", {}, fmtNum((v.best || {}).val_accuracy ?? metrics.val_accuracy)), el("td", {}, fmtNum(metrics.val_loss)),
        el("td", {}, el("code", {}, (v.job_id || "").slice(0, 12))), el("td", {}, fmtTime(v.created_at)),
        el("td", {class: "actions"}, promote, " ", tryIt, " ", del)));
    }
  }
  $("models").querySelector("tbody").replaceChildren(...rows);
  renderModelPickers();
}

// ---------------------------------------------------------------- small helpers for the views
// An error shown where the user acted; a refused token goes back to the token panel.
function showError(target, e) {
  if (e instanceof AuthError) { report(e); return; }
  target.textContent = e instanceof ApiError && e.serverMessage ? e.serverMessage : String(e.message || e);
}

// Fill a <select> with [{value, label}], keeping the user's choice; untouched when nothing changed.
function setOptions(select, items, placeholder) {
  const key = JSON.stringify(items);
  if (select.dataset.key === key) return;
  const before = select.value;
  select.replaceChildren(...(items.length ? [] : [el("option", {value: ""}, placeholder || "(none)")]),
                         ...items.map(it => el("option", {value: it.value}, it.label)));
  select.dataset.key = key;
  if (items.some(it => it.value === before)) select.value = before;
}
function setSelect(select, value) {
  if ([...select.options].some(o => o.value === value)) { select.value = value; select.dispatchEvent(new Event("change")); }
}
const short = id => String(id || "").slice(0, 12);
const getPath = (obj, dotted) => String(dotted).split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);

// ---------------------------------------------------------------- views (tabs)
const VIEWS = ["jobs", "submit", "datasets", "compare", "models"];

function showView(name) {
  if (!VIEWS.includes(name)) name = "jobs";
  state.view = name;
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    const on = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $("view-" + tab.dataset.view).hidden = !on;
  }
  if (location.hash.slice(1) !== name) history.replaceState(null, "", "#" + name);
  if (name === "datasets") refreshDatasets().catch(report);
  if (name === "compare") { refreshSweeps().catch(report); drawCompare().catch(report); }
  if (name === "models") refreshModels().catch(report);
}

for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
  tab.addEventListener("keydown", ev => {  // arrow keys move between tabs (WAI-ARIA tabs pattern)
    const i = VIEWS.indexOf(tab.dataset.view);
    const next = ev.key === "ArrowRight" ? VIEWS[(i + 1) % VIEWS.length] : ev.key === "ArrowLeft" ?
      VIEWS[(i + VIEWS.length - 1) % VIEWS.length] : null;
    if (next) { ev.preventDefault(); showView(next); $("tab-" + next).focus(); }
  });
}

// ---------------------------------------------------------------- submit a job from YAML
// The line of a dotted field in the YAML text (block style), for the hint next to a field error.
function yamlLine(text, field) {
  const lines = text.split("\n");
  let at = -1, indent = -1;
  for (const key of String(field).split(".")) {
    const esc = key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const re = new RegExp("^(\\s*)(-\\s+)?[\"']?" + esc + "[\"']?\\s*:");
    let found = -1;
    for (let i = at + 1; i < lines.length; i++) {
      const m = re.exec(lines[i]);
      if (m && m[1].length > indent) { found = i; indent = m[1].length; break; }
    }
    if (found < 0) return at >= 0 ? at + 1 : null;
    at = found;
  }
  return at + 1;
}

function clearSubmitErrors() {
  $("submit-message").textContent = "";
  $("submit-errors").replaceChildren();
  $("yaml").removeAttribute("aria-invalid");
}

function showSubmitErrors(e) {
  if (e instanceof AuthError) { report(e); return; }
  $("yaml").setAttribute("aria-invalid", "true");
  const details = e instanceof ApiError ? e.details.filter(d => d && typeof d === "object") : [];
  if (!details.length) { showError($("submit-message"), e); return; }
  $("submit-message").textContent = "The config was refused: " + details.length + " field" +
    (details.length === 1 ? "" : "s") + " to fix.";
  const text = $("yaml").value;
  $("submit-errors").replaceChildren(...details.map(d => {
    const field = d.field == null ? "(document)" : String(d.field);
    const line = d.field == null ? null : yamlLine(text, field);
    return el("li", {"data-field": field}, el("code", {class: "field"}, field),
              line ? el("span", {class: "muted"}, " (line " + line + ")") : "", ": ", String(d.message ?? ""));
  }));
}

$("submit-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  clearSubmitErrors();
  $("submit-button").disabled = true;
  $("submit-status").textContent = "submitting…";
  try {
    const resp = await api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/yaml"}, body: $("yaml").value});
    const job = await resp.json();
    const link = el("a", {href: "#jobs", "data-job": job.id}, job.id);
    link.addEventListener("click", e2 => { e2.preventDefault(); showView("jobs"); openJob(job.id); });
    $("submit-status").replaceChildren("queued ", job.kind, " job ", link);
    refreshJobs().catch(report);
  } catch (e) {
    $("submit-status").textContent = "";
    showSubmitErrors(e);
  } finally {
    $("submit-button").disabled = false;
  }
});

// ---------------------------------------------------------------- datasets: list, upload with progress
async function refreshDatasets() {
  const data = await getJSON("/v1/datasets");
  const list = data.datasets || [];
  $("datasets").querySelector("tbody").replaceChildren(...list.map(d => {
    const del = el("button", {type: "button", class: "danger", "data-action": "delete"}, "Delete");
    del.setAttribute("aria-label", "Delete dataset " + (d.name || d.id));
    del.addEventListener("click", () => confirmDelete("dataset " + (d.name || "") + " (" + d.id + ")",
      "/v1/datasets/" + encodeURIComponent(d.id), refreshDatasets));
    const classes = d.classes || [];
    return el("tr", {"data-dataset": d.id},
      el("td", {}, el("code", {}, short(d.id))), el("td", {}, d.name || ""),
      el("td", {title: classes.join(", ")}, classes.length + ": " + classes.slice(0, 6).join(", ") + (classes.length > 6 ? ", …" : "")),
      el("td", {}, d.num_images ?? ""), el("td", {}, typeof d.size === "number" ? fmtBytes(d.size) : ""),
      el("td", {}, fmtTime(d.created_at)), el("td", {class: "actions"}, del));
  }));
  $("datasets-count").textContent = "(" + list.length + ")";
}

function setUpload(percent, text) {
  const p = Math.max(0, Math.min(100, percent));
  $("upload-progress").value = p;
  $("upload-progress").dataset.percent = String(Math.round(p));
  if (text !== undefined) $("upload-status").textContent = text;
}

// XMLHttpRequest, not fetch: only it reports upload progress.
function uploadDataset(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/datasets");
    if (token()) xhr.setRequestHeader("Authorization", "Bearer " + token());
    xhr.upload.addEventListener("progress", ev => { if (ev.lengthComputable) onProgress(ev.loaded, ev.total); });
    xhr.upload.addEventListener("load", () => onProgress(1, 1));
    xhr.addEventListener("load", () => {
      const body = parseBody(xhr.responseText);
      if (xhr.status === 401) reject(new AuthError("token missing, invalid or revoked"));
      else if (xhr.status >= 200 && xhr.status < 300 && body) resolve(body);
      else reject(new ApiError(xhr.status, xhr.statusText, body));
    });
    xhr.addEventListener("error", () => reject(new Error("the upload failed: network error")));
    xhr.addEventListener("abort", () => reject(new Error("the upload was aborted")));
    const form = new FormData();
    form.append("file", file, file.name);
    if (name) form.append("name", name);
    xhr.send(form);
  });
}

$("upload-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  $("upload-error").textContent = "";
  $("upload-button").disabled = true;
  setUpload(0, "uploading " + file.name + " (" + fmtBytes(file.size) + ")…");
  try {
    const d = await uploadDataset(file, $("upload-name").value.trim(), (loaded, total) => {
      const pct = total ? 100 * loaded / total : 100;
      setUpload(pct, pct >= 100 ? "uploaded; the server is checking every image…" : "uploading… " + pct.toFixed(0) + "%");
    });
    setUpload(100, "stored " + (d.name || "") + " (" + d.id + "): " + d.num_images + " images in " +
              (d.classes || []).length + " classes");
    $("upload-form").reset();
    $("upload-progress").value = 100;
    await refreshDatasets();
  } catch (e) {
    $("upload-status").textContent = "";
    showError($("upload-error"), e);
    if (e instanceof ApiError && e.details.length)
      $("upload-error").textContent += " — " + e.details.map(d => (d.field ? d.field + ": " : "") + (d.message ?? "")).join("; ");
  } finally {
    $("upload-button").disabled = false;
  }
});

// ---------------------------------------------------------------- compare runs
function compareCandidates() {
  const byId = new Map();
  for (const j of state.trials) byId.set(j.id, j);
  for (const j of state.jobs) if (j.kind !== "predict" && j.kind !== "sweep") byId.set(j.id, j);
  return [...byId.values()];
}

function renderCompareList() {
  const jobs = compareCandidates();
  const key = jobs.map(j => j.id + ":" + j.status + ":" + state.compare.has(j.id)).join(",");
  const list = $("compare-list");
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  if (!jobs.length) { list.replaceChildren(el("p", {class: "muted"}, "no training jobs yet")); return; }
  list.replaceChildren(...jobs.map(j => {
    const box = el("input", {type: "checkbox", id: "cmp-" + j.id, "data-compare": j.id});
    box.checked = state.compare.has(j.id);
    box.addEventListener("change", () => {
      if (box.checked) state.compare.add(j.id); else state.compare.delete(j.id);
      list.dataset.key = "";
      drawCompare().catch(report);
    });
    const best = ((j.metrics || {}).best || {}).val_accuracy;
    return el("div", {class: "check"}, box,
      el("label", {htmlFor: "cmp-" + j.id}, el("code", {}, short(j.id)), " ",
         el("span", {class: "state " + j.status}, j.status), typeof best === "number" ? " best " + fmtNum(best) : ""));
  }));
}

async function jobMetrics(id) {
  const cached = state.metricsCache.get(id);
  if (cached && cached.final) return cached.data;
  const job = state.jobs.find(j => j.id === id) || state.trials.find(j => j.id === id);
  const data = await getJSON("/v1/jobs/" + encodeURIComponent(id) + "/metrics");
  state.metricsCache.set(id, {data, final: !!job && FINISHED.includes(job.status)});
  return data;
}

async function drawCompare() {
  if (state.view !== "compare") return;
  const metric = $("compare-metric").value;
  const ids = [...state.compare];
  const series = [], legend = [];
  for (const [i, id] of ids.entries()) {
    let data;
    try { data = await jobMetrics(id); }
    catch (e) {
      if (e instanceof ApiError && e.status === 404) { state.compare.delete(id); continue; }  // deleted meanwhile
      throw e;
    }
    const s = data.series || {};
    const values = s[metric] || (data.epochs || []).map(r => r[metric] ?? null);
    const color = PALETTE[i % PALETTE.length];
    series.push({name: short(id), color, values, job: id});
    const finite = values.filter(v => typeof v === "number" && isFinite(v));
    const best = finite.length ? (metric.includes("loss") ? Math.min(...finite) : Math.max(...finite)) : null;
    const swatch = el("span", {class: "swatch"});
    swatch.style.background = color;
    legend.push(el("li", {"data-job": id}, swatch, el("code", {}, short(id)),
      " " + finite.length + " epochs" + (best == null ? "" : " · best " + fmtNum(best))));
  }
  drawOverlay($("compare-chart"), series, {label: metric});
  $("compare-legend").replaceChildren(...legend);
  $("compare-status").textContent = series.length + " run" + (series.length === 1 ? "" : "s") + " shown";
}

$("compare-metric").addEventListener("change", () => { drawCompare().catch(report); if (state.sweep) drawSweep(); });
$("compare-clear").addEventListener("click", () => {
  state.compare.clear(); state.sweep = null; state.trials = [];
  $("compare-sweep").value = ""; $("sweep-card").hidden = true;
  renderCompareList(); drawCompare().catch(report);
});

// Sweeps (kind "sweep", DESIGN.md): trials are child jobs (parent = the sweep's id). A server that
// does not run sweeps yet answers 400 to kind=sweep: the picker says so and the rest works.
async function refreshSweeps() {
  let sweeps;
  try { sweeps = (await getJSON("/v1/jobs?kind=sweep&limit=50")).jobs || []; }
  catch (e) {
    if (!(e instanceof ApiError) || e.status !== 400) throw e;
    setOptions($("compare-sweep"), [], "(this server runs no sweeps)");
    $("compare-sweep").disabled = true;
    return;
  }
  $("compare-sweep").disabled = false;
  setOptions($("compare-sweep"), [{value: "", label: sweeps.length ? "(pick jobs below, or a sweep)" : "(no sweeps yet)"},
    ...sweeps.map(s => ({value: s.id, label: short(s.id) + " · " + s.status}))]);
  if (state.sweep && !sweeps.some(s => s.id === state.sweep)) $("compare-sweep").value = "";
}

async function loadSweep(id) {
  const sweep = await getJSON("/v1/jobs/" + encodeURIComponent(id));
  const page = await getJSON("/v1/jobs?parent=" + encodeURIComponent(id) + "&limit=200");
  if (state.sweep !== id) return;
  const first = !state.sweepJob || state.sweepJob.id !== id;
  state.sweepJob = sweep;
  let trials = (page.jobs || []).filter(j => j.parent === id);  // a server without ?parent= lists every job
  const summary = sweep.sweep;  // the server's view of its trials: values drawn, metric, stopped, best
  if (summary && Array.isArray(summary.trials)) {
    const byId = new Map(trials.map(t => [t.id, t]));
    trials = summary.trials.map(s => Object.assign({id: s.id, status: s.status, parent: id, config: null, metrics: {}},
      byId.get(s.id) || {}, {stopped: !!s.stopped, drawn: s.values || {}, sweepMetric: s.metric}));
  }
  state.trials = trials;
  const cfg = sweep.config || {};
  const params = Object.keys(cfg.space || {});
  setOptions($("sweep-param"), params.map(p => ({value: p, label: p})), "(no search space)");
  if (first && cfg.metric) setSelect($("compare-metric"), cfg.metric);  // the sweep's metric, until the user picks
  $("sweep-card").hidden = false;
  $("sweep-id").textContent = id;
  $("sweep-state").textContent = sweep.status;
  $("sweep-state").className = "state " + sweep.status;
  drawSweep();
}

function trialMetric(trial, metric) {
  const cfg = (state.sweepJob || {}).config || {};
  if (metric === (cfg.metric || "val_accuracy") && typeof trial.sweepMetric === "number") return trial.sweepMetric;
  const m = trial.metrics || {};
  const best = (m.best || {})[metric];
  return typeof best === "number" ? best : (m.latest || {})[metric];
}

function drawSweep() {
  const sweep = state.sweepJob;
  if (!sweep) return;
  const cfg = sweep.config || {};
  const metric = $("compare-metric").value, param = $("sweep-param").value;
  const lower = cfg.mode === "min" || (!cfg.mode && metric.includes("loss"));
  const scored = state.trials.filter(t => typeof trialMetric(t, metric) === "number");
  const summary = sweep.sweep || {};
  const serverBest = summary.best && summary.metric === metric ? state.trials.find(t => t.id === summary.best.id) : null;
  const best = serverBest || scored.reduce((b, t) => !b || (lower ? trialMetric(t, metric) < trialMetric(b, metric)
                                                    : trialMetric(t, metric) > trialMetric(b, metric)) ? t : b, null);
  const stopped = t => t.stopped === undefined ? t.status === "cancelled" : !!t.stopped;
  const drawn = (t, key) => t.drawn && key in t.drawn ? t.drawn[key] : getPath(t.config, key);
  const points = state.trials.map((t, i) => ({
    x: Number(drawn(t, param)), y: trialMetric(t, metric), job: t.id, best: t === best, stopped: stopped(t),
    color: PALETTE[i % PALETTE.length],
    title: short(t.id) + " · " + param + " = " + drawn(t, param) + " · " + metric + " " + fmtNum(trialMetric(t, metric)) +
           " · " + t.status}));
  const space = (cfg.space || {})[param] || {};
  drawScatter($("sweep-scatter"), points, {xLabel: param, yLabel: metric, logX: "log_uniform" in space});
  $("sweep-summary").textContent = (cfg.method || "?") + " search · " + state.trials.length + " of " + (cfg.trials ?? "?") +
    " trials · " + state.trials.filter(stopped).length + " stopped · " + metric + " (" + (lower ? "lower" : "higher") +
    " is better)" + (best ? " · best " + short(best.id) + " at " + fmtNum(trialMetric(best, metric)) + " with " +
    Object.keys(cfg.space || {}).map(k => k + " = " + drawn(best, k)).join(", ") : "");
  $("sweep-caption").textContent = "one point per trial: filled = ran to the end, hollow = stopped early, large = best";
}

$("compare-sweep").addEventListener("change", () => {
  const id = $("compare-sweep").value;
  state.sweep = id || null;
  if (!id) { state.trials = []; state.sweepJob = null; $("sweep-card").hidden = true; renderCompareList(); return; }
  state.compare.clear();
  loadSweep(id).then(() => {
    for (const t of state.trials) state.compare.add(t.id);
    renderCompareList();
    return drawCompare();
  }).catch(e => showError($("compare-status"), e));
});
$("sweep-param").addEventListener("change", drawSweep);

async function pollCompare() {
  if (state.view !== "compare") return;
  if (state.sweep) {
    try { await loadSweep(state.sweep); }
    catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) throw e;
      $("compare-clear").click();  // the sweep was deleted meanwhile
    }
  }
  renderCompareList();
  if ([...state.compare].some(id => !(state.metricsCache.get(id) || {}).final)) await drawCompare();
}

// ---------------------------------------------------------------- models: promote, try
function renderModelPickers() {
  const models = state.models;
  setOptions($("promote-model"), models.map(m => ({value: m.name, label: m.name})), "(no models)");
  renderPromoteVersions();
  setOptions($("try-model"), models.flatMap(m => (m.versions || []).map(v => ({
    value: m.name + ":" + v.version,
    label: m.name + ":" + v.version + ((v.aliases || []).length ? " (" + v.aliases.join(", ") + ")" : "")}))), "(no models)");
}

function renderPromoteVersions() {
  const m = state.models.find(x => x.name === $("promote-model").value);
  setOptions($("promote-version"), ((m && m.versions) || []).map(v => ({
    value: String(v.version),
    label: "v" + v.version + ((v.aliases || []).length ? " (" + v.aliases.join(", ") + ")" : "") +
           (typeof (v.best || {}).val_accuracy === "number" ? " · acc " + fmtNum(v.best.val_accuracy) : "")})));
}
$("promote-model").addEventListener("change", renderPromoteVersions);

function choosePromote(name, version) {
  setSelect($("promote-model"), name);
  setSelect($("promote-version"), String(version));
  $("promote-alias").focus();
}

$("promote-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const name = $("promote-model").value, version = Number($("promote-version").value);
  const alias = $("promote-alias").value.trim();
  if (!name || !version || !alias) return;
  $("promote-button").disabled = true;
  $("promote-result").className = "muted";
  try {
    const model = await sendJSON("PUT", "/v1/models/" + encodeURIComponent(name) + "/aliases/" + encodeURIComponent(alias),
                                 {version});
    $("promote-result").textContent = alias + " → " + name + " v" + ((model.aliases || {})[alias] ?? version);
    await refreshModels();
  } catch (e) {
    $("promote-result").className = "error";
    showError($("promote-result"), e);
  } finally {
    $("promote-button").disabled = false;
  }
});

async function predictFile(file) {
  const ref = $("try-model").value;
  $("try-error").textContent = "";
  $("try-topk").replaceChildren();
  $("try-model-used").textContent = "";
  if (!file) return;
  if (!ref) { $("try-error").textContent = "register a model first"; return; }
  if (file.type && !file.type.startsWith("image/")) { $("try-error").textContent = file.name + " is not an image"; return; }
  const preview = $("try-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("try-model-used").textContent = "asking " + ref + "…";
  try {
    const resp = await api("/predict?model=" + encodeURIComponent(ref),
                           {method: "POST", headers: {"Content-Type": file.type || "application/octet-stream"}, body: file});
    const data = await resp.json();
    const pred = (data.predictions || [])[0] || {};
    const model = data.model || {};
    $("try-model-used").textContent = "answered by " + (model.name ?? "?") + " v" + (model.version ?? "?") + ": " +
      (pred.label ?? "?");
    $("try-topk").replaceChildren(...(pred.top_k || []).map(t => {
      const p = typeof t.probability === "number" ? t.probability : 0;
      const fill = el("div", {"data-percent": (100 * p).toFixed(1)});
      fill.style.width = Math.max(0, Math.min(100, 100 * p)) + "%";
      return el("li", {"data-label": String(t.label)}, el("span", {class: "label"}, String(t.label)),
                el("div", {class: "bar"}, fill), el("span", {class: "pct"}, (100 * p).toFixed(1) + "%"));
    }));
  } catch (e) {
    $("try-model-used").textContent = "";
    showError($("try-error"), e);
  }
}

const drop = $("drop-zone");
for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, ev => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", ev => {
  ev.preventDefault();
  drop.classList.remove("over");
  const file = ev.dataTransfer && ev.dataTransfer.files[0];
  predictFile(file);
});
drop.addEventListener("keydown", ev => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("try-file").click(); } });
$("try-file").addEventListener("change", () => { predictFile($("try-file").files[0]); $("try-file").value = ""; });
$("try-form").addEventListener("submit", ev => ev.preventDefault());

// ---------------------------------------------------------------- delete, with a confirm step
function confirmDelete(what, path, after) {
  state.pendingDelete = {path, after};
  $("confirm-title").textContent = "Delete " + what.split(" ")[0].replace("model", "model version") + "?";
  $("confirm-text").textContent = "Delete " + what + "? Its stored files go too; this cannot be undone.";
  $("confirm-error").textContent = "";
  $("confirm-yes").disabled = false;
  $("confirm").showModal();
  $("confirm-no").focus();
}

$("confirm-yes").addEventListener("click", async () => {
  const pending = state.pendingDelete;
  if (!pending) return;
  $("confirm-yes").disabled = true;
  try {
    await api(pending.path, {method: "DELETE"});
    state.pendingDelete = null;
    $("confirm").close();
    await pending.after();
  } catch (e) {
    if (e instanceof AuthError) { $("confirm").close(); report(e); return; }
    // 409: in use (a running job, a dataset a job reads, an aliased version): the server says why
    showError($("confirm-error"), e);
    $("confirm-yes").disabled = false;
  }
});
$("confirm-no").addEventListener("click", () => { state.pendingDelete = null; $("confirm").close(); });
$("confirm").addEventListener("close", () => { state.pendingDelete = null; });

$("delete-job").addEventListener("click", () => {
  const id = state.jobId;
  if (!id) return;
  confirmDelete("job " + id + " (with its logs, metrics and checkpoints)", "/v1/jobs/" + encodeURIComponent(id), async () => {
    if (state.jobId === id) closeJob();
    state.compare.delete(id);
    state.metricsCache.delete(id);
    await refreshJobs();
  });
});

// ---------------------------------------------------------------- polling
function report(e) {
  if (e instanceof AuthError) { stop(); askToken(e.message + ": paste a valid token"); return; }
  setConn(e.message, true);
}

function every(ms, fn) {
  let busy = false;  // a slow server must not pile up overlapping polls
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await fn(); } catch (e) { report(e); } finally { busy = false; }
  };
  tick();
  state.timers.push(setInterval(tick, ms));
}

function stop() { state.timers.forEach(clearInterval); state.timers = []; }

async function start() {
  stop();
  try { await refreshJobs(); }
  catch (e) {
    if (e instanceof AuthError) { askToken(token() ? "that token was refused (401)" : ""); return; }
    setConn(e.message, true);
  }
  $("token-panel").hidden = true;
  $("app").hidden = false;
  $("token-button").hidden = document.body.dataset.auth !== "on";
  $("tabs").hidden = false;
  showView(location.hash.slice(1) || state.view);
  setConn("connected", false);
  every(2000, refreshJobs);
  every(1000, refreshJob);
  every(5000, refreshModels);
  every(5000, () => state.view === "datasets" ? refreshDatasets() : null);
  every(3000, pollCompare);
}

start();
