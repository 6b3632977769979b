// /graphs/{id}: the graph, its pruning controls, cards, and the pinned subgraph.

import { get, put, paths } from "../api.js";
import { headCard, headsList, linkCard, nodeCard } from "../cards.js";
import { GraphCanvas } from "../graph-canvas.js";
import { GraphModel } from "../graph-model.js";
import { announce, clear, el, emit, embedded, fmt, onCommand, params, problemBox, setUrlState, urlState } from "../shell.js";

const DEFAULTS = { node: 0.8, edge: 0.98 };

function clamp01(x, fallback) {
  const v = Number(x);
  return Number.isFinite(v) && v > 0 && v <= 1 ? v : fallback;
}

function slider(id, label, value, onchange) {
  const range = el("input", { type: "range", id, min: 0.05, max: 1, step: 0.01, value, "aria-label": label });
  const num = el("input", { type: "number", id: `${id}-n`, min: 0.05, max: 1, step: 0.01, value, "aria-label": `${label} value`, class: "num" });
  range.addEventListener("input", () => {
    num.value = range.value;
    onchange(Number(range.value));
  });
  num.addEventListener("change", () => {
    const v = clamp01(num.value, Number(range.value));
    range.value = v;
    num.value = v;
    onchange(v);
  });
  return { box: el("label", { class: "threshold", for: id }, el("span", {}, label), range, num), range, num };
}

export class GraphPage {
  constructor(root, graphId) {
    this.root = root;
    this.graphId = graphId;
    const q = urlState();
    this.thresholds = { node: clamp01(q.get("node_threshold"), DEFAULTS.node), edge: clamp01(q.get("edge_threshold"), DEFAULTS.edge) };
    this.pinned = new Set((q.get("pinned") || "").split(",").filter(Boolean));
    this.supernodes = [];
    this.qkExtra = [];
    this.pendingSelect = q.get("selected");
    this.pendingLink = q.get("link");
    this.onlyPinned = q.get("only_pinned") === "true";
    this.model = null;
    this.graph = null;
    this.loads = 0;
    this._build();
    this._expose();
    this._commands();
  }

  get transcoderId() {
    return this.graph ? this.graph.transcoder_id : null;
  }

  _build() {
    const nodeT = slider("node-threshold", "nodes", this.thresholds.node, (v) => this.setThresholds({ node: v }, true));
    const edgeT = slider("edge-threshold", "edges", this.thresholds.edge, (v) => this.setThresholds({ edge: v }, true));
    this.sliders = { node: nodeT, edge: edgeT };
    this.title = el("h1", { class: "graph-title" }, "Attribution graph");
    this.counts = el("span", { class: "counts", "aria-live": "polite" });
    this.onlyBox = el("input", { type: "checkbox", id: "only-pinned", checked: this.onlyPinned });
    this.onlyBox.addEventListener("change", () => {
      this.onlyPinned = this.onlyBox.checked;
      this._applyOnly();
      setUrlState({ only_pinned: this.onlyPinned ? "true" : null });
    });
    const toolbar = el(
      "div",
      { class: "toolbar", role: "toolbar", "aria-label": "Pruning and view" },
      this.title,
      el("fieldset", { class: "thresholds" }, el("legend", { class: "sr-only" }, "Pruning thresholds (share of influence kept)"), nodeT.box, edgeT.box),
      this.counts,
      el("label", { class: "check" }, this.onlyBox, " pinned only"),
      el("button", { type: "button", onclick: () => this.canvas.resetView(), title: "Reset pan and zoom (0)" }, "Reset view"),
      embedded ? el("a", { href: window.location.pathname.replace(/\?.*/, ""), target: "_blank", rel: "noopener", class: "open-full" }, "Open ↗") : null,
    );
    this.status = el("div", { class: "status" });
    const stage = el("div", { class: "stage" });
    this.card = el("div", { class: "card-slot", "aria-live": "polite" }, el("p", { class: "muted hint" }, "Click a node or a link (or focus the graph and use the arrow keys) to see its card."));
    this.subgraph = el("section", { class: "subgraph", "aria-label": "Subgraph" });
    this.heads = el("div", { class: "heads-slot" });
    const side = el("aside", { class: "side" }, this.card, this.subgraph, this.heads);
    clear(this.root, el("div", { class: "graph-page" }, toolbar, this.status, el("div", { class: "graph-main" }, stage, side)));
    this.canvas = new GraphCanvas(stage, {
      onSelect: (n) => this._selected(n, true),
      onLinkSelect: (l) => this._linkSelected(l, true),
    });
    this.canvas.onPinKey = (n) => this.togglePin(n.node_id);
    this._renderSubgraph();
  }

