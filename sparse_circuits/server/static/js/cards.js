// Cards: a feature (top contexts, frequency, histogram, logits), a node of any kind, and a link
// between positions (head loadings, QK attribution, computing QK on demand).

import { get, paths, post } from "./api.js";
import { histogram } from "./charts.js";
import { el, clear, fmt, href, problemBox } from "./shell.js";

// ---------------------------------------------------------------- features

function contextRow(ctx, max) {
  const row = el("div", { class: "context", dataset: { doc: ctx.doc ?? "", pos: ctx.pos ?? "" } });
  const tokens = ctx.strings || ctx.tokens || [];
  tokens.forEach((tok, j) => {
    const v = ctx.values ? ctx.values[j] || 0 : 0;
    const a = max > 0 ? Math.max(0, v) / max : 0;
    row.append(
      el(
        "span",
        {
          class: `tok${j === (ctx.center ?? ctx.pos) ? " peak" : ""}${a > 0 ? " active" : ""}`,
          style: a > 0 ? { "--a": a.toFixed(3) } : null,
          title: v ? `${JSON.stringify(tok)}: ${fmt(v)}` : JSON.stringify(tok),
        },
        tok,
      ),
    );
  });
  return row;
}

function logitList(title, items) {
  if (!items || !items.length) return null;
  return el(
    "div",
    { class: "logits" },
    el("h4", {}, title),
    el("ul", {}, items.slice(0, 10).map((t) => el("li", {}, el("code", {}, JSON.stringify(t.token ?? t.string ?? t.token_id)), " ", fmt(t.value)))),
  );
}

export function renderFeature(target, f, { transcoderId } = {}) {
  const contexts = f.top_contexts || [];
  const max = Math.max(0, ...contexts.flatMap((c) => c.values || []));
  clear(
    target,
    el(
      "dl",
      { class: "facts" },
      el("dt", {}, "frequency"),
      el("dd", { class: "frequency" }, f.frequency === undefined ? "–" : `${fmt(100 * f.frequency, 3)} % of tokens`),
      f.max_activation !== undefined ? [el("dt", {}, "max activation"), el("dd", {}, fmt(f.max_activation))] : null,
    ),
    f.histogram ? histogram(f.histogram, { title: "activation histogram (log counts)" }) : null,
    el(
      "section",
      { class: "top-contexts", "aria-label": "top contexts" },
      el("h4", {}, `top contexts (${contexts.length})`),
      contexts.length ? contexts.map((c) => contextRow(c, max)) : el("p", { class: "muted" }, "none recorded"),
    ),
    el("div", { class: "logit-cols" }, logitList("top logits", f.top_logits), logitList("bottom logits", f.bottom_logits)),
    transcoderId
      ? el("p", {}, el("a", { href: href(`/transcoders/${encodeURIComponent(transcoderId)}/features/${f.layer}/${f.index}`) }, "feature page →"))
      : null,
  );
}

export async function loadFeature(target, transcoderId, layer, index) {
  clear(target, el("p", { class: "loading" }, "Loading feature…"));
  if (!transcoderId) {
    clear(target, el("p", { class: "muted" }, "This graph names no transcoder, so its features cannot be looked up."));
    return null;
  }
  try {
    const f = await get(paths.feature(transcoderId, layer, index));
    renderFeature(target, { layer, index, ...f }, { transcoderId });
    return f;
  } catch (err) {
    if (err.status === 409) {
      const job = err.problem.job;
      const note = el("p", { class: "notice" }, "Feature statistics have not been computed for this transcoder yet.");
      if (job && job.id) note.append(" They are being computed by ", el("a", { href: href(`/jobs?job=${encodeURIComponent(job.id)}`) }, `job ${job.id}`), ".");
      else if (job && job.kind) {
        // the API names the job that would compute them: submit it (needs an API key)
        const button = el("button", { type: "button", class: "run-stats" }, "Compute them");
        button.addEventListener("click", async () => {
          button.disabled = true;
          try {
            const made = await post("/v1/jobs", { kind: job.kind, config: job.config });
            button.replaceWith(el("span", {}, "Submitted: ", el("a", { href: href(`/jobs?job=${encodeURIComponent(made.id)}`) }, `job ${made.id}`)));
          } catch (e) {
            button.replaceWith(problemBox(e, "Submit"));
          }
        });
        note.append(" ", button);
      }
      clear(target, note);
    } else clear(target, problemBox(err, "Feature"));
    return null;
  }
}

