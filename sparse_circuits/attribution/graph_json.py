"""Graph JSON, schema version 1 (Neuronpedia / circuit-tracer viewers), with attention
attribution riding along as fields v1 readers ignore.

Ours, beyond v1:
    links[].head_loadings   [[layer, head, weight], ...] for cross-position links, the parts
                            summing to the link's weight (largest |weight| first, zeros left out)
    attention               head summary, QK attributions (top-level key)
    metadata.scores         replacement / completeness scores of the full and the pruned graph
    metadata.embedding_nodes   what an embedding node holds ({convention, description})
    metadata.featureless_positions  positions without features (BOS, {positions, description})
The schema the output is checked against lives beside this module (schema/graph-v1.json).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .. import __version__
from ..io import atomic_path
from .attention import AttentionAttribution, QKAttribution
from .graph import Graph, cantor
from .prune import GraphScores, PruneResult
from .replacement import EMBEDDING_CONVENTIONS

SCHEMA_PATH = Path(__file__).parent / "schema" / "graph-v1.json"
GENERATOR = {"name": "sparse-circuits", "version": __version__, "url": ""}
QK_TOP_TERMS = 64  # node pairs listed per QK attribution; the rest is summed into "other"


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def node_json(graph: Graph, node: int, influence: float) -> dict:
    kind, T, L = graph.node_kind(node), graph.n_pos, graph.n_layers
    base = {"node_id": graph.node_id(node), "influence": _round(min(max(influence, 0.0), 1.0)),
            "clerp": "", "run_idx": 0, "reverse_ctx_idx": 0, "is_target_logit": False}  # fmt: skip
    if kind == "feature":
        layer, pos, index = graph.features[node].tolist()
        return {**base, "feature": cantor(layer, index), "layer": str(layer), "ctx_idx": pos,
                "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{index}-0",
                "activation": _round(float(graph.activations[node]))}  # fmt: skip
    if kind == "error":
        layer, pos = divmod(node - graph.error_offset, T)
        return {**base, "feature": -1, "layer": str(layer), "ctx_idx": pos,
                "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_{pos}-0"}  # fmt: skip
    if kind == "embedding":
        pos = node - graph.embed_offset
        token = int(graph.tokens[pos])
        return {**base, "feature": pos, "layer": "E", "ctx_idx": pos, "feature_type": "embedding",
                "jsNodeId": f"E_{token}-{pos}"}  # fmt: skip
    k = node - graph.logit_offset
    target = graph.logit_targets[k]
    return {**base, "feature": target.token_id, "layer": str(L + 1), "ctx_idx": T - 1, "feature_type": "logit",
            "jsNodeId": f"L_{target.token_id}-{T - 1}", "clerp": f'Output "{target.label}" (p={target.prob:.3f})',
            "token_prob": _round(target.prob), "is_target_logit": k == 0}  # fmt: skip


def qk_json(qk: QKAttribution, gate_offset: float | None) -> dict:
    terms = qk.terms
    flat = terms.flatten()
    top = flat.abs().argsort(descending=True)[:QK_TOP_TERMS]
    nk = terms.shape[1]
    pairs = [
        [qk.query_nodes[i // nk], qk.key_nodes[i % nk], _round(float(flat[i]))]
        for i in top.tolist()
    ]
    return {
        "layer": qk.layer, "head": qk.head, "query_pos": qk.query_pos, "key_pos": qk.key_pos,
        "score": _round(qk.score), "pattern": _round(qk.pattern),
        "gate_logit": None if gate_offset is None else _round(qk.score + gate_offset),
        "terms": pairs, "other": _round(float(flat.sum() - flat[top].sum())),
        "query_nodes": _marginals(qk.query_nodes, terms.sum(1)), "key_nodes": _marginals(qk.key_nodes, terms.sum(0)),
    }  # fmt: skip


def _marginals(ids: list[str], values: torch.Tensor, top: int = QK_TOP_TERMS) -> list:
    order = values.abs().argsort(descending=True)[:top]
    return [[ids[i], _round(float(values[i]))] for i in order.tolist()]


def attention_json(graph: Graph, attention: AttentionAttribution) -> dict:
    s = attention.summary
    order = s.shares.flatten().argsort(descending=True)
    H = s.shares.shape[1]
    heads = [{"layer": i // H, "head": i % H, "share": _round(float(s.shares.flatten()[i]))}
             for i in order.tolist() if s.shares.flatten()[i] > 0]  # fmt: skip
    return {
        "head_loadings": "links[].head_loadings: [layer, head, weight], the last attention hop into the "
        "target's position; the parts sum to the link's weight",
        "gate_offset": attention.gate_offset,
        "summary": {
            "coverage": s.coverage,
            "n_heads": s.n_heads,
            "total_heads": s.total_heads,
            "cross_position_links": int(attention.loadings.edges.numel()),
            "heads": heads,
        },  # fmt: skip
        "qk": [qk_json(q, attention.gate_offset) for q in attention.qk],
    }


def graph_json(
    graph: Graph,
    pruned: PruneResult,
    *,
    scores: dict[str, GraphScores] | None = None,
    attention: AttentionAttribution | None = None,
    slug: str = "graph",
    scan: str = "",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict:
    """The pruned graph as a graph JSON v1 document."""
    nodes = pruned.node_mask.nonzero().squeeze(1).tolist()
    ids = {n: graph.node_id(n) for n in nodes}
    cumulative = pruned.cumulative.tolist()
    loads: dict[int, list] = {}
    if attention is not None:
        for e, part in zip(
            attention.loadings.edges.tolist(), attention.loadings.loadings, strict=True
        ):
            nz = part.nonzero().tolist()
            nz.sort(key=lambda jh: -abs(float(part[jh[0], jh[1]])))
            loads[e] = [[j, h, _round(float(part[j, h]))] for j, h in nz]
    links = []
    edges = pruned.edge_mask.nonzero().squeeze(1)
    tgt, src, w = (
        graph.edge_targets[edges].tolist(),
        graph.edge_sources[edges].tolist(),
        graph.edge_weights[edges].tolist(),
    )
    for e, t, s, weight in zip(edges.tolist(), tgt, src, w, strict=True):
        link = {"source": ids[s], "target": ids[t], "weight": _round(weight)}
        if e in loads:
            link["head_loadings"] = loads[e]
        links.append(link)
    metadata = {
        "slug": slug,
        "scan": scan,
        "prompt": graph.prompt or "".join(graph.token_strings),
        "prompt_tokens": graph.token_strings,
        "schema_version": 1,
        "node_threshold": node_threshold,
        "info": {
            "description": "attribution graph of a cross-layer transcoder replacement model with attention attribution",
            "generator": GENERATOR,
            "create_time_ms": int(time.time() * 1000),
        },
        "generation_settings": {
            k: graph.settings[k]
            for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
            if k in graph.settings
        },  # fmt: skip
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "n_active_features": graph.n_active_features,
        "n_feature_nodes": graph.n_features,
        "n_edges": graph.n_edges,
        "embedding_nodes": {
            "convention": graph.embedding,
            "description": EMBEDDING_CONVENTIONS.get(graph.embedding, graph.embedding),
        },
        "featureless_positions": {
            "positions": list(graph.featureless_positions),
            "description": "BOS positions hold no features (the CLT was trained without BOS rows); "
            "the error node there carries the whole MLP output",
        },
    }
    if scores:
        metadata["scores"] = {k: {"replacement": _round(v.replacement), "completeness": _round(v.completeness)}
                              for k, v in scores.items()}  # fmt: skip
    doc = {
        "metadata": metadata,
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": [node_json(graph, n, cumulative[n]) for n in nodes],
        "links": links,
    }
    if attention is not None:
        doc["attention"] = attention_json(graph, attention)
    return doc


def write_graph_json(path: str | os.PathLike, graph: Graph, pruned: PruneResult, **kw) -> Path:
    """Write graph_json(...) atomically (a kill mid-write leaves the old file or none)."""
    doc = graph_json(graph, pruned, **kw)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, allow_nan=False, separators=(",", ":")))
    return path
