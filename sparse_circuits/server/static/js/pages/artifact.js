// /models/{id}, /stores/{id}, /transcoders/{id}: an artifact's metrics, lineage and training
// curves (sparsify: CE against τ, connectivity, λ; train-clt: FVU, L0, dead fraction).

import { get, paths } from "../api.js";
import { lineChart } from "../charts.js";
import { clear, el, fmt, href, params, problemBox, when } from "../shell.js";

const PAGE_OF = { model: "models", store: "stores", transcoder: "transcoders", graph: "graphs" };

/** Charts for a metrics.jsonl: the known curves of sparsify and train-clt, then the rest. */
export function curvesFor(records) {
  if (!records || !records.length) return [el("p", { class: "muted" }, "No training curve (metrics.jsonl) recorded.")];
  const step = (r, i) => r.step ?? i;
  const series = (key, name = key, extra = {}) => ({
    name,
    points: records.map((r, i) => [step(r, i), r[key]]).filter((p) => typeof p[1] === "number"),
    ...extra,
  });
  const has = (k) => records.some((r) => typeof r[k] === "number");
  const charts = [];
  const used = new Set(["step", "elapsed_s"]);
  const add = (title, keys, opts = {}) => {
    const present = keys.filter(([k]) => has(k));
    if (!present.length) return;
    present.forEach(([k]) => used.add(k));
    charts.push(lineChart(present.map(([k, name, extra]) => series(k, name, extra)), { title, ...opts }));
  };
  // sparsify
  add("cross-entropy against τ", [["ce", "CE (noisy gates)"], ["hard_ce", "CE (hard gates)"], ["tau", "τ", { dashed: true }], ["dense_ce", "dense CE", { dashed: true }]]);
  add("connectivity (fraction of causal pairs)", [["hard_connectivity", "open (hard)"], ["open", "expected open"], ["connectivity", "connectivity"]], { log: true });
  add("λ (Lagrange multiplier)", [["lambda", "λ"]], { log: true });
  add("keys per query", [["keys_per_query", "keys/query"]]);
  // train-clt
  add("FVU", [["fvu", "FVU"], ["nmse", "FVU (normalised MSE)"]], { log: true });
  add("L0 (active features per token and layer)", [["l0", "L0"]]);
  add("dead fraction", [["dead_fraction", "dead"]]);
  add("loss", [["loss", "loss"]], { log: true });
  // anything else numeric
  const rest = Object.keys(records[records.length - 1]).filter((k) => !used.has(k) && has(k));
  for (const k of rest) charts.push(lineChart([series(k)], { title: k }));
  return charts;
}

function metricValue(v) {
  if (Array.isArray(v)) {
    // per layer (and per head): one line per layer
    if (v.some(Array.isArray)) return v.map((row, l) => el("div", {}, `L${l}: ${[row].flat(Infinity).map((x) => fmt(x)).join(", ")}`));
    return v.map((x) => fmt(x)).join(", ");
  }
  if (v !== null && typeof v === "object")
    return el("div", { class: "obj" }, Object.entries(v).map(([k, x]) => el("div", {}, `${k}: `, typeof x === "object" ? JSON.stringify(x) : fmt(x))));
  return fmt(v);
}

function metricCards(metrics) {
  if (!metrics) return el("p", { class: "muted" }, "No metrics.");
  return el(
    "div",
    { class: "metrics" },
    Object.entries(metrics).map(([k, v]) =>
      el(
        "div",
        { class: "metric", dataset: { metric: k } },
        el("div", { class: "k" }, k),
        el("div", { class: "v" }, metricValue(v)),
      ),
    ),
  );
}

function lineage(a) {
  const link = (kind, id) => (id ? el("a", { href: href(`/${PAGE_OF[kind]}/${encodeURIComponent(id)}`) }, `${kind} ${id.slice(0, 10)}`) : null);
  const chain = [link("model", a.model_id), link("store", a.store_id), link("transcoder", a.transcoder_id)].filter(Boolean);
  const items = [];
  chain.forEach((c) => items.push(c, el("span", { class: "arrow", "aria-hidden": "true" }, "→")));
  items.push(el("strong", {}, `${a.kind} ${a.name}`));
  if (!chain.length && !a.job_id) return el("p", { class: "muted lineage" }, "No recorded parents (registered from the data dir).");
  return el(
    "div",
    { class: "lineage", "aria-label": "lineage" },
    items,
    a.job_id ? el("span", { class: "muted" }, " · made by ", el("a", { href: href(`/jobs?job=${encodeURIComponent(a.job_id)}`) }, `job ${a.job_id.slice(0, 10)}`)) : null,
  );
}

export async function artifactView(root) {
  const { kind, id } = params;
  clear(root, el("p", { class: "loading" }, "Loading…"));
  let a;
  try {
    a = await get(paths.artifact(kind, id));
  } catch (err) {
    clear(root, el("h1", {}, `${kind} ${id}`), problemBox(err, "Artifact"));
    return;
  }
  document.title = `${a.kind} ${a.name} · sparse-circuits`;
  const curves = el("div", { class: "charts" }, el("p", { class: "loading" }, "Loading training curve…"));
  const children = el("div");
  clear(
    root,
    el("h1", {}, `${a.kind} ${a.name}`),
    lineage(a),
    el(
      "dl",
      { class: "facts" },
      [
        ["id", el("code", {}, a.id)],
        ["path", el("code", {}, a.path)],
        ["state", a.state],
        ["created", when(a.created_at)],
      ].map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
    ),
    el("h2", {}, "metrics"),
    metricCards(a.metrics),
    el("h2", {}, "training curve"),
    curves,
    children,
    a.meta ? el("details", {}, el("summary", {}, "meta"), el("pre", { class: "log" }, JSON.stringify(a.meta, null, 1))) : null,
  );
  window.__viewer = { artifact: a, ready: true };
  get(paths.metricsLog(kind, id))
    .then((records) => clear(curves, curvesFor(records)))
    .catch((err) => clear(curves, problemBox(err, "Metrics log")));
  // Downstream artifacts and graphs (lineage forwards).
  const field = { models: "model_id", stores: "store_id", transcoders: "transcoder_id" }[kind];
  const lists = [];
  for (const plural of ["stores", "transcoders", "graphs"]) {
    if (plural === kind) continue;
    lists.push(
      get(paths.artifacts(plural))
        .then((res) => ({ plural, items: (res.data || []).filter((x) => x[field] === id) }))
        .catch(() => ({ plural, items: [] })),
    );
  }
  const found = (await Promise.all(lists)).filter((l) => l.items.length);
  if (found.length)
    clear(
      children,
      el("h2", {}, "made from it"),
      el(
        "ul",
        {},
        found.flatMap(({ plural, items }) =>
          items.map((x) => el("li", {}, el("a", { href: href(`/${plural}/${encodeURIComponent(x.id)}`) }, `${plural.slice(0, -1)} ${x.name || x.slug || x.prompt || x.id}`))),
        ),
      ),
    );
}