  async load() {
    const pruned = this.fetchPruned(false); // in parallel with the graph's record
    try {
      this.graph = await get(paths.graph(this.graphId));
    } catch (err) {
      if (err.status === 404) {
        clear(this.status, problemBox(err, `Graph ${this.graphId}`));
        return;
      }
      this.graph = null; // the JSON may still come; features then have no transcoder
    }
    if (this.graph && this.graph.state !== "complete") {
      // made by a job: say so, and load it when the job is done
      await pruned;
      const job = this.graph.job_id;
      const note = el("p", { class: "notice" }, `This graph is ${this.graph.state}`, job ? [" (", el("a", { href: `/jobs?job=${encodeURIComponent(job)}` }, `job ${job}`), ")"] : "", this.graph.error ? `: ${this.graph.error}` : ".");
      clear(this.status, note);
      if (this.graph.state === "pending") {
        await new Promise((r) => setTimeout(r, 2000));
        return this.load();
      }
      return;
    }
    if (this.graph && this.graph.store === false) {
      // one pruning kept as a JSON file: the thresholds are fixed
      const own = { node: this.graph.node_threshold ?? DEFAULTS.node, edge: this.graph.edge_threshold ?? DEFAULTS.edge };
      for (const k of ["node", "edge"]) {
        for (const input of [this.sliders[k].range, this.sliders[k].num]) {
          input.disabled = true;
          input.title = "This graph is one pruning (a graph JSON file): create it again for other thresholds.";
        }
      }
      if (own.node !== this.thresholds.node || own.edge !== this.thresholds.edge) {
        await pruned;
        this.thresholds = own;
        for (const k of ["node", "edge"]) this.sliders[k].range.value = this.sliders[k].num.value = own[k];
        await this.fetchPruned(false);
      }
    }
    if (this.graph) {
      this.title.textContent = this.graph.slug || this.graph.prompt || "Attribution graph";
      this.title.title = this.graph.prompt || "";
      document.title = `${this.title.textContent} · sparse-circuits`;
    }
    await pruned;
    this._loadSubgraphNames();
  }

  setThresholds({ node, edge }, fromUser) {
    if (node !== undefined) this.thresholds.node = node;
    if (edge !== undefined) this.thresholds.edge = edge;
    for (const k of ["node", "edge"]) {
      this.sliders[k].range.value = this.thresholds[k];
      this.sliders[k].num.value = this.thresholds[k];
    }
    clearTimeout(this._debounce);
    this._debounce = setTimeout(() => this.fetchPruned(fromUser), 180);
  }

