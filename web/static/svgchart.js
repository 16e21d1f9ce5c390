// SVG charts for the compare view: no library, no build step. Text goes in with textContent only.
// drawOverlay(svg, [{name, color, values: [number|null, ...], job}], {label}): one <path class="series"> per series
// drawScatter(svg, [{x, y, color, title, best, stopped}], {xLabel, yLabel, logX}): one <circle class="trial"> per point
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#d9480f", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f08c00", "#0c8599", "#e64980", "#5c940d",
                 "#3b5bdb", "#862e9c", "#c92a2a", "#495057"];

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function niceTicks(lo, hi, count) {
  const out = [];
  for (let k = 0; k <= count; k++) out.push(lo + (hi - lo) * k / count);
  return out;
}

function chartFrame(svg, lo, hi, pad) {
  const W = Number(svg.getAttribute("width")), H = Number(svg.getAttribute("height"));
  if (hi - lo < 1e-12) { hi += 0.5; lo -= 0.5; }
  const ys = v => H - pad.b - (v - lo) * (H - pad.t - pad.b) / (hi - lo);
  const grid = svgEl("g", {class: "grid"});
  for (const v of niceTicks(lo, hi, 4)) {
    grid.append(svgEl("line", {x1: pad.l, x2: W - pad.r, y1: ys(v), y2: ys(v)}));
    grid.append(svgEl("text", {x: pad.l - 6, y: ys(v) + 4, "text-anchor": "end"}, v.toPrecision(3)));
  }
  svg.append(grid);
  return {W, H, ys};
}

function emptyChart(svg, message) {
  svg.replaceChildren(svgEl("text", {x: 20, y: 40, class: "empty"}, message));
  svg.dataset.series = "0";
  svg.dataset.points = "0";
}

function drawOverlay(svg, series, opts) {
  opts = opts || {};
  const pad = {l: 52, r: 16, t: 24, b: 34};
  const all = [];
  let n = 0;
  for (const s of series) {
    n = Math.max(n, s.values.length);
    for (const v of s.values) if (typeof v === "number" && isFinite(v)) all.push(v);
  }
  if (!all.length) { emptyChart(svg, series.length ? "no epochs recorded yet" : "pick two or more jobs"); return; }
  svg.replaceChildren();
  const {W, H, ys} = chartFrame(svg, Math.min(...all), Math.max(...all), pad);
  const xs = i => pad.l + (n <= 1 ? (W - pad.l - pad.r) / 2 : i * (W - pad.l - pad.r) / (n - 1));
  const axis = svgEl("g", {class: "axis"});
  const step = Math.max(1, Math.ceil(n / 12));
  for (let i = 0; i < n; i += step) axis.append(svgEl("text", {x: xs(i), y: H - pad.b + 16, "text-anchor": "middle"}, i + 1));
  axis.append(svgEl("text", {x: (W + pad.l) / 2, y: H - 4, "text-anchor": "middle"}, "epoch"));
  if (opts.label) axis.append(svgEl("text", {x: pad.l + 4, y: 12}, opts.label));
  svg.append(axis);
  let points = 0;
  for (const s of series) {
    let d = "", pen = "M";
    const dots = svgEl("g", {fill: s.color});
    s.values.forEach((v, i) => {
      if (typeof v !== "number" || !isFinite(v)) { pen = "M"; return; }
      d += pen + xs(i).toFixed(1) + " " + ys(v).toFixed(1) + " ";
      pen = "L";
      points++;
      const dot = svgEl("circle", {cx: xs(i), cy: ys(v), r: 2.5});
      dot.append(svgEl("title", {}, s.name + " · epoch " + (i + 1) + ": " + v.toPrecision(4)));
      dots.append(dot);
    });
    const path = svgEl("path", {class: "series", d: d.trim() || "M0 0", stroke: s.color, fill: "none",
                                "stroke-width": 2, "data-job": s.job || ""});
    path.append(svgEl("title", {}, s.name));
    svg.append(path, dots);
  }
  svg.dataset.series = String(series.length);
  svg.dataset.points = String(points);
}

function drawScatter(svg, points, opts) {
  opts = opts || {};
  const pad = {l: 52, r: 16, t: 24, b: 34};
  const ok = points.filter(p => typeof p.x === "number" && isFinite(p.x) && typeof p.y === "number" && isFinite(p.y) &&
                                (!opts.logX || p.x > 0));
  if (!ok.length) { emptyChart(svg, "no finished trial with this hyper-parameter and metric yet"); return; }
  svg.replaceChildren();
  const yLo = Math.min(...ok.map(p => p.y)), yHi = Math.max(...ok.map(p => p.y)), ySpan = (yHi - yLo) || 1;
  const {W, H, ys} = chartFrame(svg, yLo - ySpan * 0.08, yHi + ySpan * 0.08, pad);  // no point on the frame
  const tx = opts.logX ? Math.log10 : (v => v);
  let lo = Math.min(...ok.map(p => tx(p.x))), hi = Math.max(...ok.map(p => tx(p.x)));
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const span = hi - lo;
  lo -= span * 0.05; hi += span * 0.05;
  const xs = v => pad.l + (tx(v) - lo) * (W - pad.l - pad.r) / (hi - lo);
  const axis = svgEl("g", {class: "axis"});
  niceTicks(lo, hi, 4).forEach((t, k) => {
    const v = opts.logX ? Math.pow(10, t) : t;
    axis.append(svgEl("text", {x: xs(v), y: H - pad.b + 16, "text-anchor": k === 4 ? "end" : "middle"}, v.toPrecision(3)));
  });
  axis.append(svgEl("text", {x: (W + pad.l) / 2, y: H - 4, "text-anchor": "middle"},
                    (opts.xLabel || "") + (opts.logX ? " (log scale)" : "")));
  if (opts.yLabel) axis.append(svgEl("text", {x: pad.l + 4, y: 12}, opts.yLabel));
  svg.append(axis);
  for (const p of ok) {
    const dot = svgEl("circle", {class: "trial" + (p.best ? " best" : "") + (p.stopped ? " stopped" : ""),
                                 cx: xs(p.x).toFixed(1), cy: ys(p.y).toFixed(1), r: p.best ? 7 : 5,
                                 fill: p.stopped ? "none" : p.color, stroke: p.color, "stroke-width": 2,
                                 "data-job": p.job || ""});
    dot.append(svgEl("title", {}, p.title));
    svg.append(dot);
  }
  svg.dataset.series = "1";
  svg.dataset.points = String(ok.length);
}
