"""Compact graph storage: a graph with its attention attribution in one directory, and the graph
JSON v1 of any pruning built from it on request.

A graph JSON holds one pruning; a service wants every pruning a viewer asks for, of a graph that
may have ~10M edges (512 tokens). So the whole graph is kept, in binary, written whole or not at
all (`atomic_dir`):

    <dir>/graph.safetensors     the Graph's tensors: tokens, features [Nf,3], activations, and
                                the COO edges (targets, sources int32; weights float32)
    <dir>/loadings.safetensors  head loadings, sparse: `edges` [P] (graph edge indices), then
                                one entry per nonzero loading: `row` (into edges), `head`
                                (layer * n_heads + head), `value`
    <dir>/store.json            the Graph's other fields, what the attention attribution needs
                                (gate offset, coverage, QK order), the full graph's scores
    <dir>/meta.json             what a registry shows: slug, prompt, counts, thresholds
    <dir>/metrics.json          scores of the full graph and of the pruning it was made with
    <dir>/run.json              the `attribute` config that made it (lineage), when given
Added later, one atomically written file each:
    <dir>/qk/{layer}_{head}_{query}_{key}.safetensors   a QK attribution (terms + node ids)
    <dir>/subgraphs/{name}.json                         a viewer's saved subgraph

Which cross-position edges have head loadings. Loadings cost a backward pass per (target
node, layer, head), so they are not computed for every edge of the full graph. They are
computed for every cross-position edge between the nodes that pass a node threshold t_env
(`loadings_node_threshold`, before any edge pruning): the "loading envelope". The pruning at
any node_threshold ≤ t_env and any edge_threshold keeps a subset of those edges (a node set
only grows with the node threshold, and pruning keeps edges between kept nodes only), so
every cross-position link of such a pruning gets its loadings. A pruning above t_env may keep
links without stored loadings: they get none, and the document's attention summary says how
many (`links_without_loadings`) and up to which node threshold loadings exist.

The default t_env is 0.8, the default node threshold: the envelope grows fast with it. On a
9.6M-edge graph (benchmarks/bench_graph_store.py) the pruning at 0.8/0.98 has 8,740
cross-position links (loadings 2.1 s), the envelope at 0.8 has 37,082 edges (9.8 s), at 0.85
195,317 (35 s), at 0.9 490,869 (58 s), against ~14-30 s for the graph itself (2 loaded cores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..io import atomic_dir, atomic_path, load_tensors, read_json, save_tensors, write_json
from .attention import (
    AttentionAttribution,
    HeadLoadings,
    QKAttribution,
    attention_attribution,
    head_summary,
)
from .attention import select_loadings as _select_dense
from .graph import Graph
from .graph_json import graph_json
from .inputs import LogitTarget
from .prune import GraphScores, PruneResult, find_threshold, graph_scores, prune

log = logging.getLogger(__name__)

FORMAT = "sparse-circuits-graph"
FORMAT_VERSION = 1
GRAPH_FILE = "graph.safetensors"
LOADINGS_FILE = "loadings.safetensors"
STORE_FILE = "store.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
QK_DIR = "qk"
SUBGRAPH_DIR = "subgraphs"
# Default node threshold up to which every pruning's cross-position links have head loadings.
LOADINGS_NODE_THRESHOLD = 0.8
EDGE_FIELDS = ("edge_targets", "edge_sources")  # stored as int32 (node indices < 2**31)
SUBGRAPH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GraphStoreError(ValueError):
    """A directory that is no graph store, or a store of another format version."""


# ----------------------------------------------------------------------------- the loading envelope


def loading_envelope(
    graph: Graph, node_influence: torch.Tensor, node_threshold: float
) -> torch.Tensor:
    """Indices of the cross-position edges between nodes passing `node_threshold` (embeddings and
    logits always), before edge pruning: a superset of the cross-position links of the pruning
    at every node threshold up to it. `node_influence`: a PruneResult's (any thresholds)."""
    keep = node_influence >= find_threshold(node_influence, node_threshold)  # as prune() does
    keep[graph.embed_offset :] = True
    tgt, src = graph.edge_targets, graph.edge_sources
    pos = graph.node_positions()
    return (keep[tgt] & keep[src] & (pos[src] < pos[tgt])).nonzero().squeeze(1)


