// Small SVG charts: line charts over steps (training curves) and bar histograms.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) n.setAttribute(k, String(v));
  for (const c of children) if (c) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return n;
}

function ticks(lo, hi, n = 4) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((s) => s * mag).find((s) => s >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(6));
  return out;
}

function short(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-2) return v.toExponential(0);
  return String(+v.toPrecision(3));
}

const PALETTE = ["var(--series-1)", "var(--series-2)", "var(--series-3)", "var(--series-4)"];

/** series: [{name, points: [[x, y]...], dashed}], options: {title, xLabel, log, width, height} */
export function lineChart(series, { title = "", xLabel = "step", log = false, width = 420, height = 200 } = {}) {
  const pad = { l: 52, r: 10, t: 36, b: 30 };
  const tf = (y) => (log ? Math.log10(Math.max(y, 1e-12)) : y);
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("text", { x: pad.l, y: 15, class: "chart-title" }, title));
  if (!pts.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "chart-empty" }, "no data"));
    return root;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => tf(p[1]))), Math.max(...pts.map((p) => tf(p[1])))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((tf(y) - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  const axis = svg("g", { class: "axis" });
  for (const t of ticks(y0, y1)) {
    const y = height - pad.b - ((t - y0) / (y1 - y0)) * (height - pad.t - pad.b);
    axis.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y, y2: y, class: "gridline" }));
    axis.append(svg("text", { x: pad.l - 4, y: y + 4, "text-anchor": "end" }, short(log ? 10 ** t : t)));
  }
  for (const t of ticks(x0, x1, 5)) {
    axis.append(svg("text", { x: X(t), y: height - pad.b + 14, "text-anchor": "middle" }, short(t)));
  }
  axis.append(svg("text", { x: width - pad.r, y: height - 4, "text-anchor": "end" }, xLabel));
  root.append(axis);
  const legend = svg("g", { class: "legend" });
  let lx = width - pad.r;
  series.forEach((s, k) => {
    const color = s.color || PALETTE[k % PALETTE.length];
    const d = s.points
      .filter((p) => Number.isFinite(p[1]))
      .map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`)
      .join("");
    root.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": 1.6, "stroke-dasharray": s.dashed ? "5 3" : null }));
    const label = svg("text", { x: lx, y: 29, "text-anchor": "end", fill: color }, `${s.dashed ? "- - " : "— "}${s.name}`);
    legend.append(label);
    lx -= 24 + 6 * s.name.length;
  });
  root.append(legend);
  return root;
}

/** Bars over bin edges (histogram {edges, counts}). */
export function histogram({ edges, counts }, { title = "", width = 320, height = 120, log = true } = {}) {
  const pad = { l: 8, r: 8, t: 20, b: 22 };
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("text", { x: pad.l, y: 13, class: "chart-title" }, title));
  if (!counts || !counts.length) return root;
  const tf = (c) => (log ? Math.log1p(c) : c);
  const max = Math.max(...counts.map(tf)) || 1;
  const w = (width - pad.l - pad.r) / counts.length;
  counts.forEach((c, i) => {
    const h = (tf(c) / max) * (height - pad.t - pad.b);
    const bar = svg("rect", { x: pad.l + i * w, y: height - pad.b - h, width: Math.max(1, w - 1), height: h, class: "bar" });
    bar.append(svg("title", {}, `${short(edges[i])} – ${short(edges[i + 1])}: ${c}`));
    root.append(bar);
  });
  root.append(svg("text", { x: pad.l, y: height - 6, class: "axis-label" }, short(edges[0])));
  root.append(svg("text", { x: width - pad.r, y: height - 6, "text-anchor": "end", class: "axis-label" }, short(edges[edges.length - 1])));
  return root;
}