  async fetchPruned(fromUser) {
    const { node, edge } = this.thresholds;
    if (this._abort) this._abort.abort();
    this._abort = new AbortController();
    this.loading = true;
    this.root.classList.add("busy");
    let doc;
    try {
      doc = await get(paths.graphJson(this.graphId, node, edge), { signal: this._abort.signal });
    } catch (err) {
      if (err.name === "AbortError") return;
      this.loading = false;
      this.root.classList.remove("busy");
      clear(this.status, problemBox(err, "Graph JSON"));
      if (this.model && this.good) {
        // keep showing the last pruning that loaded, with its thresholds
        this.thresholds = { ...this.good };
        for (const k of ["node", "edge"]) this.sliders[k].range.value = this.sliders[k].num.value = this.good[k];
      }
      return;
    }
    this.loading = false;
    this.root.classList.remove("busy");
    clear(this.status);
    this.good = { node, edge };
    this.loads++;
    const first = !this.model;
    if (first) performance.mark("viewer:json");
    this.model = new GraphModel(doc);
    if (first) performance.mark("viewer:model");
    if (first && doc.qParams) {
      if (!this.pinned.size) for (const id of doc.qParams.pinnedIds || []) this.pinned.add(id);
      this.supernodes = (doc.qParams.supernodes || []).map((s) => [...s]);
    }
    if (!this.graph && doc.metadata) {
      this.title.textContent = doc.metadata.slug || doc.metadata.prompt;
    }
    this.canvas.setModel(this.model, { keepView: !first });
    this._applyPins();
    this._applyOnly();
    const size = this.model.circuitSize(0.8);
    this.counts.textContent = `${fmt(size.nodes)} nodes · ${fmt(size.links)} links (${fmt(size.crossLinks)} across positions)`;
    setUrlState({
      node_threshold: node === DEFAULTS.node ? null : node,
      edge_threshold: edge === DEFAULTS.edge ? null : edge,
    });
    if (first) {
      if (this.pendingSelect && this.model.byId.has(this.pendingSelect)) this.selectNode(this.pendingSelect, false);
      else if (this.pendingLink) {
        const [s, t] = this.pendingLink.split("~");
        const l = this.model.link(s, t);
        if (l) this.selectLink(l.i, false);
      }
      emit("ready", { graph: this.graphId, ...this.state() });
    } else {
      // the card was built on the previous pruning's objects: rebuild it on this one's
      const link = this.selectedLink ? this.model.link(...this.selectedLink) : null;
      if (this.selectedId) this._selected(this.model.byId.get(this.selectedId) || null, false);
      else if (link) this.selectLink(link.i, false);
      else if (this.selectedLink) this._selected(null, false);
      if (fromUser) emit("thresholds-changed", { graph: this.graphId, node_threshold: node, edge_threshold: edge });
    }
    this._renderSubgraph();
    clear(this.heads, headsList(this));
  }

  selectHead(layer, head) {
    this.canvas.select(null, { emit: false });
    this.selectedId = null;
    this.selectedLink = null;
    clear(this.card, headCard(this, layer, head));
    announce(`Head L${layer}.H${head}`);
    emit("head-selected", { graph: this.graphId, layer, head });
  }

  state() {
    return {
      node_threshold: this.thresholds.node,
      edge_threshold: this.thresholds.edge,
      selected: this.selectedId || null,
      pinnedIds: [...this.pinned],
      supernodes: this.supernodes,
      nodes: this.model ? this.model.nodes.length : 0,
      links: this.model ? this.model.links.length : 0,
    };
  }

  // ---------------------------------------------------------------- selection

  selectNode(id, fromUser = true) {
    const n = id && this.model ? this.model.byId.get(id) : null;
    this.canvas.select(n ? n.i : null, { emit: false });
    this._selected(n || null, fromUser);
  }

  selectLink(i, fromUser = true) {
    this.canvas.selectLink(i, { emit: false });
    this._linkSelected(this.model.links[i], fromUser);
  }

  _selected(node, fromUser) {
    this.selectedId = node ? node.node_id : null;
    this.selectedLink = null;
    setUrlState({ selected: this.selectedId, link: null });
    if (!node) {
      clear(this.card, el("p", { class: "muted hint" }, "Nothing selected."));
      if (fromUser) emit("node-selected", { graph: this.graphId, node_id: null, node: null });
      return;
    }
    clear(this.card, nodeCard(this, node));
    announce(`Selected ${this.model.label(node)}`);
    if (fromUser) {
      const { node_id, feature, layer, ctx_idx, feature_type, activation, influence, clerp } = node;
      emit("node-selected", { graph: this.graphId, node_id, node: { node_id, feature, layer, ctx_idx, feature_type, activation, influence, clerp } });
    }
  }

  _linkSelected(link, fromUser) {
    if (!link) return this._selected(null, fromUser);
    this.selectedId = null;
    this.selectedLink = [link.source, link.target];
    setUrlState({ selected: null, link: `${link.source}~${link.target}` });
    clear(this.card, linkCard(this, link));
    announce(`Selected link ${link.source} to ${link.target}, weight ${link.weight}`);
    if (fromUser) emit("link-selected", { graph: this.graphId, source: link.source, target: link.target, weight: link.weight });
  }

  // ---------------------------------------------------------------- pins and supernodes

