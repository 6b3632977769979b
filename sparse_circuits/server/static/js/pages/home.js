// /: graphs (with a compare form), artifacts and recent jobs.

import { get, paths } from "../api.js";
import { clear, el, fmt, href, problemBox, when } from "../shell.js";

async function list(path) {
  try {
    return { items: (await get(path)).data || [] };
  } catch (err) {
    return { err };
  }
}

export async function homeView(root) {
  const [graphs, models, stores, transcoders, jobs] = await Promise.all([
    list("/v1/graphs"),
    list(paths.artifacts("models")),
    list(paths.artifacts("stores")),
    list(paths.artifacts("transcoders")),
    list(paths.jobs({ limit: 10 })),
  ]);
  const table = (res, cols, empty) =>
    res.err
      ? problemBox(res.err, "List")
      : res.items.length
        ? el("table", { class: "list" }, el("thead", {}, el("tr", {}, cols.map(([h]) => el("th", {}, h)))), el("tbody", {}, res.items.map((x) => el("tr", {}, cols.map(([, f]) => el("td", {}, f(x)))))))
        : el("p", { class: "muted" }, empty);
  const a = el("select", { id: "compare-a", "aria-label": "graph A" });
  const b = el("select", { id: "compare-b", "aria-label": "graph B" });
  for (const g of graphs.items || []) {
    const label = `${g.slug || g.id} · ${JSON.stringify(g.prompt || "")}`;
    a.append(el("option", { value: g.id }, label));
    b.append(el("option", { value: g.id }, label));
  }
  if (b.options.length > 1) b.selectedIndex = 1;
  const artifactCols = (plural) => [
    ["name", (x) => el("a", { href: href(`/${plural}/${encodeURIComponent(x.id)}`) }, x.name)],
    ["state", (x) => x.state],
    ["metrics", (x) => Object.entries(x.metrics || {}).filter(([, v]) => typeof v === "number").slice(0, 4).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ")],
    ["created", (x) => when(x.created_at)],
  ];
  clear(
    root,
    el("h1", {}, "sparse-circuits"),
    el("h2", { id: "graphs" }, "Attribution graphs"),
    table(
      graphs,
      [
        ["graph", (g) => el("a", { href: href(`/graphs/${encodeURIComponent(g.id)}`) }, g.slug || g.id)],
        ["prompt", (g) => el("code", {}, JSON.stringify(g.prompt || ""))],
        ["nodes", (g) => fmt(g.n_nodes)],
        ["edges", (g) => fmt(g.n_edges)],
        ["created", (g) => when(g.created_at)],
      ],
      "No graphs yet (POST /v1/graphs, or `sparse-circuits attribute`).",
    ),
    (graphs.items || []).length > 1
      ? el(
          "form",
          {
            class: "row",
            onsubmit: (e) => {
              e.preventDefault();
              window.location.href = href(`/compare?a=${encodeURIComponent(a.value)}&b=${encodeURIComponent(b.value)}`);
            },
          },
          "Compare ",
          a,
          " with ",
          b,
          " ",
          el("button", { type: "submit" }, "Compare"),
        )
      : null,
    el("h2", { id: "artifacts" }, "Models"),
    table(models, artifactCols("models"), "No models."),
    el("h2", {}, "Activation stores"),
    table(stores, artifactCols("stores"), "No stores."),
    el("h2", {}, "Transcoders"),
    table(transcoders, artifactCols("transcoders"), "No transcoders."),
    el("h2", {}, el("a", { href: href("/jobs") }, "Recent jobs")),
    table(
      jobs,
      [
        ["job", (j) => el("a", { href: href(`/jobs?job=${encodeURIComponent(j.id)}`), class: "mono" }, j.id.slice(0, 12))],
        ["kind", (j) => j.kind],
        ["state", (j) => el("span", { class: `state state-${j.state}` }, j.state)],
        ["created", (j) => when(j.created_at)],
      ],
      "No jobs.",
    ),
  );
  window.__viewer = { ready: true };
}
