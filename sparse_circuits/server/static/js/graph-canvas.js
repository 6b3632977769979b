// The graph on a <canvas>: nodes by layer (rows, embeddings at the bottom, logits on top) and
// token position (columns), signed weighted links, pan and zoom, hover, click, and keyboard
// navigation between nodes. Links are drawn in a few batched paths (by sign and magnitude), so
// 20,000 of them cost a handful of stroke() calls per frame.

import { el, themeColors, onThemeChange } from "./shell.js";

const MARGIN = { left: 70, right: 14, top: 14, bottom: 58 };
const BUCKETS = 6; // link magnitude classes per sign
const KIND_ORDER = { embedding: 0, error: 1, feature: 2, logit: 3 };
const FAST_LINKS = 4000; // from this many links the weak ones are rasterised in JS
const STRONG = 4; // buckets from this one up are always stroked (wide, anti-aliased)

function rgb(color) {
  const m = /^#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})/i.exec(color || "");
  if (m) return [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)];
  const n = /(\d+)[ ,]+(\d+)[ ,]+(\d+)/.exec(color || "");
  return n ? [Number(n[1]), Number(n[2]), Number(n[3])] : [128, 128, 128];
}

export class GraphCanvas {
  constructor(container, { onSelect, onLinkSelect, onHover, label = "Attribution graph" } = {}) {
    this.onSelect = onSelect || (() => {});
    this.onLinkSelect = onLinkSelect || (() => {});
    this.onHover = onHover || (() => {});
    this.wrap = el("div", { class: "graph-canvas" });
    this.canvas = el("canvas", {
      tabindex: 0,
      role: "application",
      "aria-roledescription": "graph",
      "aria-label": `${label}. Arrow keys move between nodes, Enter opens, P pins, Escape clears, + and - zoom, 0 resets.`,
    });
    this.tip = el("div", { class: "tip", hidden: true });
    this.wrap.append(this.canvas, this.tip);
    container.append(this.wrap);
    this.ctx = this.canvas.getContext("2d");
    this.model = null;
    this.view = { k: 1, x: 0, y: 0 };
    this.hover = null; // node index
    this.hoverLink = null;
    this.selected = null; // node index
    this.selectedLink = null; // link index
    this.pinned = new Set(); // node ids
    this.groups = new Map(); // node id -> supernode colour index
    this.only = null; // Set of node ids to show (subgraph view), or null
    this.fastLinks = FAST_LINKS;
    this.stats = { drawnNodes: 0, drawnLinks: 0, frames: 0, lastDrawMs: 0, drawMs: [] };
    this.colors = themeColors();
    this._dirty = false;
    onThemeChange(() => {
      this.colors = themeColors();
      this.invalidate();
    });
    this._wireEvents();
    this._resize = new ResizeObserver(() => this.resize());
    this._resize.observe(this.wrap);
  }

  setModel(model, { keepView = false } = {}) {
    const prevSel = this.selected !== null && this.model ? this.model.nodes[this.selected].node_id : null;
    this.model = model;
    this.hover = this.hoverLink = null;
    this.selected = prevSel && model.byId.has(prevSel) ? model.byId.get(prevSel).i : null;
    this.selectedLink = null;
    if (!keepView) this.view = { k: 1, x: 0, y: 0 };
    this._bucketLinks();
    this.layout();
    this.invalidate();
  }

  resize() {
    const r = this.wrap.getBoundingClientRect();
    const w = Math.max(200, Math.floor(r.width));
    const h = Math.max(160, Math.floor(r.height));
    if (w === this.w && h === this.h) return;
    this.w = w;
    this.h = h;
    this.dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(w * this.dpr);
    this.canvas.height = Math.round(h * this.dpr);
    this.canvas.style.width = `${w}px`;
    this.canvas.style.height = `${h}px`;
    this.layout();
    this.invalidate();
  }

  // ------------------------------------------------------------------ layout

