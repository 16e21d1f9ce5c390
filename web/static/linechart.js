// A small line chart drawn on a <canvas>: no library, no build step.
// drawLineChart(canvas, [{name, color, values: [number|null, ...]}], {yMin, yMax, markers})
// x is the epoch (1-based index into values). Sets canvas.dataset.points to the points drawn.
// markers: a count per epoch (e.g. the metrics series grad_alerts); each epoch with a count > 0 gets
// a red triangle above the plot, and canvas.dataset.markers says how many epochs got one.
"use strict";

function drawLineChart(canvas, series, opts) {
  opts = opts || {};
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = {l: 46, r: 12, t: 22, b: 26};
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  const all = [];
  let n = 0;
  for (const s of series) {
    n = Math.max(n, s.values.length);
    for (const v of s.values) if (typeof v === "number" && isFinite(v)) all.push(v);
  }
  canvas.dataset.points = String(all.length);
  if (!all.length) {
    ctx.fillStyle = "#6b7385";
    ctx.fillText("waiting for the first epoch…", pad.l, H / 2);
    return;
  }
  let lo = opts.yMin !== undefined ? opts.yMin : Math.min(...all);
  let hi = opts.yMax !== undefined ? opts.yMax : Math.max(...all);
  if (hi - lo < 1e-9) { hi += 0.5; lo -= 0.5; }
  const xs = i => pad.l + (n <= 1 ? (W - pad.l - pad.r) / 2 : i * (W - pad.l - pad.r) / (n - 1));
  const ys = v => H - pad.b - (v - lo) * (H - pad.t - pad.b) / (hi - lo);

  // grid and y labels
  ctx.strokeStyle = "#eceef2"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const v = lo + (hi - lo) * k / 4, y = ys(v);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(W - pad.r, y); ctx.stroke();
    ctx.fillText(v.toPrecision(3), 4, y + 4);
  }
  // x labels: epochs
  const step = Math.max(1, Math.ceil(n / 10));
  for (let i = 0; i < n; i += step) ctx.fillText(String(i + 1), xs(i) - 3, H - 8);

  // lines, points and legend
  let legendX = pad.l;
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (typeof v !== "number" || !isFinite(v)) { started = false; return; }
      if (started) ctx.lineTo(xs(i), ys(v)); else { ctx.moveTo(xs(i), ys(v)); started = true; }
    });
    ctx.stroke();
    s.values.forEach((v, i) => {
      if (typeof v === "number" && isFinite(v)) { ctx.beginPath(); ctx.arc(xs(i), ys(v), 2.5, 0, 7); ctx.fill(); }
    });
    ctx.fillRect(legendX, 7, 10, 3);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(s.name, legendX + 14, 12);
    legendX += 24 + ctx.measureText(s.name).width;
  }
  drawMarkers(ctx, opts.markers, xs, pad.t, legendX);
  canvas.dataset.markers = String((opts.markers || []).filter(c => typeof c === "number" && c > 0).length);
}

function drawMarkers(ctx, counts, xs, top, legendX) {
  if (!counts || !counts.some(c => typeof c === "number" && c > 0)) return;
  ctx.fillStyle = "#e03131";
  const tri = (x, y) => { ctx.beginPath(); ctx.moveTo(x - 4, y - 4); ctx.lineTo(x + 4, y - 4); ctx.lineTo(x, y + 2); ctx.fill(); };
  counts.forEach((c, i) => { if (typeof c === "number" && c > 0) tri(xs(i), top - 2); });
  tri(legendX + 5, 10);
  ctx.fillStyle = "#1d2330";
  ctx.fillText("gradient alerts", legendX + 14, 12);
}