// ---------------------------------------------------------------- nodes

function linkList(title, page, links, other) {
  const m = page.model;
  if (!links.length) return null;
  return el(
    "section",
    { class: "link-list" },
    el("h4", {}, `${title} (${links.length})`),
    el(
      "ol",
      {},
      links.slice(0, 12).map((i) => {
        const l = m.links[i];
        const n = m.nodes[other(l)];
        return el(
          "li",
          {},
          el(
            "button",
            { class: "linkish", type: "button", onclick: () => page.selectLink(l.i), dataset: { source: l.source, target: l.target } },
            el("span", { class: `w ${l.weight >= 0 ? "pos" : "neg"}` }, fmt(l.weight)),
            " ",
            m.label(n),
            l.cross ? el("span", { class: "badge", title: "carried by attention" }, "across positions") : null,
          ),
        );
      }),
    ),
  );
}

export function nodeCard(page, node) {
  const m = page.model;
  const pinned = page.pinned.has(node.node_id);
  const facts = [
    ["id", el("code", {}, node.node_id)],
    ["kind", node.kind],
    ["layer", node.layer],
    ["position", `${node.ctx_idx} ${JSON.stringify(m.token(node.ctx_idx))}`],
    node.activation !== undefined ? ["activation", fmt(node.activation)] : null,
    node.influence !== undefined ? ["influence rank", fmt(node.influence)] : null,
  ];
  const body = el("div", { class: "card-body" });
  if (node.kind === "error") {
    const size = node.activation ?? node.error_norm ?? node.size;
    const outSum = node.out.reduce((a, i) => a + Math.abs(m.links[i].weight), 0);
    // The graph JSON carries no error norm today; then its size is the attribution it sends on.
    if (size !== undefined) facts.push(["size (error norm)", el("span", { class: "error-size" }, fmt(size))]);
    facts.push([size !== undefined ? "Σ |out-link weight|" : "size (Σ |out-link weight|)", el("span", { class: size !== undefined ? "" : "error-size" }, fmt(outSum))]);
  }
  if (node.kind === "logit") {
    const p = node.token_prob ?? Number((/p=([0-9.eE+-]+)/.exec(node.clerp || "") || [])[1]);
    facts.push(["probability", el("span", { class: "probability" }, fmt(p))]);
    facts.push(["token id", node.feature]);
  }
  if (node.kind === "embedding") facts.push(["token", el("code", {}, JSON.stringify(m.token(node.ctx_idx)))]);
  const card = el(
    "article",
    { class: `card node-card kind-${node.kind}`, dataset: { node: node.node_id, kind: node.kind }, "aria-label": `node ${m.label(node)}` },
    el(
      "header",
      {},
      el("h3", {}, m.label(node)),
      el(
        "button",
        { type: "button", class: "pin", "aria-pressed": pinned ? "true" : "false", onclick: () => page.togglePin(node.node_id) },
        pinned ? "Unpin" : "Pin",
      ),
    ),
    el("dl", { class: "facts" }, facts.filter(Boolean).map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    body,
    linkList("inputs", page, node.in, (l) => l.s),
    linkList("outputs", page, node.out, (l) => l.t),
  );
  if (node.kind === "feature" && node.address) {
    loadFeature(body, page.transcoderId, node.address.layer, node.address.index);
  }
  return card;
}

// ---------------------------------------------------------------- links

function bars(loadings, weight, page) {
  const max = Math.max(1e-12, ...loadings.map(([, , v]) => Math.abs(v)));
  const sum = loadings.reduce((a, [, , v]) => a + v, 0);
  return el(
    "section",
    { class: "head-loadings", "aria-label": "head loadings", dataset: { sum: String(sum), weight: String(weight) } },
    el("h4", {}, "head loadings"),
    el("p", { class: "muted" }, "How much of this link each attention head carries (the last hop into the target's position)."),
    el(
      "ol",
      { class: "bars" },
      loadings.map(([layer, head, v]) =>
        el(
          "li",
          { class: "bar-row", dataset: { layer, head, value: String(v) } },
          page && page.selectHead
            ? el("button", { type: "button", class: "linkish bar-label", title: "this head's card", onclick: () => page.selectHead(layer, head) }, `L${layer}.H${head}`)
            : el("span", { class: "bar-label" }, `L${layer}.H${head}`),
          el("span", { class: "bar-track" }, el("span", { class: `bar ${v >= 0 ? "pos" : "neg"}`, style: { width: `${(100 * Math.abs(v)) / max}%` } })),
          el("span", { class: "bar-value" }, fmt(v, 4)),
        ),
      ),
    ),
    el("p", { class: "sum" }, `Σ loadings = ${fmt(sum, 4)} · link weight ${fmt(weight, 4)}`),
  );
}

function qkView(page, qk) {
  const m = page.model;
  const name = (id) => (id === "bias" ? "bias" : m.byId.has(id) ? m.label(m.byId.get(id)) : id);
  const terms = qk.terms || [];
  const max = Math.max(1e-12, ...terms.map((t) => Math.abs(t[2])));
  const marg = (title, list) =>
    list && list.length
      ? el(
          "div",
          { class: "qk-marg" },
          el("h5", {}, title),
          el(
            "ol",
            { class: "bars" },
            list.slice(0, 8).map(([id, v]) =>
              el(
                "li",
                { class: "bar-row" },
                el("span", { class: "bar-label wide", title: id }, name(id)),
                el("span", { class: "bar-track" }, el("span", { class: `bar ${v >= 0 ? "pos" : "neg"}`, style: { width: `${(100 * Math.abs(v)) / Math.max(1e-12, Math.abs(list[0][1]))}%` } })),
                el("span", { class: "bar-value" }, fmt(v)),
              ),
            ),
          ),
        )
      : null;
  return el(
    "section",
    { class: "qk", dataset: { layer: qk.layer, head: qk.head, query: qk.query_pos, key: qk.key_pos } },
    el("h4", {}, `QK attribution · L${qk.layer}.H${qk.head} · query ${qk.query_pos} ← key ${qk.key_pos}`),
    el(
      "p",
      { class: "muted" },
      `score ${fmt(qk.score)} · pattern ${fmt(qk.pattern)}`,
      qk.gate_logit !== null && qk.gate_logit !== undefined ? ` · gate logit ${fmt(qk.gate_logit)} (${qk.gate_logit > 0 ? "open" : "closed"})` : "",
    ),
    el("div", { class: "qk-margs" }, marg("query side", qk.query_nodes), marg("key side", qk.key_nodes)),
    el(
      "table",
      { class: "qk-terms" },
      el("thead", {}, el("tr", {}, el("th", {}, "query node"), el("th", {}, "key node"), el("th", {}, "term"))),
      el(
        "tbody",
        {},
        terms.slice(0, 10).map(([q, k, v]) =>
          el(
            "tr",
            {},
            el("td", {}, name(q)),
            el("td", {}, name(k)),
            el("td", { class: v >= 0 ? "pos" : "neg", style: { "--a": (Math.abs(v) / max).toFixed(2) } }, fmt(v)),
          ),
        ),
        qk.other !== undefined ? el("tr", {}, el("td", { colspan: 2 }, "all other pairs"), el("td", {}, fmt(qk.other))) : null,
      ),
    ),
  );
}

export function qkFor(page, layer, head, query, key) {
  const all = [...((page.model.doc.attention && page.model.doc.attention.qk) || []), ...page.qkExtra];
  return all.find((q) => q.layer === layer && q.head === head && q.query_pos === query && q.key_pos === key) || null;
}

export function linkCard(page, link) {
  const m = page.model;
  const s = m.nodes[link.s];
  const t = m.nodes[link.t];
  const body = el("div", { class: "card-body" });
  const card = el(
    "article",
    { class: "card link-card", dataset: { source: link.source, target: link.target, weight: String(link.weight) }, "aria-label": "link" },
    el("header", {}, el("h3", {}, "Link")),
    el(
      "dl",
      { class: "facts" },
      el("dt", {}, "from"),
      el("dd", {}, el("button", { type: "button", class: "linkish", onclick: () => page.selectNode(s.node_id) }, m.label(s))),
      el("dt", {}, "to"),
      el("dd", {}, el("button", { type: "button", class: "linkish", onclick: () => page.selectNode(t.node_id) }, m.label(t))),
      el("dt", {}, "weight"),
      el("dd", { class: `link-weight ${link.weight >= 0 ? "pos" : "neg"}` }, fmt(link.weight, 4)),
      el("dt", {}, "positions"),
      el("dd", {}, link.cross ? `${s.ctx_idx} → ${t.ctx_idx} (carried by attention)` : `${s.ctx_idx} (same position)`),
    ),
    body,
  );
  if (link.cross) fillAttention(page, link, body);
  else body.append(el("p", { class: "muted" }, "Within one position: no attention head carries this link."));
  return card;
}

async function fillAttention(page, link, body) {
  const m = page.model;
  const query = m.nodes[link.t].ctx_idx;
  const key = m.nodes[link.s].ctx_idx;
  let loadings = link.head_loadings;
  if (!loadings) {
    clear(body, el("p", { class: "loading" }, "Loading head loadings…"));
    try {
      const res = await get(paths.linkAttention(page.graphId, link.source, link.target));
      loadings = res.loadings || [];
    } catch (err) {
      clear(body, problemBox(err, "Head loadings"));
      return;
    }
  }
  const qkBox = el("div", { class: "qk-box" });
  clear(body, bars(loadings, link.weight, page), qkBox);
  const draw = () => {
    const shown = [];
    const buttons = [];
    for (const [layer, head] of loadings.slice(0, 4)) {
      const qk = qkFor(page, layer, head, query, key);
      if (qk) shown.push(qkView(page, qk));
      else
        buttons.push(
          el(
            "button",
            {
              type: "button",
              class: "compute-qk",
              dataset: { layer, head },
              onclick: async (e) => {
                const btn = e.currentTarget;
                btn.disabled = true;
                btn.textContent = "Computing…";
                try {
                  const res = await post(paths.qk(page.graphId), { layer, head, query, key });
                  page.qkExtra.push(res.qk || res);
                  draw();
                } catch (err) {
                  btn.replaceWith(problemBox(err, `QK L${layer}.H${head}`));
                }
              },
            },
            `Compute QK for L${layer}.H${head}`,
          ),
        );
    }
    clear(
      qkBox,
      shown,
      buttons.length
        ? el("div", { class: "qk-actions" }, el("p", { class: "muted" }, "Which query-side and key-side nodes opened the gate (needs an API key):"), buttons)
        : null,
    );
  };
  draw();
}

// ---------------------------------------------------------------- heads

/** The links of this pruning that head (layer, head) carries a part of, from the JSON itself. */
function headLinksFromJson(page, layer, head) {
  const out = [];
  for (const l of page.model.links)
    for (const [j, h, v] of l.head_loadings || []) if (j === layer && h === head) out.push({ source: l.source, target: l.target, weight: l.weight, loading: v });
  return out.sort((a, b) => Math.abs(b.loading) - Math.abs(a.loading));
}

export function headCard(page, layer, head) {
  const body = el("div", { class: "card-body" }, el("p", { class: "loading" }, "Loading…"));
  const card = el(
    "article",
    { class: "card head-card", dataset: { layer, head }, "aria-label": `head L${layer}.H${head}` },
    el("header", {}, el("h3", {}, `Attention head L${layer}.H${head}`)),
    body,
  );
  const show = (info, links) => {
    if (page.canvas) {
      const marked = new Set();
      for (const l of links) {
        const link = page.model.link(l.source, l.target);
        if (link) marked.add(link.i);
      }
      page.canvas.mark(marked);
    }
    const max = Math.max(1e-12, ...links.map((l) => Math.abs(l.loading)));
    clear(
      body,
      info
        ? el(
            "dl",
            { class: "facts" },
            el("dt", {}, "share"),
            el("dd", { class: "head-share" }, `${fmt(100 * info.share, 1)} % of the attention-mediated attribution`),
            el("dt", {}, "rank"),
            el("dd", {}, `${info.rank} of ${info.total_heads} (${info.heads_for_coverage} heads hold ${fmt(100 * info.coverage, 0)} %)`),
            el("dt", {}, "links"),
            el("dd", {}, `${fmt(info.n_links)} cross-position links carry a part${info.links_without_loadings ? ` (${info.links_without_loadings} links have no stored loadings)` : ""}`),
          )
        : el("p", { class: "muted" }, "From this pruning's head loadings:"),
      el("h4", {}, "links it carries most"),
      links.length ? null : el("p", { class: "muted" }, "No link of this pruning goes through it."),
      el(
        "ol",
        { class: "bars" },
        links.slice(0, 15).map((l) => {
          const link = page.model.link(l.source, l.target);
          const s = page.model.byId.get(l.source);
          const t = page.model.byId.get(l.target);
          const label = s && t ? `${page.model.shortLabel(s)} → ${page.model.shortLabel(t)}` : `${l.source} → ${l.target}`;
          return el(
            "li",
            { class: "bar-row wide" },
            link ? el("button", { type: "button", class: "linkish bar-label", title: label, onclick: () => page.selectLink(link.i) }, label) : el("span", { class: "bar-label", title: label }, label),
            el("span", { class: "bar-track" }, el("span", { class: `bar ${l.loading >= 0 ? "pos" : "neg"}`, style: { width: `${(100 * Math.abs(l.loading)) / max}%` } })),
            el("span", { class: "bar-value" }, fmt(l.loading)),
          );
        }),
      ),
    );
  };
  get(paths.head(page.graphId, layer, head, page.thresholds?.node, page.thresholds?.edge))
    .then((info) => show(info, info.top_links || []))
    .catch(() => show(null, headLinksFromJson(page, layer, head)));
  return card;
}

/** The heads holding the pruning's attention-mediated attribution, largest share first. */
export function headsList(page) {
  const att = page.model && page.model.doc.attention;
  const heads = (att && att.summary && att.summary.heads) || [];
  if (!heads.length) return null;
  const max = Math.max(1e-12, ...heads.map((h) => h.share));
  const n80 = att.summary.n_heads;
  return el(
    "section",
    { class: "heads", "aria-label": "attention heads" },
    el("h3", {}, `Attention heads · ${n80 ?? "?"} of ${att.summary.total_heads ?? heads.length} hold ${fmt(100 * (att.summary.coverage ?? 0.8), 0)} %`),
    el(
      "ol",
      { class: "bars" },
      heads.slice(0, 12).map((h, i) =>
        el(
          "li",
          { class: `bar-row${n80 !== undefined && i < n80 ? " core" : ""}` },
          el("button", { type: "button", class: "linkish bar-label", onclick: () => page.selectHead(h.layer, h.head) }, `L${h.layer}.H${h.head}`),
          el("span", { class: "bar-track" }, el("span", { class: "bar pos", style: { width: `${(100 * h.share) / max}%` } })),
          el("span", { class: "bar-value" }, `${fmt(100 * h.share, 1)} %`),
        ),
      ),
    ),
  );
}