  layout() {
    const m = this.model;
    if (!m || !this.w) return;
    const W = this.w - MARGIN.left - MARGIN.right;
    const H = this.h - MARGIN.top - MARGIN.bottom;
    this.rowH = H / m.nRows;
    const cells = new Map();
    const maxPerPos = new Array(m.nPos).fill(0);
    for (const n of m.nodes) {
      const key = n.row * m.nPos + n.ctx_idx;
      if (!cells.has(key)) cells.set(key, []);
      const cell = cells.get(key);
      cell.push(n);
      maxPerPos[n.ctx_idx] = Math.max(maxPerPos[n.ctx_idx], cell.length);
    }
    const weights = maxPerPos.map((c) => 1 + Math.sqrt(c));
    const total = weights.reduce((a, b) => a + b, 0) || 1;
    this.cols = [];
    let x = MARGIN.left;
    for (let p = 0; p < m.nPos; p++) {
      const w = (W * weights[p]) / total;
      this.cols.push({ x0: x, w, cx: x + w / 2 });
      x += w;
    }
    this.rowY = (row) => MARGIN.top + (m.nRows - 1 - row + 0.5) * this.rowH;
    for (const [key, cell] of cells) {
      const row = Math.floor(key / m.nPos);
      const col = this.cols[key % m.nPos];
      cell.sort((a, b) => KIND_ORDER[a.kind] - KIND_ORDER[b.kind] || (a.influence ?? 1) - (b.influence ?? 1));
      const availW = col.w * 0.88;
      const availH = this.rowH * 0.72;
      const s = Math.max(2, Math.min(16, Math.sqrt((availW * availH) / cell.length)));
      const perLine = Math.max(1, Math.floor(availW / s));
      const lines = Math.ceil(cell.length / perLine);
      const r = Math.max(1.4, Math.min(5.5, s * 0.36));
      cell.forEach((n, j) => {
        const line = Math.floor(j / perLine);
        const inLine = line === lines - 1 ? cell.length - line * perLine : perLine;
        n.x = col.cx + (j % perLine - (inLine - 1) / 2) * s;
        n.y = this.rowY(row) + (line - (lines - 1) / 2) * s;
        n.r = n.kind === "feature" ? r : Math.max(r, 3.5);
      });
    }
    // keyboard order: within a row by x
    this.rowsOrder = Array.from({ length: m.nRows }, () => []);
    for (const n of m.nodes) this.rowsOrder[n.row].push(n.i);
    for (const r of this.rowsOrder) r.sort((a, b) => m.nodes[a].x - m.nodes[b].x || m.nodes[a].y - m.nodes[b].y);
  }

  _bucketLinks() {
    const m = this.model;
    this.buckets = Array.from({ length: 2 * BUCKETS }, () => []);
    for (const l of m.links) {
      const a = Math.abs(l.weight) / m.maxAbsWeight;
      const b = Math.min(BUCKETS - 1, Math.floor(Math.sqrt(a) * BUCKETS));
      l.bucket = (l.weight >= 0 ? 0 : BUCKETS) + b;
      this.buckets[l.bucket].push(l.i);
    }
  }

  // ------------------------------------------------------------------ drawing

  redraw() {
    if (this._dirty) return;
    this._dirty = true;
    requestAnimationFrame(() => {
      this._dirty = false;
      this.draw();
    });
  }

  visible(n) {
    return !this.only || this.only.has(n.node_id);
  }

  /** Invalidate the cached scene (links and nodes without highlights). */
  invalidate() {
    this.baseValid = false;
    this.redraw();
  }