  togglePin(id, fromUser = true) {
    if (this.pinned.has(id)) {
      this.pinned.delete(id);
      this.supernodes = this.supernodes.map((s) => s.filter((x, j) => j === 0 || x !== id)).filter((s) => s.length > 1);
    } else this.pinned.add(id);
    this._pinsChanged(fromUser);
    if (this.selectedId === id) this._selected(this.model.byId.get(id), false);
  }

  _pinsChanged(fromUser) {
    this._applyPins();
    this._applyOnly();
    this._renderSubgraph();
    setUrlState({ pinned: [...this.pinned] });
    if (fromUser) emit("pinned-changed", { graph: this.graphId, pinnedIds: [...this.pinned], supernodes: this.supernodes });
  }

  _applyPins() {
    this.canvas.pinned = this.pinned;
    this.canvas.groups = new Map();
    this.supernodes.forEach((s, g) => s.slice(1).forEach((id) => this.canvas.groups.set(id, g + 1)));
    this.canvas.groupLabels = this.supernodes.map((s) => s[0]);
    this.canvas.redraw();
  }

  _applyOnly() {
    this.canvas.only = this.onlyPinned && this.pinned.size ? new Set(this.pinned) : null;
    this.canvas.invalidate();
  }

  _renderSubgraph() {
    const m = this.model;
    const grouped = new Set(this.supernodes.flatMap((s) => s.slice(1)));
    const name = (id) => (m && m.byId.has(id) ? m.label(m.byId.get(id)) : `${id} (pruned away)`);
    const groupName = el("input", { type: "text", id: "supernode-name", placeholder: "supernode name", "aria-label": "supernode name", size: 14 });
    const saveName = el("input", { type: "text", id: "subgraph-name", placeholder: "subgraph name", "aria-label": "subgraph name", size: 14, list: "subgraph-names", value: this.subgraphName || "" });
    this.subgraphMsg = el("p", { class: "muted sg-msg", "aria-live": "polite" });
    clear(
      this.subgraph,
      el("h3", {}, `Subgraph · ${this.pinned.size} pinned`),
      this.pinned.size
        ? el(
            "ul",
            { class: "pins" },
            [...this.pinned].map((id) =>
              el(
                "li",
                { class: grouped.has(id) ? "grouped" : "", dataset: { node: id } },
                el("button", { type: "button", class: "linkish", onclick: () => this.selectNode(id) }, name(id)),
                el("button", { type: "button", class: "x", "aria-label": `unpin ${id}`, onclick: () => this.togglePin(id) }, "×"),
              ),
            ),
          )
        : el("p", { class: "muted" }, "Pin nodes from their cards (or press P on a focused node)."),
      el(
        "form",
        {
          class: "row",
          onsubmit: (e) => {
            e.preventDefault();
            this.group(groupName.value.trim());
          },
        },
        groupName,
        el("button", { type: "submit" }, "Group ungrouped pins"),
      ),
      this.supernodes.length
        ? el(
            "ul",
            { class: "supernodes" },
            this.supernodes.map((s, g) =>
              el(
                "li",
                { dataset: { label: s[0] } },
                el("span", { class: "swatch", style: { background: `hsl(${((g + 1) * 67) % 360} 70% 50%)` } }),
                `${s[0]} (${s.length - 1})`,
                el("button", { type: "button", class: "x", "aria-label": `ungroup ${s[0]}`, onclick: () => this.ungroup(g) }, "×"),
              ),
            ),
          )
        : null,
      el(
        "form",
        { class: "row", onsubmit: (e) => e.preventDefault() },
        saveName,
        el("button", { type: "button", id: "save-subgraph", onclick: () => this.saveSubgraph(saveName.value.trim()) }, "Save"),
        el("button", { type: "button", id: "load-subgraph", onclick: () => this.loadSubgraph(saveName.value.trim()) }, "Load"),
      ),
      el("datalist", { id: "subgraph-names" }, (this.subgraphNames || []).map((n) => el("option", { value: n }))),
      this.subgraphMsg,
    );
  }

  group(label) {
    const members = [...this.pinned].filter((id) => !this.supernodes.some((s) => s.includes(id)));
    if (!label || !members.length) {
      this._renderSubgraph();
      this.subgraphMsg.textContent = !label ? "Name the supernode first." : "Every pinned node is already grouped.";
      return;
    }
    this.supernodes.push([label, ...members]);
    this._pinsChanged(true);
  }

