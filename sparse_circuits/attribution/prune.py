"""Influence, pruning and graph scores, on sparse edges (circuit-tracer's definitions).

With Â the adjacency with |weights|, each target's row normalised to sum 1, and w the logit
targets' weights (probabilities), a node's influence is (w Â + w Â² + ...)[node]: the share
of the logits' direct-effect mass that reaches it along all paths. The graph is a DAG (edges
point back in layers or into embeddings), so the series ends after at most L + 2 terms.
Every product here is an index_add over the edge list: O(edges) time and memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .graph import Graph


def normalized_weights(targets: torch.Tensor, weights: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """|w| / Σ_row |w| for each edge (the row of its target)."""
    a = weights.abs().float()
    row_sum = torch.zeros(n_nodes, dtype=a.dtype, device=a.device).index_add_(0, targets, a)
    return a / row_sum[targets].clamp(min=1e-10)


def propagate(
    targets: torch.Tensor,
    sources: torch.Tensor,
    norm_w: torch.Tensor,
    start: torch.Tensor,
    max_iter: int = 1000,
) -> torch.Tensor:
    """Σ_{k≥1} start Â^k (a vector over nodes), Â given as an edge list."""
    total = torch.zeros_like(start)
    current = start
    for _ in range(max_iter):
        current = torch.zeros_like(start).index_add_(0, sources, current[targets] * norm_w)
        if not current.any():
            return total
        total += current
    raise RuntimeError(f"influence did not vanish after {max_iter} steps: the graph has a cycle")


def logit_start(graph: Graph) -> torch.Tensor:
    start = torch.zeros(graph.n_nodes)
    start[graph.logit_offset :] = graph.logit_weights()
    return start


def find_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the top scores hold `fraction` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    i = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)))
    return ordered[min(i, ordered.numel() - 1)]


def count_for_coverage(scores: torch.Tensor, fraction: float) -> int:
    """How many of the largest scores it takes to hold `fraction` of their sum."""
    if scores.numel() == 0 or scores.sum() <= 0:
        return 0
    cumulative = scores.sort(descending=True).values.cumsum(0)
    return int(torch.searchsorted(cumulative, fraction * cumulative[-1])) + 1


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # n_nodes bool
    edge_mask: torch.Tensor  # E bool
    node_influence: torch.Tensor  # n_nodes  influence on the logits (logits: 0)
    cumulative: (
        torch.Tensor
    )  # n_nodes  cumulative influence rank in [0, 1], smaller = more important
    edge_scores: torch.Tensor  # E  edge influence in the full graph (sums to the total influence)
    pruned_edge_scores: torch.Tensor  # E  edge influence in the node-pruned graph (0 off it)


def edge_scores(targets, sources, weights, n_nodes, start) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge influence: normalised weight x its target's influence incl. its own logit weight,
    node influence incl. the logit weights)."""
    nw = normalized_weights(targets, weights, n_nodes)
    influence = propagate(targets, sources, nw, start) + start
    return nw * influence[targets], influence


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes holding `node_threshold` of the influence (embeddings and logits always),
    then the edges holding `edge_threshold` of the kept subgraph's edge influence, then drop
    features and errors left without outgoing edges and features left without incoming ones."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    N, tgt, src, w = graph.n_nodes, graph.edge_targets, graph.edge_sources, graph.edge_weights
    start = logit_start(graph)
    scores, influence = edge_scores(tgt, src, w, N, start)
    node_influence = influence - start

    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[graph.embed_offset :] = True

    kept = node_mask[tgt] & node_mask[src]
    pruned_scores = torch.zeros_like(scores)
    edge_mask = kept.clone()
    if kept.any():
        pruned_scores[kept], _ = edge_scores(tgt[kept], src[kept], w[kept], N, start)
        edge_mask &= pruned_scores >= find_threshold(pruned_scores[kept], edge_threshold)

    # Iterate: features and errors need an outgoing edge, features an incoming one.
    while True:
        has_out = torch.zeros(N, dtype=torch.bool)
        has_out[src[edge_mask]] = True
        has_in = torch.zeros(N, dtype=torch.bool)
        has_in[tgt[edge_mask]] = True
        new = node_mask.clone()
        new[: graph.embed_offset] &= has_out[: graph.embed_offset]
        new[: graph.n_features] &= has_in[: graph.n_features]
        if torch.equal(new, node_mask):
            break
        node_mask = new
        edge_mask &= node_mask[tgt] & node_mask[src]

    order = influence.sort(descending=True)  # logits rank by their weight, the rest by influence
    cumulative = torch.zeros(N)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp(min=1e-30)
    return PruneResult(node_mask, edge_mask, node_influence, cumulative, scores, pruned_scores)


class GraphScores(NamedTuple):
    replacement: float  # share of the influence on the logits that ends in embeddings, not errors
    completeness: (
        float  # share of the logits' and nodes' inputs, influence-weighted, not from errors
    )


def graph_scores(graph: Graph, edge_mask: torch.Tensor | None = None) -> GraphScores:
    """Replacement and completeness scores (circuit-tracer's), of the whole graph or of the
    subgraph of the edges in `edge_mask`."""
    tgt, src, w = graph.edge_targets, graph.edge_sources, graph.edge_weights
    if edge_mask is not None:
        tgt, src, w = tgt[edge_mask], src[edge_mask], w[edge_mask]
    N = graph.n_nodes
    start = logit_start(graph)
    nw = normalized_weights(tgt, w, N)
    influence = propagate(tgt, src, nw, start)
    error = slice(graph.error_offset, graph.embed_offset)
    token = slice(graph.embed_offset, graph.logit_offset)
    token_infl, error_infl = influence[token].sum(), influence[error].sum()
    replacement = token_infl / (token_infl + error_infl).clamp(min=1e-30)
    from_error = (src >= graph.error_offset) & (src < graph.embed_offset)
    non_error = 1 - torch.zeros(N).index_add_(0, tgt[from_error], nw[from_error])
    out = influence + start
    completeness = (non_error * out).sum() / out.sum().clamp(min=1e-30)
    return GraphScores(float(replacement), float(completeness))
