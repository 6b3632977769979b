// Entry point: picks the view the server named in <body data-view>.

import { clear, el, problemBox, wireChrome } from "./shell.js";

const VIEWS = {
  home: () => import("./pages/home.js"),
  graph: () => import("./pages/graph.js"),
  compare: () => import("./pages/compare.js"),
  feature: () => import("./pages/feature.js"),
  artifact: () => import("./pages/artifact.js"),
  jobs: () => import("./pages/jobs.js"),
};

async function start() {
  wireChrome();
  const root = document.getElementById("app");
  const view = document.body.dataset.view;
  try {
    const mod = await VIEWS[view]();
    await mod[`${view}View`](root);
  } catch (err) {
    console.error(err);
    clear(root, el("h1", {}, "sparse-circuits"), problemBox(err, `The ${view} view failed`));
  }
}

start();
