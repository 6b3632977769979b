// A graph JSON v1 document (metadata, qParams, nodes, links; our attention extras) turned into
// what the views need: node kinds and rows, adjacency, circuit-size figures.

export const KIND = {
  "cross layer transcoder": "feature",
  "mlp reconstruction error": "error",
  embedding: "embedding",
  logit: "logit",
};

export function nodeKind(node) {
  return KIND[node.feature_type] || (node.layer === "E" ? "embedding" : "feature");
}

/** Feature nodes: [layer, index, pos] from the id `{layer}_{index}_{pos}`. */
export function featureAddress(node) {
  const parts = String(node.node_id).split("_").map(Number);
  return parts.length === 3 ? { layer: parts[0], index: parts[1], pos: parts[2] } : null;
}

export class GraphModel {
  constructor(doc) {
    this.doc = doc;
    const meta = doc.metadata || {};
    this.tokens = meta.prompt_tokens || [];
    this.nodes = doc.nodes.map((n, i) => ({ ...n, i, kind: nodeKind(n), in: [], out: [] }));
    this.byId = new Map(this.nodes.map((n) => [n.node_id, n]));
    let maxLayer = -1;
    let logitLayer = -1;
    let maxPos = this.tokens.length - 1;
    for (const n of this.nodes) {
      const l = Number(n.layer);
      if (n.kind === "logit") logitLayer = Math.max(logitLayer, l);
      else if (n.layer !== "E" && Number.isFinite(l)) maxLayer = Math.max(maxLayer, l);
      maxPos = Math.max(maxPos, n.ctx_idx);
    }
    // Logit nodes carry layer n_layers + 1; rows: E, 0 .. n_layers - 1, logits.
    this.nLayers = logitLayer > 0 ? logitLayer - 1 : maxLayer + 1;
    this.nRows = this.nLayers + 2;
    this.nPos = maxPos + 1;
    for (const n of this.nodes) {
      n.row = n.kind === "embedding" ? 0 : n.kind === "logit" ? this.nRows - 1 : Number(n.layer) + 1;
      if (n.kind === "feature") n.address = featureAddress(n);
    }
    this.links = [];
    let maxAbs = 0;
    for (const l of doc.links) {
      const s = this.byId.get(l.source);
      const t = this.byId.get(l.target);
      if (!s || !t) continue;
      const link = { ...l, s: s.i, t: t.i, i: this.links.length, cross: s.ctx_idx !== t.ctx_idx };
      this.links.push(link);
      s.out.push(link.i);
      t.in.push(link.i);
      maxAbs = Math.max(maxAbs, Math.abs(l.weight));
    }
    this.maxAbsWeight = maxAbs || 1;
    const byAbs = (a, b) => Math.abs(this.links[b].weight) - Math.abs(this.links[a].weight);
    for (const n of this.nodes) {
      n.in.sort(byAbs);
      n.out.sort(byAbs);
    }
  }

  link(source, target) {
    const s = this.byId.get(source);
    if (!s) return null;
    for (const i of s.out) if (this.nodes[this.links[i].t].node_id === target) return this.links[i];
    return null;
  }

  token(pos) {
    return this.tokens[pos] ?? `#${pos}`;
  }

  label(node) {
    const at = `@${node.ctx_idx} "${this.token(node.ctx_idx)}"`;
    if (node.kind === "feature") {
      const a = node.address;
      return node.clerp || (a ? `L${a.layer} #${a.index} ${at}` : node.node_id);
    }
    if (node.kind === "error") return `error L${node.layer} ${at}`;
    if (node.kind === "embedding") return `embedding ${at}`;
    return node.clerp || `logit ${node.feature}`;
  }

  /** A few characters: L0#3@6, err L1@6, "5"@1, logit "1". */
  shortLabel(node) {
    if (node.kind === "feature" && node.address) return `L${node.address.layer}#${node.address.index}@${node.ctx_idx}`;
    if (node.kind === "error") return `err L${node.layer}@${node.ctx_idx}`;
    if (node.kind === "embedding") return `${JSON.stringify(this.token(node.ctx_idx))}@${node.ctx_idx}`;
    const m = /Output "(.*)" \(p=/.exec(node.clerp || "");
    return `logit ${m ? JSON.stringify(m[1]) : node.feature}`;
  }

  /** Edges, cross-position edges and heads needed for `coverage` of the pruned graph. */
  circuitSize(coverage = 0.8) {
    const all = this.links.map((l) => Math.abs(l.weight));
    const cross = this.links.filter((l) => l.cross).map((l) => Math.abs(l.weight));
    const att = this.doc.attention;
    let heads = null;
    let totalHeads = null;
    let headsFrom = "links";
    if (att && att.summary && att.summary.heads && att.summary.heads.length) {
      heads = countForCoverage(att.summary.heads.map((h) => h.share), coverage);
      totalHeads = att.summary.total_heads;
      headsFrom = "attention.summary";
    } else {
      const perHead = new Map();
      for (const l of this.links)
        for (const [layer, head, w] of l.head_loadings || [])
          perHead.set(`${layer}.${head}`, (perHead.get(`${layer}.${head}`) || 0) + Math.abs(w));
      if (perHead.size) heads = countForCoverage([...perHead.values()], coverage);
    }
    return {
      nodes: this.nodes.length,
      links: this.links.length,
      edges: countForCoverage(all, coverage),
      crossEdges: countForCoverage(cross, coverage),
      crossLinks: cross.length,
      heads,
      totalHeads,
      headsFrom,
    };
  }
}

/** The fewest values (largest first) whose sum holds `coverage` of the total. */
export function countForCoverage(values, coverage) {
  const v = values.map(Math.abs).sort((a, b) => b - a);
  const total = v.reduce((a, b) => a + b, 0);
  if (!total) return 0;
  let acc = 0;
  for (let k = 0; k < v.length; k++) {
    acc += v[k];
    if (acc >= coverage * total - 1e-12) return k + 1;
  }
  return v.length;
}