def cross_links(graph: Graph, pruned: PruneResult) -> torch.Tensor:
    """Indices of the pruned graph's cross-position edges (source before target), ascending."""
    pos = graph.node_positions()
    kept = pruned.edge_mask.nonzero().squeeze(1)  # few: compare positions on these alone
    return kept[pos[graph.edge_sources[kept]] < pos[graph.edge_targets[kept]]]


def for_pruning(
    attention: AttentionAttribution, graph: Graph, pruned: PruneResult
) -> AttentionAttribution:
    """`attention` (loadings of a superset of edges, summary and QK of `pruned`) with loadings of
    the pruned graph's cross-position links alone, as a graph JSON of that pruning wants."""
    return attention._replace(
        loadings=_select_dense(attention.loadings, cross_links(graph, pruned))
    )


# ----------------------------------------------------------------------------- sparse loadings


@dataclasses.dataclass
class StoredLoadings:
    """Head loadings of the envelope's edges, sparse: one entry per nonzero (edge, head)."""

    edges: torch.Tensor  # P  graph edge indices, ascending
    row: torch.Tensor  # nnz  into edges
    head: torch.Tensor  # nnz  layer * n_heads + head
    value: torch.Tensor  # nnz
    n_layers: int
    n_heads: int
    node_threshold: float  # the envelope's

    @classmethod
    def from_dense(cls, loadings: HeadLoadings, node_threshold: float) -> StoredLoadings:
        P, L, H = loadings.loadings.shape
        order = loadings.edges.argsort()
        dense = loadings.loadings[order].reshape(P, L * H)
        row, head = dense.nonzero(as_tuple=True)
        return cls(loadings.edges[order].long(), row.int(), head.int(), dense[row, head].float(),
                   L, H, node_threshold)  # fmt: skip

    def select(self, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loadings [n, L, H] of `edges`, whether each has stored loadings [n]); zeros where not."""
        L, H = self.n_layers, self.n_heads
        at = torch.searchsorted(self.edges, edges)
        found = at < self.edges.numel()
        found[found.clone()] = self.edges[at[found]] == edges[found]
        slot = torch.full((self.edges.numel(),), -1, dtype=torch.long)
        slot[at[found]] = found.nonzero().squeeze(1)
        out = torch.zeros(edges.numel(), L * H)
        hit = slot[self.row.long()]
        keep = hit >= 0
        out[hit[keep], self.head[keep].long()] = self.value[keep]
        return out.view(-1, L, H), found


# ----------------------------------------------------------------------------- QK attributions


def qk_name(layer: int, head: int, query_pos: int, key_pos: int) -> str:
    return f"{layer}_{head}_{query_pos}_{key_pos}.safetensors"


def save_qk(directory: str | os.PathLike, qk: QKAttribution) -> Path:
    """One QK attribution as `qk/{layer}_{head}_{query}_{key}.safetensors` (atomic)."""
    path = Path(directory) / QK_DIR / qk_name(qk.layer, qk.head, qk.query_pos, qk.key_pos)
    meta = {"layer": qk.layer, "head": qk.head, "query_pos": qk.query_pos, "key_pos": qk.key_pos,
            "score": qk.score, "pattern": qk.pattern, "query_nodes": qk.query_nodes,
            "key_nodes": qk.key_nodes}  # fmt: skip
    save_tensors(path, {"terms": qk.terms.float()}, metadata={"qk": json.dumps(meta)})
    return path


def load_qk(path: str | os.PathLike) -> QKAttribution:
    from safetensors import safe_open  # noqa: PLC0415  (for the metadata)

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["qk"])
        terms = f.get_tensor("terms")
    return QKAttribution(
        meta["layer"], meta["head"], meta["query_pos"], meta["key_pos"], meta["score"],
        meta["pattern"], meta["query_nodes"], meta["key_nodes"], terms,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the stored graph


@dataclasses.dataclass
class StoredGraph:
    path: Path
    graph: Graph
    loadings: StoredLoadings | None  # None: stored without attention attribution
    store: dict[str, Any]  # store.json
    meta: dict[str, Any]  # meta.json
    scores_full: GraphScores
    _ids: dict[str, int] | None = None

    @property
    def n_heads(self) -> int | None:
        return self.store.get("n_heads")

    @property
    def gate_offset(self) -> float | None:
        return self.store["attention"].get("gate_offset") if self.store.get("attention") else None

    def node_index(self, node_id: str) -> int | None:
        """The node with graph JSON id `node_id`, or None."""
        if self._ids is None:
            self._ids = {self.graph.node_id(n): n for n in range(self.graph.n_nodes)}
        return self._ids.get(node_id)

    def edge_index(self, source: int, target: int) -> int | None:
        """The edge target <- source, or None (edges are sorted by target, then source)."""
        g = self.graph
        lo = int(
            torch.searchsorted(g.edge_targets, torch.tensor(target, dtype=g.edge_targets.dtype))
        )
        hi = int(
            torch.searchsorted(
                g.edge_targets, torch.tensor(target, dtype=g.edge_targets.dtype), right=True
            )
        )
        srcs = g.edge_sources[lo:hi]
        at = int(torch.searchsorted(srcs, torch.tensor(source, dtype=srcs.dtype)))
        return lo + at if at < srcs.numel() and int(srcs[at]) == source else None

    def qk_paths(self) -> list[Path]:
        """QK attribution files: those made with the graph first (in their order), then the rest
        by name."""
        folder = self.path / QK_DIR
        made = [folder / qk_name(*hop) for hop in self.store.get("attention", {}).get("qk", [])]
        later = (
            sorted(p for p in folder.glob("*.safetensors") if p not in set(made))
            if folder.is_dir()
            else []
        )
        return [p for p in made if p.is_file()] + later

    def qk(self) -> list[QKAttribution]:
        return [load_qk(p) for p in self.qk_paths()]

    def has_qk(self, layer: int, head: int, query_pos: int, key_pos: int) -> Path | None:
        path = self.path / QK_DIR / qk_name(layer, head, query_pos, key_pos)
        return path if path.is_file() else None


def _graph_fields(graph: Graph) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The graph's tensors and its other fields (as JSON), whatever fields Graph has."""
    tensors, fields = {}, {}
    for f in dataclasses.fields(graph):
        value = getattr(graph, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value.int() if f.name in EDGE_FIELDS else value
        elif f.name == "logit_targets":
            fields[f.name] = [list(t) for t in value]
        else:
            fields[f.name] = value
    return tensors, fields


def save_graph(
    path: str | os.PathLike,
    graph: Graph,
    attention: AttentionAttribution | None,
    *,
    pruned: PruneResult,
    slug: str,
    scan: str,
    node_threshold: float,
    edge_threshold: float,
    loadings_node_threshold: float,
    n_heads: int | None = None,
    coverage: float = 0.8,
    run: dict | None = None,
) -> Path:
    """Write the graph store at `path`, whole or not at all (an older one there is replaced).

    attention: as `attention_attribution(..., loading_edges=loading_envelope(...))` returns it
    for `pruned` (the pruning at node_threshold / edge_threshold); its loadings are stored,
    its QK attributions too. The envelope's node threshold is `loadings_node_threshold`."""
    if graph.n_nodes >= 2**31:
        raise ValueError(f"a graph of {graph.n_nodes} nodes does not fit int32 node indices")
    tensors, fields = _graph_fields(graph)
    scores = {"full": graph_scores(graph), "pruned": graph_scores(graph, pruned.edge_mask)}
    store = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "graph": fields, "n_heads": n_heads,
        "scores_full": list(scores["full"]), "slug": slug, "scan": scan,
        "node_threshold": node_threshold, "edge_threshold": edge_threshold, "attention": None,
    }  # fmt: skip
    if attention is not None:
        P, L, H = attention.loadings.loadings.shape
        store["n_heads"] = H
        store["attention"] = {"gate_offset": attention.gate_offset, "coverage": coverage,
                              "loadings_node_threshold": loadings_node_threshold,
                              "qk": [[q.layer, q.head, q.query_pos, q.key_pos] for q in attention.qk]}  # fmt: skip
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "slug": slug, "scan": scan,
        "prompt": graph.prompt or "".join(graph.token_strings), "prompt_tokens": graph.token_strings,
        "n_pos": graph.n_pos, "n_nodes": graph.n_nodes, "n_edges": graph.n_edges,
        "n_features": graph.n_features, "n_active_features": graph.n_active_features,
        "n_logits": len(graph.logit_targets), "node_threshold": node_threshold,
        "edge_threshold": edge_threshold, "attention": attention is not None,
        "loadings_node_threshold": loadings_node_threshold if attention is not None else None,
        "seconds": graph.settings.get("seconds"),
    }  # fmt: skip
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_tensors(tmp / GRAPH_FILE, tensors)
        if attention is not None:
            sl = StoredLoadings.from_dense(attention.loadings, loadings_node_threshold)
            save_tensors(tmp / LOADINGS_FILE, {"edges": sl.edges.int(), "row": sl.row,
                                               "head": sl.head, "value": sl.value})  # fmt: skip
            for qk in attention.qk:
                save_qk(tmp, qk)
        if run is not None:
            write_json(tmp / RUN_FILE, run)
        write_json(tmp / STORE_FILE, store)
        write_json(tmp / METRICS_FILE, {k: v._asdict() for k, v in scores.items()})
        write_json(tmp / META_FILE, meta)
    log.info("graph store %s: %d nodes, %d edges", path, graph.n_nodes, graph.n_edges)
    return path


