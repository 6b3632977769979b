// The /v1 API as the viewer uses it: JSON in and out, problem details as errors, the user's
// API key (kept in localStorage, never in the URL) sent on writes.

const KEY_STORE = "sparse-circuits.apiKey";

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

let memoryKey = ""; // where storage is refused (a third-party frame), the key lives in the page

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORE) || memoryKey;
  } catch {
    return memoryKey;
  }
}

export function setApiKey(value) {
  memoryKey = value || "";
  try {
    if (value) localStorage.setItem(KEY_STORE, value);
    else localStorage.removeItem(KEY_STORE);
  } catch {
    /* storage refused: memoryKey serves this page */
  }
}

export async function request(method, path, body, { signal } = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  const type = res.headers.get("content-type") || "";
  const data = type.includes("json") ? await res.json().catch(() => null) : null;
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export const get = (path, opts) => request("GET", path, undefined, opts);
export const post = (path, body, opts) => request("POST", path, body ?? {}, opts);
export const put = (path, body, opts) => request("PUT", path, body, opts);

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

const enc = encodeURIComponent;
export const paths = {
  graph: (id) => `/v1/graphs/${enc(id)}`,
  graphJson: (id, nodeThreshold, edgeThreshold) =>
    `/v1/graphs/${enc(id)}/json${query({ node_threshold: nodeThreshold, edge_threshold: edgeThreshold })}`,
  linkAttention: (id, source, target) => `/v1/graphs/${enc(id)}/links/attention${query({ source, target })}`,
  qk: (id) => `/v1/graphs/${enc(id)}/qk`,
  head: (id, layer, head, nodeThreshold, edgeThreshold) =>
    `/v1/graphs/${enc(id)}/heads/${layer}/${head}${query({ node_threshold: nodeThreshold, edge_threshold: edgeThreshold })}`,
  subgraph: (id, name) => `/v1/graphs/${enc(id)}/subgraphs/${enc(name)}`,
  subgraphs: (id) => `/v1/graphs/${enc(id)}/subgraphs`,
  feature: (tid, layer, index) => `/v1/features/${enc(tid)}/${layer}/${index}`,
  artifact: (kind, id) => `/v1/${kind}/${enc(id)}`,
  artifacts: (kind) => `/v1/${kind}`,
  metricsLog: (kind, id) => `/v1/${kind}/${enc(id)}/metrics-log`,
  jobs: (params = {}) => `/v1/jobs${query(params)}`,
  job: (id) => `/v1/jobs/${enc(id)}`,
};
