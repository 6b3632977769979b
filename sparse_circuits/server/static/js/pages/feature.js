// /transcoders/{id}/features/{layer}/{index}: one feature's card, full size.

import { loadFeature } from "../cards.js";
import { clear, el, href, params } from "../shell.js";

export async function featureView(root) {
  const { transcoder, layer, index } = params;
  document.title = `Feature L${layer} #${index} · sparse-circuits`;
  const body = el("div", { class: "card-slot feature-body" });
  clear(
    root,
    el(
      "div",
      { class: "feature-page" },
      el("h1", {}, `Feature L${layer} #${index}`),
      el("p", {}, "of ", el("a", { href: href(`/transcoders/${encodeURIComponent(transcoder)}`) }, `transcoder ${transcoder}`)),
      body,
    ),
  );
  const f = await loadFeature(body, transcoder, layer, index);
  window.__viewer = { ready: true, feature: f };
}
