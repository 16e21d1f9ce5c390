// Kiln dashboard: polls the JSON API with the token kept in sessionStorage.
"use strict";

const TOKEN_KEY = "kiln.token";
const FINISHED = ["succeeded", "failed", "cancelled"];
const $ = id => document.getElementById(id);
const state = {jobId: null, logOffset: 0, metricsKey: "", timers: []};

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

class AuthError extends Error {}

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, Object.assign({}, options, {headers}));
  if (resp.status === 401) throw new AuthError("token missing, invalid or revoked");
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText;
    try { const body = await resp.json(); msg = body.error.code + ": " + body.error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return resp;
}
const getJSON = async path => (await api(path)).json();

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
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren(...data.jobs.map(job => {
    const p = job.progress || {};
    const row = el("tr", {class: "job-row" + (job.id === state.jobId ? " selected" : ""), "data-job": job.id},
      el("td", {}, el("code", {}, job.id.slice(0, 12))), el("td", {}, job.kind),
      el("td", {}, el("span", {class: "state " + job.status}, job.status)),
      el("td", {}, progressBar(p.percent), " ", (p.percent || 0).toFixed(0) + "%"),
      el("td", {}, job.status === "running" ? fmtDuration(p.eta_s) : ""), el("td", {}, fmtTime(job.created_at)));
    row.addEventListener("click", () => openJob(job.id));
    return row;
  }));
  $("jobs-count").textContent = "(" + data.jobs.length + " of " + data.total + ")";
}

// ---------------------------------------------------------------- one job
function openJob(id) {
  state.jobId = id; state.logOffset = 0; state.metricsKey = "";
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
  const job = await getJSON("/v1/jobs/" + id);
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
    " · attempt " + (job.attempts || 0) + (job.worker ? " on " + job.worker : "");
  $("job-error").textContent = job.error ? String(job.error.message || job.error) : "";
  $("cancel").disabled = FINISHED.includes(job.status) || job.status === "cancelling";
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
    {name: "val loss", color: "#1c7ed6", values: pick("val_loss")}]);
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
  catch (e) { report(e); }
});
$("close-job").addEventListener("click", () => { state.jobId = null; $("job").hidden = true; });

// ---------------------------------------------------------------- models
async function refreshModels() {
  const data = await getJSON("/v1/models");
  const rows = [];
  for (const m of data.models || []) {
    for (const v of m.versions || []) {
      const metrics = Object.assign({}, v.metrics || {});
      rows.push(el("tr", {"data-model": m.name},
        el("td", {}, m.name), el("td", {}, v.version), el("td", {}, (v.aliases || []).join(", ")),
        el("td", {}, fmtNum((v.best || {}).val_accuracy ?? metrics.val_accuracy)), el("td", {}, fmtNum(metrics.val_loss)),
        el("td", {}, el("code", {}, (v.job_id || "").slice(0, 12))), el("td", {}, fmtTime(v.created_at))));
    }
  }
  $("models").querySelector("tbody").replaceChildren(...rows);
}

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
  setConn("connected", false);
  every(2000, refreshJobs);
  every(1000, refreshJob);
  every(5000, refreshModels);
}

start();