  /** Everything that does not change on hover or selection, drawn once per view into an
   * offscreen canvas; panning and zooming blit it (transformed) until the view settles. */
  _renderBase() {
    const m = this.model;
    const { dpr, view, colors } = this;
    if (!this.base) {
      this.base = document.createElement("canvas");
      this.baseCtx = this.base.getContext("2d");
    }
    if (this.base.width !== this.canvas.width || this.base.height !== this.canvas.height) {
      this.base.width = this.canvas.width;
      this.base.height = this.canvas.height;
    }
    const ctx = this.baseCtx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.base.width, this.base.height);
    // Many links: the weaker ones are accumulated in JS (one add per pixel) and put as one
    // image; stroking tens of thousands of anti-aliased paths costs far more on a CPU raster.
    const fast = m.links.length >= this.fastLinks;
    let drawn = fast ? this._rasterLinks(ctx) : 0;
    ctx.setTransform(dpr * view.k, 0, 0, dpr * view.k, dpr * view.x, dpr * view.y);
    for (let b = 0; b < this.buckets.length; b++) {
      const list = this.buckets[b];
      if (!list.length || (fast && b % BUCKETS < STRONG)) continue;
      const mag = ((b % BUCKETS) + 1) / BUCKETS;
      ctx.strokeStyle = b < BUCKETS ? colors.pos : colors.neg;
      ctx.globalAlpha = 0.25 + 0.6 * mag;
      ctx.lineWidth = 0.9 / view.k;
      ctx.beginPath();
      for (const i of list) {
        const l = m.links[i];
        const s = m.nodes[l.s];
        const t = m.nodes[l.t];
        if (this.only && !(this.only.has(s.node_id) && this.only.has(t.node_id))) continue;
        ctx.moveTo(s.x, s.y);
        ctx.lineTo(t.x, t.y);
        drawn++;
      }
      ctx.stroke();
    }
    ctx.globalAlpha = 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const grow = Math.sqrt(Math.min(view.k, 4));
    let nodes = 0;
    const byKind = { feature: [], error: [], embedding: [], logit: [] };
    for (const n of m.nodes) if (this.visible(n)) byKind[n.kind].push(n);
    for (const kind of Object.keys(byKind)) {
      ctx.fillStyle = colors[kind];
      ctx.beginPath();
      for (const n of byKind[kind]) {
        this._shape(ctx, n, n.x * view.k + view.x, n.y * view.k + view.y, n.r * grow);
        nodes++;
      }
      ctx.fill();
    }
    this.baseView = { ...view };
    this.baseValid = true;
    this.stats.drawnNodes = nodes;
    this.stats.drawnLinks = drawn;
    this.stats.baseRenders = (this.stats.baseRenders || 0) + 1;
  }

  /** The links of the weaker buckets, as one image: per sign, each link adds its alpha to the
   * pixels it crosses (DDA, clipped to the canvas); the sums become colour and coverage. */
  _rasterLinks(ctx) {
    const m = this.model;
    const { dpr, view, colors } = this;
    const W = this.base.width;
    const H = this.base.height;
    const N = W * H;
    if (!this._acc || this._acc.length !== 2 * N) {
      this._acc = new Float32Array(2 * N);
      this._img = ctx.createImageData(W, H);
    }
    const acc = this._acc;
    acc.fill(0);
    const k = dpr * view.k;
    const ox = dpr * view.x;
    const oy = dpr * view.y;
    let drawn = 0;
    for (let b = 0; b < this.buckets.length; b++) {
      if (b % BUCKETS >= STRONG) continue;
      const a = 0.1 + (0.35 * ((b % BUCKETS) + 1)) / BUCKETS;
      const off = b < BUCKETS ? 0 : N;
      for (const i of this.buckets[b]) {
        const l = m.links[i];
        const s = m.nodes[l.s];
        const t = m.nodes[l.t];
        if (this.only && !(this.only.has(s.node_id) && this.only.has(t.node_id))) continue;
        drawn++;
        let x0 = s.x * k + ox;
        let y0 = s.y * k + oy;
        const dx = t.x * k + ox - x0;
        const dy = t.y * k + oy - y0;
        // clip the segment to [0, W) x [0, H) (Liang-Barsky)
        let t0 = 0;
        let t1 = 1;
        let inside = true;
        for (let e = 0; e < 4 && inside; e++) {
          const p = e === 0 ? -dx : e === 1 ? dx : e === 2 ? -dy : dy;
          const q = e === 0 ? x0 : e === 1 ? W - 1 - x0 : e === 2 ? y0 : H - 1 - y0;
          if (p === 0) inside = q >= 0;
          else {
            const r = q / p;
            if (p < 0) {
              if (r > t1) inside = false;
              else if (r > t0) t0 = r;
            } else if (r < t0) inside = false;
            else if (r < t1) t1 = r;
          }
        }
        if (!inside) continue;
        x0 += t0 * dx;
        y0 += t0 * dy;
        const ex = dx * (t1 - t0);
        const ey = dy * (t1 - t0);
        const n = Math.ceil(Math.max(Math.abs(ex), Math.abs(ey)));
        const sx = n ? ex / n : 0;
        const sy = n ? ey / n : 0;
        let x = x0 + 0.5;
        let y = y0 + 0.5;
        for (let j = 0; j <= n; j++) {
          acc[off + (y | 0) * W + (x | 0)] += a;
          x += sx;
          y += sy;
        }
      }
    }
    const [pr, pg, pb] = rgb(colors.pos);
    const [nr, ng, nb] = rgb(colors.neg);
    const img = this._img;
    const px = new Uint32Array(img.data.buffer);
    px.fill(0);
    const d = img.data;
    for (let p = 0; p < N; p++) {
      const ap = acc[p];
      const an = acc[N + p];
      if (ap === 0 && an === 0) continue;
      const cp = 1 - Math.exp(-ap); // overlapping links build up, never quite saturate
      const cn = 1 - Math.exp(-an);
      const sum = cp + cn;
      const q = 4 * p;
      d[q] = (pr * cp + nr * cn) / sum;
      d[q + 1] = (pg * cp + ng * cn) / sum;
      d[q + 2] = (pb * cp + nb * cn) / sum;
      d[q + 3] = 255 * (1 - (1 - cp) * (1 - cn));
    }
    ctx.putImageData(img, 0, 0);
    return drawn;
  }

  _shape(ctx, n, x, y, r) {
    if (n.kind === "feature") {
      ctx.moveTo(x + r, y);
      ctx.arc(x, y, r, 0, 2 * Math.PI);
    } else if (n.kind === "logit") {
      ctx.moveTo(x, y - r * 1.3);
      ctx.lineTo(x + r * 1.3, y);
      ctx.lineTo(x, y + r * 1.3);
      ctx.lineTo(x - r * 1.3, y);
      ctx.closePath();
    } else {
      ctx.rect(x - r, y - r, 2 * r, 2 * r);
    }
  }

  draw() {
    const m = this.model;
    if (!m || !this.w) return;
    const t0 = performance.now();
    if (!this.stats.firstDrawAt) performance.mark("viewer:draw-start");
    const { ctx, dpr, view, colors } = this;
    const moving = performance.now() - (this._movedAt || 0) < 150;
    const stale = !this.baseView || this.baseView.k !== view.k || this.baseView.x !== view.x || this.baseView.y !== view.y;
    if (!this.baseValid || (stale && !moving)) this._renderBase();
    if (!this.stats.firstDrawAt) performance.mark("viewer:base");
    else if (stale) {
      clearTimeout(this._settle);
      this._settle = setTimeout(() => this.redraw(), 160);
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    this._drawGrid();
    // the cached scene, moved from the view it was drawn at to this one
    const b = this.baseView;
    const f = view.k / b.k;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.drawImage(this.base, dpr * (view.x - b.x * f), dpr * (view.y - b.y * f), this.base.width * f, this.base.height * f);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);

    const focus = this.hover ?? this.selected;
    const focusLinks = new Set();
    if (focus !== null) for (const i of [...m.nodes[focus].in, ...m.nodes[focus].out]) focusLinks.add(i);
    if (this.hoverLink !== null) focusLinks.add(this.hoverLink);
    if (this.selectedLink !== null) focusLinks.add(this.selectedLink);
    if (this.marked) for (const i of this.marked) focusLinks.add(i);
    const grow = Math.sqrt(Math.min(view.k, 4));
    if (focusLinks.size) {
      // dim the scene, then draw the focused links and their ends on top
      ctx.globalAlpha = 0.72;
      ctx.fillStyle = colors.bg;
      ctx.fillRect(0, 0, this.w, this.h);
      ctx.globalAlpha = 1;
      ctx.setTransform(dpr * view.k, 0, 0, dpr * view.k, dpr * view.x, dpr * view.y);
      const ends = new Set();
      for (const i of focusLinks) {
        const l = m.links[i];
        const s = m.nodes[l.s];
        const t = m.nodes[l.t];
        ends.add(l.s);
        ends.add(l.t);
        const mag = Math.sqrt(Math.abs(l.weight) / m.maxAbsWeight);
        if (i === this.selectedLink || i === this.hoverLink) {
          ctx.strokeStyle = colors.accent;
          ctx.lineWidth = (4 + 3 * mag) / view.k;
          ctx.beginPath();
          ctx.moveTo(s.x, s.y);
          ctx.lineTo(t.x, t.y);
          ctx.stroke();
        }
        ctx.strokeStyle = l.weight >= 0 ? colors.pos : colors.neg;
        ctx.lineWidth = (1 + 3 * mag) / view.k;
        ctx.beginPath();
        ctx.moveTo(s.x, s.y);
        ctx.lineTo(t.x, t.y);
        ctx.stroke();
      }
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      for (const i of ends) {
        const n = m.nodes[i];
        if (!this.visible(n)) continue;
        ctx.fillStyle = colors[n.kind];
        ctx.beginPath();
        this._shape(ctx, n, n.x * view.k + view.x, n.y * view.k + view.y, n.r * grow);
        ctx.fill();
      }
    }
    const ring = (n, color, width, pad) => {
      const x = n.x * view.k + view.x;
      const y = n.y * view.k + view.y;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.arc(x, y, n.r * grow + pad, 0, 2 * Math.PI);
      ctx.stroke();
    };
    for (const id of this.pinned) {
      const n = m.byId.get(id);
      if (n && this.visible(n)) ring(n, colors.pin, 2, 2.5);
    }
    for (const [id, g] of this.groups) {
      const n = m.byId.get(id);
      if (n && this.visible(n)) ring(n, `hsl(${(g * 67) % 360} 70% 50%)`, 2, 5);
    }
    // supernode labels above their members
    if (this.groupLabels && this.groupLabels.length) {
      const spots = new Map();
      for (const [id, g] of this.groups) {
        const n = m.byId.get(id);
        if (!n || !this.visible(n)) continue;
        const p = this.screenOf(n);
        const s = spots.get(g) || { x: 0, k: 0, y: Infinity };
        s.x += p.x;
        s.k += 1;
        s.y = Math.min(s.y, p.y);
        spots.set(g, s);
      }
      ctx.font = "600 12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "bottom";
      for (const [g, s] of spots) {
        ctx.fillStyle = `hsl(${(g * 67) % 360} 70% 45%)`;
        ctx.fillText(this.groupLabels[g - 1] || "", s.x / s.k, s.y - 10);
      }
    }
    if (focus !== null) ring(m.nodes[focus], colors.fg, 2, 2);
    if (this.selected !== null) ring(m.nodes[this.selected], colors.accent, 3, 4);

    this._drawAxes();
    this.stats.frames++;
    this.stats.lastDrawMs = performance.now() - t0;
    this.stats.drawMs.push(this.stats.lastDrawMs);
    if (this.stats.drawMs.length > 600) this.stats.drawMs.splice(0, 300);
    this.canvas.dataset.nodes = String(this.stats.drawnNodes);
    this.canvas.dataset.links = String(this.stats.drawnLinks);
    if (!this.stats.firstDrawAt) {
      performance.mark("viewer:drawn");
      ctx.getImageData(0, 0, 1, 1); // wait for the pixels: first render means drawn, not queued
      this.stats.firstDrawAt = performance.now();
      performance.mark("viewer:painted");
    }
  }

  _drawGrid() {
    const m = this.model;
    const { ctx, view, colors } = this;
    ctx.strokeStyle = colors.grid;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const c of this.cols) {
      const x = Math.round(c.x0 * view.k + view.x) + 0.5;
      ctx.moveTo(x, 0);
      ctx.lineTo(x, this.h - MARGIN.bottom + 6);
    }
    for (let r = 0; r <= m.nRows; r++) {
      const y = Math.round((MARGIN.top + (m.nRows - r) * this.rowH) * view.k + view.y) + 0.5;
      ctx.moveTo(MARGIN.left * view.k + view.x, y);
      ctx.lineTo(this.w, y);
    }
    ctx.stroke();
  }

  _drawAxes() {
    const m = this.model;
    const { ctx, view, colors } = this;
    // layer labels on the left, following vertical pan
    ctx.fillStyle = colors.bg;
    ctx.fillRect(0, 0, MARGIN.left - 4, this.h);
    ctx.fillRect(0, this.h - MARGIN.bottom + 8, this.w, MARGIN.bottom);
    ctx.fillStyle = colors.muted;
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let r = 0; r < m.nRows; r++) {
      const y = this.rowY(r) * view.k + view.y;
      if (y < 0 || y > this.h - MARGIN.bottom) continue;
      const name = r === 0 ? "Emb" : r === m.nRows - 1 ? "Logit" : `L${r - 1}`;
      ctx.fillText(name, MARGIN.left - 10, y);
    }
    // tokens along the bottom, following horizontal pan
    ctx.fillStyle = colors.fg;
    ctx.font = "13px ui-monospace, SFMono-Regular, Menlo, monospace";
    ctx.textBaseline = "top";
    const y = this.h - MARGIN.bottom + 14;
    for (let p = 0; p < this.cols.length; p++) {
      const c = this.cols[p];
      const x = c.cx * view.k + view.x;
      const w = c.w * view.k;
      if (x < MARGIN.left - w || x > this.w + w) continue;
      const tok = JSON.stringify(m.token(p)).slice(1, -1);
      ctx.save();
      const rotated = w < ctx.measureText(tok).width + 6;
      if (rotated) {
        ctx.translate(x, y);
        ctx.rotate(-Math.PI / 5);
        ctx.textAlign = "right";
        ctx.fillText(tok.length > 12 ? `${tok.slice(0, 11)}…` : tok, 4, 0);
      } else {
        ctx.textAlign = "center";
        ctx.fillText(tok, x, y);
      }
      ctx.restore();
      ctx.fillStyle = colors.muted;
      ctx.font = "10px system-ui, sans-serif";
      ctx.textAlign = "center";
      if (!rotated && w > 18) ctx.fillText(String(p), x, y + 18);
      ctx.fillStyle = colors.fg;
      ctx.font = "13px ui-monospace, SFMono-Regular, Menlo, monospace";
    }
  }

  // ------------------------------------------------------------------ geometry

  screenOf(n) {
    return { x: n.x * this.view.k + this.view.x, y: n.y * this.view.k + this.view.y };
  }

  nodeAt(sx, sy) {
    const m = this.model;
    if (!m) return null;
    const grow = Math.sqrt(Math.min(this.view.k, 4));
    let best = null;
    let bestD = Infinity;
    for (const n of m.nodes) {
      if (!this.visible(n)) continue;
      const p = this.screenOf(n);
      const d = Math.hypot(p.x - sx, p.y - sy);
      if (d <= n.r * grow + 3 && d < bestD) {
        best = n.i;
        bestD = d;
      }
    }
    return best;
  }

  linkAt(sx, sy, tolerance = 4) {
    const m = this.model;
    if (!m) return null;
    let best = null;
    let bestD = tolerance;
    for (const l of m.links) {
      const s = m.nodes[l.s];
      const t = m.nodes[l.t];
      if (!this.visible(s) || !this.visible(t)) continue;
      const a = this.screenOf(s);
      const b = this.screenOf(t);
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const len2 = dx * dx + dy * dy || 1;
      const u = Math.max(0, Math.min(1, ((sx - a.x) * dx + (sy - a.y) * dy) / len2));
      const d = Math.hypot(a.x + u * dx - sx, a.y + u * dy - sy);
      if (d < bestD) {
        best = l.i;
        bestD = d;
      }
    }
    return best;
  }

  /** What a click at (sx, sy) would hit: {node} or {link} or null (the test hook uses it). */
  hitTest(sx, sy) {
    const n = this.nodeAt(sx, sy);
    if (n !== null) return { node: this.model.nodes[n].node_id };
    const l = this.linkAt(sx, sy);
    if (l !== null) return { link: [this.model.links[l].source, this.model.links[l].target] };
    return null;
  }

  zoomAt(sx, sy, factor) {
    const k = Math.max(0.5, Math.min(40, this.view.k * factor));
    const f = k / this.view.k;
    this.view.x = sx - (sx - this.view.x) * f;
    this.view.y = sy - (sy - this.view.y) * f;
    this.view.k = k;
    this._movedAt = performance.now();
    this.redraw();
  }

  panBy(dx, dy) {
    this.view.x += dx;
    this.view.y += dy;
    this._movedAt = performance.now();
    this.redraw();
  }

  resetView() {
    this.view = { k: 1, x: 0, y: 0 };
    this.redraw();
  }

  /** Pan so that node i is in view. */
  reveal(i) {
    const p = this.screenOf(this.model.nodes[i]);
    const pad = 40;
    let dx = 0;
    let dy = 0;
    if (p.x < MARGIN.left + pad) dx = MARGIN.left + pad - p.x;
    if (p.x > this.w - pad) dx = this.w - pad - p.x;
    if (p.y < pad) dy = pad - p.y;
    if (p.y > this.h - MARGIN.bottom - pad) dy = this.h - MARGIN.bottom - pad - p.y;
    if (dx || dy) this.panBy(dx, dy);
  }

  // ------------------------------------------------------------------ selection

  /** Emphasise these links (a head's), as a selection does; null clears. */
  mark(links) {
    this.marked = links && links.size ? links : null;
    this.redraw();
  }

  select(i, { emit = true } = {}) {
    this.marked = null;
    this.selected = i;
    this.selectedLink = null;
    if (i !== null) this.reveal(i);
    this.redraw();
    if (emit) this.onSelect(i === null ? null : this.model.nodes[i]);
  }

  selectLink(i, { emit = true } = {}) {
    this.marked = null;
    this.selectedLink = i;
    this.redraw();
    if (emit) this.onLinkSelect(i === null ? null : this.model.links[i]);
  }

  // ------------------------------------------------------------------ events

  _wireEvents() {
    const c = this.canvas;
    let drag = null;
    const pos = (e) => {
      const r = c.getBoundingClientRect();
      return { x: e.clientX - r.left, y: e.clientY - r.top };
    };
    c.addEventListener("pointerdown", (e) => {
      const p = pos(e);
      drag = { x: p.x, y: p.y, moved: 0, id: e.pointerId };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      const p = pos(e);
      if (drag) {
        const dx = p.x - drag.x;
        const dy = p.y - drag.y;
        drag.moved += Math.abs(dx) + Math.abs(dy);
        drag.x = p.x;
        drag.y = p.y;
        if (drag.moved > 3) {
          c.classList.add("panning");
          this.panBy(dx, dy);
        }
        return;
      }
      this._hoverAt(p.x, p.y, e);
    });
    c.addEventListener("pointerup", (e) => {
      const p = pos(e);
      const wasClick = drag && drag.moved <= 3;
      drag = null;
      c.classList.remove("panning");
      if (!wasClick) return;
      const n = this.nodeAt(p.x, p.y);
      if (n !== null) return this.select(n);
      const l = this.linkAt(p.x, p.y);
      if (l !== null) return this.selectLink(l);
      this.select(null);
    });
    c.addEventListener("pointerleave", () => {
      if (this.hover !== null || this.hoverLink !== null) {
        this.hover = this.hoverLink = null;
        this.tip.hidden = true;
        this.redraw();
      }
    });
    c.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        const p = pos(e);
        this.zoomAt(p.x, p.y, Math.exp(-e.deltaY * 0.0015));
      },
      { passive: false },
    );
    c.addEventListener("dblclick", () => this.resetView());
    c.addEventListener("keydown", (e) => this._key(e));
  }

  _hoverAt(x, y) {
    const n = this.nodeAt(x, y);
    const l = n === null ? this.linkAt(x, y, 3) : null;
    if (n === this.hover && l === this.hoverLink) return;
    this.hover = n;
    this.hoverLink = l;
    const m = this.model;
    if (n !== null) {
      const node = m.nodes[n];
      this.tip.textContent = `${m.label(node)}${node.activation !== undefined ? ` · act ${node.activation}` : ""}`;
    } else if (l !== null) {
      const link = m.links[l];
      this.tip.textContent = `${link.source} → ${link.target} · ${link.weight}${link.cross ? " · across positions" : ""}`;
    }
    this.tip.hidden = n === null && l === null;
    if (!this.tip.hidden) {
      this.tip.style.left = `${Math.min(x + 12, this.w - 260)}px`;
      this.tip.style.top = `${y + 14}px`;
    }
    this.canvas.style.cursor = n !== null || l !== null ? "pointer" : "";
    this.onHover(n === null ? null : m.nodes[n]);
    this.redraw();
  }

  _key(e) {
    const m = this.model;
    if (!m || !m.nodes.length) return;
    const cur = this.selected;
    const visibleRow = (r) => this.rowsOrder[r].filter((i) => this.visible(m.nodes[i]));
    let next = null;
    switch (e.key) {
      case "ArrowLeft":
      case "ArrowRight": {
        if (cur === null) {
          next = visibleRow(0)[0] ?? m.nodes.find((n) => this.visible(n))?.i ?? null;
          break;
        }
        const row = visibleRow(m.nodes[cur].row);
        const k = row.indexOf(cur) + (e.key === "ArrowRight" ? 1 : -1);
        next = row[(k + row.length) % row.length];
        break;
      }
      case "ArrowUp":
      case "ArrowDown": {
        const step = e.key === "ArrowUp" ? 1 : -1;
        const from = cur === null ? (step > 0 ? -1 : m.nRows) : m.nodes[cur].row;
        const x = cur === null ? 0 : m.nodes[cur].x;
        for (let r = from + step; r >= 0 && r < m.nRows; r += step) {
          const row = visibleRow(r);
          if (!row.length) continue;
          next = row.reduce((a, b) => (Math.abs(m.nodes[b].x - x) < Math.abs(m.nodes[a].x - x) ? b : a));
          break;
        }
        if (next === null) next = cur;
        break;
      }
      case "Home":
        next = visibleRow(m.nodes[cur ?? 0].row)[0];
        break;
      case "End": {
        const row = visibleRow(m.nodes[cur ?? 0].row);
        next = row[row.length - 1];
        break;
      }
      case "Enter":
      case " ":
        if (cur !== null) this.onSelect(m.nodes[cur]);
        e.preventDefault();
        return;
      case "Escape":
        this.select(null);
        e.preventDefault();
        return;
      case "+":
      case "=":
        this.zoomAt(this.w / 2, this.h / 2, 1.25);
        e.preventDefault();
        return;
      case "-":
        this.zoomAt(this.w / 2, this.h / 2, 0.8);
        e.preventDefault();
        return;
      case "0":
        this.resetView();
        e.preventDefault();
        return;
      case "p":
      case "P":
        if (cur !== null && this.onPinKey) this.onPinKey(m.nodes[cur]);
        e.preventDefault();
        return;
      default:
        return;
    }
    e.preventDefault();
    if (next !== null && next !== undefined) this.select(next);
  }
}
