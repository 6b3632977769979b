// /jobs: the queue with live progress (the API's event stream), cancel and retry (with the
// user's API key), a job's config, metrics, log tail and training curve.

import { ApiError, apiKey, get, paths, post } from "../api.js";
import { curvesFor } from "./artifact.js";
import { clear, el, emit, fmt, href, problemBox, setUrlState, urlState, when } from "../shell.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function jobsView(root) {
  const jobs = new Map();
  let current = urlState().get("job");
  const live = el("span", { class: "muted live", "aria-live": "polite" }, "connecting…");
  const stateSel = el(
    "select",
    { id: "state-filter", "aria-label": "state" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => el("option", { value: s }, s || "any state")),
  );
  const tbody = el("tbody");
  const detail = el("section", { class: "job-detail", "aria-label": "job" });
  const msg = el("div", { "aria-live": "polite" });
  clear(
    root,
    el("div", { class: "toolbar" }, el("h1", {}, "Jobs"), stateSel, live),
    msg,
    el(
      "div",
      { class: "split" },
      el(
        "table",
        { class: "list jobs" },
        el("thead", {}, el("tr", {}, ["job", "kind", "state", "progress", "created", "attempts", ""].map((h) => el("th", {}, h)))),
        tbody,
      ),
      detail,
    ),
  );

  const act = async (job, what) => {
    if (!apiKey()) {
      clear(msg, el("p", { class: "notice" }, `To ${what} a job, enter an API key at the top of the page.`));
      return;
    }
    try {
      const j = await post(`${paths.job(job.id)}/${what}`);
      upsert(j);
      clear(msg);
    } catch (err) {
      clear(msg, problemBox(err, `${what} ${job.id}`));
    }
  };

  const row = (j) => {
    const running = j.state === "running";
    const pct = j.total ? Math.min(100, (100 * (j.step || 0)) / j.total) : null;
    return el(
      "tr",
      { dataset: { job: j.id, state: j.state }, class: j.id === current ? "current" : "" },
      el("td", {}, el("button", { type: "button", class: "linkish mono", onclick: () => show(j.id) }, j.id.slice(0, 12))),
      el("td", { class: "nowrap" }, j.kind),
      el("td", {}, el("span", { class: `state state-${j.state}`, title: j.error || null }, j.state), j.cancel_requested && !TERMINAL.has(j.state) ? el("span", { class: "badge" }, "cancelling") : null),
      el(
        "td",
        {},
        pct !== null ? el("progress", { max: 100, value: pct.toFixed(1), "aria-label": `${j.kind} progress` }) : null,
        el("div", { class: "muted small" }, j.total ? `${fmt(j.step || 0)} / ${fmt(j.total)}${j.progress_desc ? ` ${j.progress_desc}` : ""}` : running ? "starting…" : ""),
      ),
      el("td", {}, when(j.created_at)),
      el("td", {}, `${j.attempts}/${j.max_attempts}`),
      el(
        "td",
        {},
        !TERMINAL.has(j.state) ? el("button", { type: "button", class: "cancel", disabled: j.cancel_requested, onclick: () => act(j, "cancel") }, "Cancel") : null,
        j.state === "failed" || j.state === "cancelled" ? el("button", { type: "button", class: "retry", onclick: () => act(j, "retry") }, "Retry") : null,
      ),
    );
  };

  const render = () => {
    const want = stateSel.value;
    const list = [...jobs.values()].filter((j) => !want || j.state === want).sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    clear(tbody, list.length ? list.map(row) : el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No jobs.")));
  };

  let lastCurves = null;
  const renderDetail = async (j, withCurves) => {
    const parts = [
      el("h2", {}, `${j.kind} `, el("span", { class: "mono" }, j.id)),
      el(
        "dl",
        { class: "facts" },
        [
          ["state", el("span", { class: `state state-${j.state}` }, j.state)],
          ["progress", j.total ? `${fmt(j.step || 0)} / ${fmt(j.total)}${j.progress_desc ? ` ${j.progress_desc}` : ""}` : "–"],
          ["attempts", `${j.attempts} of ${j.max_attempts}`],
          ["created", when(j.created_at)],
          ["started", when(j.started_at)],
          ["finished", when(j.finished_at)],
          ["worker", j.host ? `${j.host}${j.pid ? ` pid ${j.pid}` : ""}${j.backend ? ` (${j.backend})` : ""}` : "–"],
          ["result", j.result || "–"],
        ].map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]),
      ),
      j.error ? el("div", { class: "problem" }, j.error) : null,
      j.artifacts && j.artifacts.length
        ? el(
            "p",
            {},
            "artifacts: ",
            j.artifacts.map((a) => [el("a", { href: href(`/${a.kind === "store" ? "stores" : `${a.kind}s`}/${encodeURIComponent(a.id)}`) }, `${a.kind} ${a.name}`), " "]),
          )
        : null,
      j.metrics ? el("details", { open: true }, el("summary", {}, "latest metrics"), el("pre", { class: "log" }, JSON.stringify(j.metrics, null, 1))) : null,
      el("h4", {}, "log tail"),
      el("pre", { class: "log", "aria-label": "log tail" }, j.log_tail || "(empty)"),
      el("details", {}, el("summary", {}, "config"), el("pre", { class: "log" }, JSON.stringify(j.config, null, 1))),
    ];
    // the curve stays on screen between refetches
    if (!lastCurves || lastCurves.id !== j.id) lastCurves = { id: j.id, node: el("div", { class: "charts" }) };
    const curves = lastCurves.node;
    clear(detail, parts, curves);
    if (withCurves && ["sparsify", "train-clt", "train-toy", "pretrain"].includes(j.kind)) {
      try {
        const records = await get(`${paths.job(j.id)}/metrics-log`);
        clear(curves, curvesFor(records));
      } catch {
        /* no curve yet */
      }
    }
  };

  const show = async (id) => {
    current = id;
    setUrlState({ job: id });
    render();
    const j = jobs.get(id) || (await get(paths.job(id)).catch(() => null));
    if (j) renderDetail(j, true);
    emit("job-selected", { job: id });
  };

  let curvesAt = 0;
  const upsert = (j) => {
    jobs.set(j.id, j);
    render();
    if (j.id !== current) return;
    // a running job's curve is refetched at most every 5 s; a finished one's once more
    const now = Date.now();
    const curves = TERMINAL.has(j.state) || now - curvesAt > 5000;
    if (curves) curvesAt = now;
    renderDetail(j, curves);
  };

  stateSel.addEventListener("change", render);
  window.__viewer = { jobs, ready: false, events: 0 };
  try {
    const res = await get(paths.jobs({ limit: 200 }));
    for (const j of res.data) jobs.set(j.id, j);
  } catch (err) {
    clear(msg, problemBox(err, "Jobs"));
  }
  render();
  if (current) show(current);

  // Live: the event stream of every job's changes; polling if it cannot be opened.
  let poll = null;
  const startPolling = () => {
    if (poll) return;
    live.textContent = "polling every 3 s";
    poll = setInterval(async () => {
      try {
        const res = await get(paths.jobs({ limit: 200 }));
        for (const j of res.data) upsert(j);
      } catch (err) {
        if (err instanceof ApiError) live.textContent = `polling: ${err.message}`;
      }
    }, 3000);
  };
  if (window.EventSource) {
    const es = new EventSource("/v1/jobs/events");
    es.addEventListener("open", () => {
      live.textContent = "● live";
      if (poll) {
        clearInterval(poll);
        poll = null;
      }
    });
    es.addEventListener("job", (e) => {
      window.__viewer.events++;
      upsert(JSON.parse(e.data));
    });
    es.addEventListener("error", () => {
      if (es.readyState === EventSource.CLOSED) startPolling();
      else live.textContent = "reconnecting…";
    });
  } else startPolling();
  window.__viewer.ready = true;
}
