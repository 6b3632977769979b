// /compare?a=&b=: two graphs of one prompt side by side (say the dense and the sparsified
// model's), each with its edges-for-80 % and heads-for-80 % figures, at shared thresholds.

import { get, paths } from "../api.js";
import { linkCard, nodeCard } from "../cards.js";
import { GraphCanvas } from "../graph-canvas.js";
import { GraphModel } from "../graph-model.js";
import { clear, el, emit, fmt, href, onCommand, params, problemBox, setUrlState, urlState } from "../shell.js";

class Pane {
  constructor(root, id, side) {
    this.graphId = id;
    this.side = side;
    this.pinned = new Set();
    this.qkExtra = [];
    this.graph = null;
    this.model = null;
    this.title = el("h2", {}, `${side}: ${id}`);
    this.figures = el("dl", { class: "figures", "aria-label": `figures of graph ${side}` });
    this.stage = el("div", { class: "stage" });
    this.card = el("div", { class: "card-slot" }, el("p", { class: "muted" }, "Click a node or a link."));
    root.append(
      el(
        "section",
        { class: "pane", dataset: { side } },
        el("div", {}, this.title, el("a", { href: href(`/graphs/${encodeURIComponent(id)}`) }, "open graph →")),
        this.figures,
        this.stage,
        this.card,
      ),
    );
    this.canvas = new GraphCanvas(this.stage, {
      label: `Graph ${side}`,
      onSelect: (n) => {
        this.show(n);
        // the same node in the other graph (embeddings, errors, logits share their ids)
        if (this.other && this.other.model) {
          const twin = n ? this.other.model.byId.get(n.node_id) : null;
          this.other.canvas.select(twin ? twin.i : null, { emit: false });
          this.other.show(twin || null);
        }
        if (n) emit("node-selected", { graph: this.graphId, node_id: n.node_id });
      },
      onLinkSelect: (l) => l && clear(this.card, linkCard(this, l)),
    });
  }

  show(n) {
    clear(this.card, n ? nodeCard(this, n) : el("p", { class: "muted" }, "Nothing selected."));
  }

  get transcoderId() {
    return this.graph ? this.graph.transcoder_id : null;
  }

  selectNode(id) {
    const n = this.model.byId.get(id);
    this.canvas.select(n ? n.i : null);
  }

  selectLink(i) {
    this.canvas.selectLink(i);
  }

  togglePin(id) {
    if (this.pinned.has(id)) this.pinned.delete(id);
    else this.pinned.add(id);
    this.canvas.pinned = this.pinned;
    this.canvas.redraw();
  }

  async load(nt, et) {
    if (!this.graph) {
      try {
        this.graph = await get(paths.graph(this.graphId));
        this.title.textContent = `${this.side}: ${this.graph.slug || this.graphId}`;
      } catch {
        this.graph = null;
      }
    }
    const doc = await get(paths.graphJson(this.graphId, nt, et));
    const first = !this.model;
    this.model = new GraphModel(doc);
    this.canvas.setModel(this.model, { keepView: !first });
    const s = this.model.circuitSize(0.8);
    // Figures the API computed on the full graph win over ours on the pruned JSON.
    const scores = (this.graph && this.graph.scores) || {};
    const edges80 = scores.edges_for_80pct ?? s.edges;
    const heads80 = scores.heads_for_80pct ?? s.heads;
    this.size = { ...s, edges80, heads80 };
    clear(
      this.figures,
      [
        ["nodes", fmt(s.nodes)],
        ["links", fmt(s.links)],
        ["edges for 80 %", fmt(edges80)],
        ["cross-position edges for 80 %", fmt(s.crossEdges)],
        ["heads for 80 %", heads80 === null ? "–" : `${fmt(heads80)}${s.totalHeads ? ` / ${s.totalHeads}` : ""}`],
      ].map(([k, v]) => el("div", { dataset: { figure: k } }, el("dt", {}, k), el("dd", {}, v))),
    );
    return doc;
  }
}

export async function compareView(root) {
  const q = urlState();
  let nt = Number(q.get("node_threshold")) || 0.8;
  let et = Number(q.get("edge_threshold")) || 0.98;
  const prompt = el("p", { class: "muted prompt" });
  const warn = el("div");
  const nodeIn = el("input", { type: "number", id: "node-threshold-n", min: 0.05, max: 1, step: 0.01, value: nt, class: "num", "aria-label": "node threshold" });
  const edgeIn = el("input", { type: "number", id: "edge-threshold-n", min: 0.05, max: 1, step: 0.01, value: et, class: "num", "aria-label": "edge threshold" });
  const panes = el("div", { class: "compare-panes" });
  const note = el(
    "p",
    { class: "muted" },
    "Edges for 80 %: the fewest links (largest |weight| first) holding 80 % of the pruned graph's total |weight| (the API's figure on the full graph when it gives one); heads for 80 %: the fewest heads holding 80 % of the attention-mediated attribution.",
  );
  clear(
    root,
    el(
      "div",
      { class: "compare" },
      el(
        "div",
        { class: "toolbar" },
        el("h1", {}, "Compare graphs"),
        el("label", { class: "threshold" }, el("span", {}, "nodes"), nodeIn),
        el("label", { class: "threshold" }, el("span", {}, "edges"), edgeIn),
        prompt,
      ),
      warn,
      panes,
      note,
    ),
  );
  const a = new Pane(panes, params.a, "A");
  const b = new Pane(panes, params.b, "B");
  a.other = b;
  b.other = a;
  const state = { ready: false, a, b };
  window.__viewer = state;
  const load = async (fromUser) => {
    state.ready = false;
    try {
      const [da, db] = await Promise.all([a.load(nt, et), b.load(nt, et)]);
      const pa = da.metadata.prompt_tokens.join("");
      const pb = db.metadata.prompt_tokens.join("");
      prompt.textContent = `prompt: ${JSON.stringify(da.metadata.prompt || pa)}`;
      clear(warn, pa !== pb ? el("p", { class: "notice" }, `The two graphs have different prompts (B: ${JSON.stringify(db.metadata.prompt || pb)}).`) : null);
      setUrlState({ node_threshold: nt === 0.8 ? null : nt, edge_threshold: et === 0.98 ? null : et });
      state.ready = true;
      state.figures = { a: a.size, b: b.size };
      emit(fromUser ? "thresholds-changed" : "ready", { graphs: [params.a, params.b], node_threshold: nt, edge_threshold: et, figures: state.figures });
    } catch (err) {
      clear(warn, problemBox(err, "Graphs"));
    }
  };
  nodeIn.addEventListener("change", () => {
    nt = Number(nodeIn.value) || nt;
    load(true);
  });
  edgeIn.addEventListener("change", () => {
    et = Number(edgeIn.value) || et;
    load(true);
  });
  onCommand("thresholds-changed", (d) => {
    if (d.node_threshold) nodeIn.value = nt = Number(d.node_threshold);
    if (d.edge_threshold) edgeIn.value = et = Number(d.edge_threshold);
    load(false);
  });
  await load(false);
}
