// What every view shares: DOM helpers, the page's parameters, view state in the URL, the
// postMessage bridge to an embedding page, the API key field, theme colours.

import { apiKey, setApiKey } from "./api.js";

export const params = JSON.parse(document.body.dataset.params || "{}");
export const embedded = document.body.classList.contains("embed");

/** el("div", {class: "x", onclick: f}, child, "text", ...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "style" && typeof v === "object")
      for (const [prop, value] of Object.entries(v)) {
        if (prop.startsWith("--")) node.style.setProperty(prop, value);
        else node.style[prop] = value;
      }
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function clear(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function announce(text) {
  const live = document.getElementById("announce");
  if (live) live.textContent = text;
}

export function problemBox(err, what) {
  const status = err && err.status ? ` (${err.status})` : "";
  return el("div", { class: "problem", role: "alert" }, `${what}${status}: ${err && err.message ? err.message : err}`);
}

// ---------------------------------------------------------------- URL state

export function urlState() {
  return new URLSearchParams(window.location.search);
}

/** Merge `changes` into the query string (null removes a key) without a navigation. */
export function setUrlState(changes) {
  const url = new URL(window.location.href);
  for (const [k, v] of Object.entries(changes)) {
    if (v === null || v === undefined || v === "" || (Array.isArray(v) && !v.length)) url.searchParams.delete(k);
    else url.searchParams.set(k, Array.isArray(v) ? v.join(",") : String(v));
  }
  window.history.replaceState(null, "", url);
}

/** A link to another view that keeps ?embed=true when we are embedded. */
export function href(path) {
  if (!embedded) return path;
  return path + (path.includes("?") ? "&" : "?") + "embed=true";
}

// ---------------------------------------------------------------- postMessage bridge

const SOURCE = "sparse-circuits";
const handlers = new Map();

/** Tell the embedding page (if any) that something happened: {source, type, ...detail}. */
export function emit(type, detail = {}) {
  const message = { source: SOURCE, type, view: document.body.dataset.view, ...detail };
  window.__viewerEvents = window.__viewerEvents || [];
  window.__viewerEvents.push(message);
  if (window.parent && window.parent !== window) window.parent.postMessage(message, "*");
}

/** Accept `type` as a command from the embedding page (the same shape as our events). */
export function onCommand(type, fn) {
  handlers.set(type, fn);
}

window.addEventListener("message", (event) => {
  if (event.source !== window.parent || window.parent === window) return;
  const data = event.data;
  if (!data || typeof data !== "object" || typeof data.type !== "string") return;
  const fn = handlers.get(data.type);
  if (fn) fn(data);
});

// ---------------------------------------------------------------- chrome

export function wireChrome() {
  // An embedding page may hand over its key for the writes a view makes (QK, subgraphs, jobs):
  // a frame's storage is partitioned from the viewer's own pages, so it has none otherwise.
  onCommand("api-key", (d) => setApiKey(typeof d.key === "string" ? d.key.trim() : ""));
  const input = document.getElementById("api-key");
  if (!input) return;
  input.value = apiKey();
  input.addEventListener("change", () => setApiKey(input.value.trim()));
  input.form?.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
  });
}

/** Theme colours from the stylesheet's custom properties (they follow prefers-color-scheme). */
export function themeColors() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return {
    bg: v("--bg"), fg: v("--fg"), muted: v("--muted"), grid: v("--grid"), pos: v("--pos"), neg: v("--neg"),
    feature: v("--node-feature"), error: v("--node-error"), embedding: v("--node-embedding"),
    logit: v("--node-logit"), accent: v("--accent"), pin: v("--pin"), panel: v("--panel"),
  };
}

export function onThemeChange(fn) {
  const mq = window.matchMedia("(prefers-color-scheme: dark)");
  mq.addEventListener("change", fn);
}