def is_graph_store(path: str | os.PathLike) -> bool:
    return (Path(path) / STORE_FILE).is_file() and (Path(path) / GRAPH_FILE).is_file()


def load_graph(path: str | os.PathLike) -> StoredGraph:
    """The graph store at `path`, its Graph as `attribute` made it (int64 node indices: pruning
    runs ~30 % faster on them than on the int32 they are stored as)."""
    path = Path(path)
    if not is_graph_store(path):
        raise GraphStoreError(f"{path} holds no graph store ({STORE_FILE} and {GRAPH_FILE})")
    store = read_json(path / STORE_FILE)
    if store.get("format") != FORMAT or store.get("format_version") != FORMAT_VERSION:
        raise GraphStoreError(
            f"{path}: format {store.get('format')!r} version {store.get('format_version')}; this code "
            f"reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    tensors = load_tensors(path / GRAPH_FILE)
    for name in EDGE_FIELDS:
        tensors[name] = tensors[name].long()
    fields = dict(store["graph"])
    fields["logit_targets"] = [LogitTarget(*t) for t in fields["logit_targets"]]
    graph = Graph(**fields, **tensors)
    loadings = None
    if store.get("attention") is not None:
        t = load_tensors(path / LOADINGS_FILE)
        loadings = StoredLoadings(
            t["edges"].long(), t["row"], t["head"], t["value"], graph.n_layers, store["n_heads"],
            store["attention"]["loadings_node_threshold"],
        )  # fmt: skip
    meta = read_json(path / META_FILE)
    return StoredGraph(path, graph, loadings, store, meta, GraphScores(*store["scores_full"]))


# ----------------------------------------------------------------------------- views of a pruning


class AttentionView(NamedTuple):
    attention: AttentionAttribution | None  # None: the graph was stored without it
    missing: int  # cross-position links of the pruning without stored loadings


def stored_attention(stored: StoredGraph, pruned: PruneResult) -> AttentionView:
    """The attention attribution of a pruning, as `attention_attribution` computes it (loadings
    of its cross-position links, the summary weighted by their pruned influence), with the QK
    attributions stored with the graph; and how many of its links lack stored loadings."""
    if stored.loadings is None:
        return AttentionView(None, 0)
    edges = cross_links(stored.graph, pruned)
    values, found = stored.loadings.select(edges)
    loadings = HeadLoadings(edges[found], values[found])
    att = stored.store["attention"]
    summary = head_summary(loadings, pruned.pruned_edge_scores[loadings.edges], att["coverage"])
    attention = AttentionAttribution(loadings, summary, stored.qk(), att["gate_offset"])
    return AttentionView(attention, int((~found).sum()))


def graph_json_at(
    stored: StoredGraph,
    node_threshold: float,
    edge_threshold: float,
    pruned: PruneResult | None = None,
    view: AttentionView | None = None,
) -> dict:
    """The graph JSON v1 of the pruning at these thresholds, as `run_attribute` writes it (all
    but metadata.info.create_time_ms). `pruned`, `view`: that pruning and its
    `stored_attention`, when the caller has them already."""
    graph = stored.graph
    pruned = pruned if pruned is not None else prune(graph, node_threshold, edge_threshold)
    scores = {"full": stored.scores_full, "pruned": graph_scores(graph, pruned.edge_mask)}
    attention, missing = view if view is not None else stored_attention(stored, pruned)
    doc = graph_json(
        graph, pruned, scores=scores, attention=attention, slug=stored.store["slug"],
        scan=stored.store["scan"], node_threshold=node_threshold, edge_threshold=edge_threshold,
    )  # fmt: skip
    if missing:
        doc["attention"]["summary"]["links_without_loadings"] = missing
        doc["attention"]["summary"]["loadings_node_threshold"] = stored.loadings.node_threshold
    return doc


def pruned_node_count(
    stored: StoredGraph, node_threshold: float, edge_threshold: float
) -> tuple[int, PruneResult]:
    pruned = prune(stored.graph, node_threshold, edge_threshold)
    return int(pruned.node_mask.sum()), pruned


def link_loadings(stored: StoredGraph, source_id: str, target_id: str) -> dict:
    """One edge's weight and head loadings ([layer, head, value], largest |value| first).

    Raises KeyError naming the unknown node or missing edge, ValueError for an edge that no head
    carries (same position) or one outside the loading envelope."""
    src, tgt = stored.node_index(source_id), stored.node_index(target_id)
    for name, node, node_id in (("source", src, source_id), ("target", tgt, target_id)):
        if node is None:
            raise KeyError(f"{name}: the graph has no node {node_id!r}")
    e = stored.edge_index(src, tgt)
    if e is None:
        raise KeyError(f"the graph has no edge from {source_id!r} to {target_id!r}")
    pos = stored.graph.node_positions()
    weight = float(stored.graph.edge_weights[e])
    out = {
        "source": source_id,
        "target": target_id,
        "weight": weight,
        "cross_position": bool(pos[src] < pos[tgt]),
    }
    if not out["cross_position"]:
        raise ValueError(
            f"the edge from {source_id!r} to {target_id!r} stays at position {int(pos[tgt])}: no "
            "attention head carries it, so it has no head loadings"
        )
    if stored.loadings is None:
        raise ValueError("this graph was stored without attention attribution")
    values, found = stored.loadings.select(torch.tensor([e]))
    if not bool(found[0]):
        raise ValueError(
            f"the edge from {source_id!r} to {target_id!r} lies outside the loading envelope (head "
            f"loadings are stored for links of prunings at node_threshold <= {stored.loadings.node_threshold})"
        )
    part = values[0]
    nz = part.nonzero().tolist()
    nz.sort(key=lambda jh: -abs(float(part[jh[0], jh[1]])))
    out["loadings"] = [[j, h, float(part[j, h])] for j, h in nz]
    return out


def head_report(
    stored: StoredGraph, layer: int, head: int, view: AttentionView | PruneResult, top: int = 20
) -> dict:
    """One head's share of the pruning's attention-mediated attribution (its rank among heads),
    and the pruning's cross-position links with the largest |loading| on it. `view`: the
    pruning's `stored_attention`, or the pruning."""
    if isinstance(view, PruneResult):
        view = stored_attention(stored, view)
    attention, missing = view
    if attention is None:
        raise ValueError("this graph was stored without attention attribution")
    shares = attention.summary.shares
    share = float(shares[layer, head])
    rank = int((shares.flatten() > share).sum()) + 1
    loads = attention.loadings
    on_head = loads.loadings[:, layer, head]
    order = on_head.abs().argsort(descending=True)
    order = order[on_head[order] != 0][:top]
    g = stored.graph
    edges = []
    for i in order.tolist():
        e = int(loads.edges[i])
        edges.append({
            "source": g.node_id(int(g.edge_sources[e])), "target": g.node_id(int(g.edge_targets[e])),
            "weight": float(g.edge_weights[e]), "loading": float(on_head[i]),
        })  # fmt: skip
    return {
        "layer": layer, "head": head, "share": share, "rank": rank,
        "heads_for_coverage": attention.summary.n_heads, "coverage": attention.summary.coverage,
        "total_heads": attention.summary.total_heads,
        "n_links": int((on_head != 0).sum()), "links_without_loadings": missing, "top_links": edges,
    }  # fmt: skip


# ----------------------------------------------------------------------------- subgraphs


def check_subgraph_name(name: str) -> str:
    if not SUBGRAPH_NAME.match(name):
        raise ValueError(
            f"subgraph name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'"
        )
    return name


def subgraph_errors(
    stored: StoredGraph, pinned_ids: list[str], supernodes: list[list[str]]
) -> list[dict]:
    """Each node id of a subgraph that is not one of the graph's, as {loc, msg}."""
    errors = []
    for i, node_id in enumerate(pinned_ids):
        if stored.node_index(node_id) is None:
            errors.append(
                {"loc": ["body", "pinnedIds", i], "msg": f"the graph has no node {node_id!r}"}
            )
    for i, group in enumerate(supernodes):
        for j, node_id in enumerate(group[1:], start=1):
            if stored.node_index(node_id) is None:
                errors.append(
                    {
                        "loc": ["body", "supernodes", i, j],
                        "msg": f"the graph has no node {node_id!r}",
                    }
                )
    return errors


def save_subgraph(directory: str | os.PathLike, name: str, doc: dict) -> Path:
    path = Path(directory) / SUBGRAPH_DIR / f"{check_subgraph_name(name)}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc))
    return path


def load_subgraph(directory: str | os.PathLike, name: str) -> dict | None:
    path = Path(directory) / SUBGRAPH_DIR / f"{check_subgraph_name(name)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- QK on demand


def check_attention_edge(
    stored: StoredGraph, layer: int, head: int, query_pos: int, key_pos: int
) -> list[dict]:
    """Each field of (layer, head, query, key) that names no attention edge of the graph."""
    L, H, T = stored.graph.n_layers, stored.n_heads, stored.graph.n_pos
    errors = []
    if not 0 <= layer < L:
        errors.append(
            {"loc": ["body", "layer"], "msg": f"no layer {layer}: the model has {L} (0..{L - 1})"}
        )
    if H is not None and not 0 <= head < H:
        errors.append(
            {"loc": ["body", "head"], "msg": f"no head {head}: a layer has {H} (0..{H - 1})"}
        )
    if not 0 <= query_pos < T:
        errors.append(
            {
                "loc": ["body", "query"],
                "msg": f"no position {query_pos}: the prompt has {T} tokens (0..{T - 1})",
            }
        )
    if not 0 <= key_pos <= query_pos:
        errors.append(
            {
                "loc": ["body", "key"],
                "msg": f"the key position {key_pos} must be in 0..query ({query_pos})",
            }
        )
    return errors


def compute_qk(
    stored: StoredGraph,
    model,
    clt,
    layer: int,
    head: int,
    query_pos: int,
    key_pos: int,
    batch_size: int = 64,
) -> QKAttribution:
    """The QK attribution of one attention edge of the stored graph's prompt, computed as
    `attention_attribution(..., qk_at=[edge])` computes it (with an empty pruning, so no head
    loadings are computed), then saved with the graph."""
    graph = stored.graph
    E, N = graph.n_edges, graph.n_nodes
    nothing = PruneResult(
        torch.ones(N, dtype=torch.bool), torch.zeros(E, dtype=torch.bool), torch.zeros(N),
        torch.zeros(N), torch.zeros(E), torch.zeros(E),
    )  # fmt: skip
    attention = attention_attribution(
        model=model, clt=clt, graph=graph, pruned=nothing, batch_size=batch_size,
        qk_at=[(layer, head, query_pos, key_pos)],
    )  # fmt: skip
    qk = attention.qk[0]
    save_qk(stored.path, qk)
    return qk