  ungroup(g) {
    this.supernodes.splice(g, 1);
    this._pinsChanged(true);
  }

  async saveSubgraph(name) {
    if (!name) return (this.subgraphMsg.textContent = "Name the subgraph first.");
    try {
      await put(paths.subgraph(this.graphId, name), { pinnedIds: [...this.pinned], supernodes: this.supernodes });
      this.subgraphName = name;
      this.subgraphNames = [...new Set([...(this.subgraphNames || []), name])];
      this._renderSubgraph();
      this.subgraphMsg.textContent = `Saved “${name}”.`;
    } catch (err) {
      this.subgraphMsg.replaceChildren(problemBox(err, "Save"));
    }
  }

  async loadSubgraph(name) {
    if (!name) return (this.subgraphMsg.textContent = "Name the subgraph to load.");
    try {
      const sg = await get(paths.subgraph(this.graphId, name));
      this.pinned = new Set(sg.pinnedIds || sg.pinned_ids || []);
      this.supernodes = (sg.supernodes || []).map((s) => [...s]);
      this.subgraphName = name;
      this._pinsChanged(true);
      this.subgraphMsg.textContent = `Loaded “${name}”.`;
    } catch (err) {
      this.subgraphMsg.replaceChildren(problemBox(err, "Load"));
    }
  }

  async _loadSubgraphNames() {
    try {
      const res = await get(paths.subgraphs(this.graphId));
      const list = Array.isArray(res) ? res : res.data || [];
      this.subgraphNames = list.map((s) => (typeof s === "string" ? s : s.name)).filter(Boolean);
      this._renderSubgraph();
    } catch {
      /* listing is optional: names are typed */
    }
  }

  // ---------------------------------------------------------------- embedding

  _commands() {
    onCommand("node-selected", (d) => this.model && this.selectNode(d.node_id || null, false));
    onCommand("thresholds-changed", (d) =>
      this.setThresholds({ node: d.node_threshold !== undefined ? clamp01(d.node_threshold, this.thresholds.node) : undefined, edge: d.edge_threshold !== undefined ? clamp01(d.edge_threshold, this.thresholds.edge) : undefined }, false),
    );
    onCommand("pinned-changed", (d) => {
      this.pinned = new Set(d.pinnedIds || []);
      if (d.supernodes) this.supernodes = d.supernodes.map((s) => [...s]);
      this._pinsChanged(false);
    });
    onCommand("get-state", () => emit("state", { graph: this.graphId, ...this.state() }));
  }

  _expose() {
    const page = this;
    window.__viewer = {
      page,
      get ready() {
        return !!page.model && !page.loading;
      },
      get loads() {
        return page.loads;
      },
      get thresholds() {
        return { ...page.thresholds };
      },
      get nodeCount() {
        return page.model ? page.model.nodes.length : 0;
      },
      get linkCount() {
        return page.model ? page.model.links.length : 0;
      },
      get drawn() {
        return { nodes: page.canvas.stats.drawnNodes, links: page.canvas.stats.drawnLinks };
      },
      get stats() {
        return page.canvas.stats;
      },
      state: () => page.state(),
      /** Where node `id` is drawn, in page (client) coordinates. */
      nodePoint(id) {
        const n = page.model.byId.get(id);
        const p = page.canvas.screenOf(n);
        const r = page.canvas.canvas.getBoundingClientRect();
        return { x: r.left + p.x, y: r.top + p.y };
      },
      /** A point on link source→target (fraction t along it) in client coordinates. */
      linkPoint(source, target, t = 0.5) {
        const a = this.nodePoint(source);
        const b = this.nodePoint(target);
        return { x: a.x + t * (b.x - a.x), y: a.y + t * (b.y - a.y) };
      },
      hitTest(x, y) {
        const r = page.canvas.canvas.getBoundingClientRect();
        return page.canvas.hitTest(x - r.left, y - r.top);
      },
    };
  }
}

export async function graphView(root) {
  const page = new GraphPage(root, params.id);
  await page.load();
  return page;
}
