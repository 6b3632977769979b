"""Attention attribution: which heads carry each cross-position edge, and why a head attends.

Shape letters: P edges, L layers, H query heads, K key/value heads, D head dim, T positions.

Head loadings. In the linear replacement model an edge from a source at position p to a
target at position i > p is a sum over paths, and every path reaches i through attention
(attention moves information only forwards, so a path never leaves i once there). Each path
has one last hop into i: head h of layer j moving q' -> i (q' < i), after which it stays at
i. Grouping paths by that hop splits the edge exactly:
    edge = Σ_{j,h} loading_{j,h}
    loading_{j,h} = Σ_{q'<i} (source's direct effect on v_h^j[q']) · P_h^j[i,q'] · ∂target/∂z_h^j[i]|stay
where ∂target/∂z|stay is the gradient along paths that stay at i after layer j: a backward
pass with every pattern cut to its diagonal. A second, full backward from layer j's values
then gives every source's loading at once. For a single-hop path q' = p.

QK attribution. With patterns, norm scales and MLP outputs frozen, a head's query at i and
key at j are affine in the nodes: q = Σ_n c_n + q_bias, k = Σ_m c_m + k_bias, where c_n is
node n's direct contribution and the bias terms collect what no node explains (decoder,
norm and projection biases). The score q·k/√D is then exactly Σ_{n,m} c_n·c_m/√D over
query-side x key-side nodes, bias included. In a sparsified model the gate of that edge is
open when score + offset > 0: the terms say why it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..clt.model import CrossLayerTranscoder
from ..sparse_attention.model import Transformer
from .frozen import FrozenGraph, PrefixGraphs, Tap
from .graph import Graph, embedding_node_id, error_node_id, feature_node_id
from .prune import PruneResult, count_for_coverage
from .replacement import PromptRun, ReplacementModel
from .sources import SourceTable


class HeadLoadings(NamedTuple):
    edges: torch.Tensor  # P  indices into the graph's edges (cross-position ones)
    loadings: torch.Tensor  # P,L,H  sums to each edge's weight over (L, H)


class HeadSummary(NamedTuple):
    coverage: float
    n_heads: int  # heads needed to hold `coverage` of the attention-mediated attribution
    total_heads: int
    shares: torch.Tensor  # L,H  each head's share of the attention-mediated attribution


class QKAttribution(NamedTuple):
    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # q·k/√D on the prompt
    pattern: float  # the attention weight after the gate
    query_nodes: list[str]  # node ids ("bias" for what no node explains)
    key_nodes: list[str]
    terms: torch.Tensor  # nq,nk  sums to `score`


class AttentionAttribution(NamedTuple):
    loadings: HeadLoadings
    summary: HeadSummary
    qk: list[QKAttribution]
    gate_offset: float | None  # the gate logit is score + offset (sparsified models)


# ----------------------------------------------------------------------------- node bookkeeping


def graph_columns(graph: Graph, sources: SourceTable, d_features: int) -> torch.Tensor:
    """The SourceTable column of every non-logit graph node."""
    T = graph.n_pos

    def keys(f: torch.Tensor) -> torch.Tensor:
        return (f[:, 0] * T + f[:, 1]) * d_features + f[:, 2]

    feats = torch.searchsorted(keys(sources.features.cpu()), keys(graph.features))
    rest = torch.arange(graph.logit_offset - graph.error_offset) + sources.error_offset
    return torch.cat([feats, rest])


def column_ids(sources: SourceTable, tokens: torch.Tensor) -> list[str]:
    """The node id of every SourceTable column."""
    ids = [feature_node_id(li, f, p) for li, p, f in sources.features.tolist()]
    ids += [error_node_id(li, p) for li in range(sources.n_layers) for p in range(sources.n_pos)]
    return ids + [embedding_node_id(t, p) for p, t in enumerate(tokens.tolist())]


def target_rows(rm: ReplacementModel, graph: Graph, frozen: FrozenGraph, nodes: list[int]):
    """Injections reading each graph target node (a feature or a logit)."""
    W_U = rm.model.lm_head.weight
    rows = []
    for n in nodes:
        if n >= graph.logit_offset:
            direction = graph.logit_targets[n - graph.logit_offset].direction(W_U)
            rows += frozen.logit_rows(direction[None])
        else:
            rows += frozen.feature_rows(graph.features[n : n + 1])
    return rows


# ----------------------------------------------------------------------------- head loadings


def head_loadings(
    rm: ReplacementModel,
    run: PromptRun,
    sources: SourceTable,
    graph: Graph,
    edges: torch.Tensor,
    batch_size: int = 64,
) -> HeadLoadings:
    """Split each of `edges` (cross-position edge indices) into per-(layer, head) loadings."""
    cfg = rm.cfg
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    pos = graph.node_positions()
    tgt, src = graph.edge_targets[edges], graph.edge_sources[edges]
    if (pos[src] >= pos[tgt]).any():
        raise ValueError(
            "head loadings are defined for cross-position edges (source before target) only"
        )
    out = torch.zeros(edges.numel(), L, H, dtype=torch.float32)
    if edges.numel() == 0:
        return HeadLoadings(edges, out)
    columns = graph_columns(graph, sources, rm.clt.cfg.d_features)
    # Targets in order of position, so that batches run on the shortest prefix graphs.
    targets = tgt.unique()
    targets = targets[pos[targets].argsort(stable=True)]
    target_pos = pos[targets]
    slot_of = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    slot_of[targets] = torch.arange(targets.numel())
    by_slot = slot_of[tgt].argsort(stable=True)  # edges grouped by target slot
    starts = torch.searchsorted(slot_of[tgt][by_slot], torch.arange(targets.numel() + 1))

    # Stage 1: ∂target/∂z at the target's position along paths that stay there.
    stay = PrefixGraphs(rm, run, batch_size, patterns="diagonal")
    dz = torch.zeros(targets.numel(), L, H, cfg.d_head, dtype=run.mlp_out.dtype)  # n,L,H,D
    z_taps = [Tap("z", j) for j in range(L)]
    for s in range(0, targets.numel(), batch_size):
        part = targets[s : s + batch_size].tolist()
        at = target_pos[s : s + batch_size]
        frozen = stay.covering(int(at.max()))
        grads = frozen.backward(frozen.injections(target_rows(rm, graph, frozen, part)), wrt=z_taps)
        rows = torch.arange(len(part))
        dz[s : s + len(part)] = torch.stack([grads.taps[t][rows, at] for t in z_taps], dim=1).cpu()
    del stay

    # Stage 2: one row per (target, layer, head) whose last hop can carry something.
    jobs = []  # (target slot, layer, head)
    for n, i in enumerate(target_pos.tolist()):
        for j in range(L):
            off_diag = run.patterns[j][:, i, :i].abs().sum(-1)  # H
            for h in range(H):
                if off_diag[h] > 0 and dz[n, j, h].any():
                    jobs.append((n, j, h))
    prefixes = PrefixGraphs(rm, run, batch_size)
    dev = run.tokens.device
    for s in range(0, len(jobs), batch_size):
        part = jobs[s : s + batch_size]
        frozen = prefixes.covering(int(target_pos[part[-1][0]]))
        inject: dict[Tap, torch.Tensor] = {}
        pair_rows, pair_edges, pair_slots = [], [], []
        for r, (n, j, h) in enumerate(part):
            tap = Tap("v", j)
            if tap not in inject:
                inject[tap] = frozen.injection(tap)  # B,K,T',D
            i = int(target_pos[n])
            weights = run.patterns[j][h, i, :i]  # i
            inject[tap][r, h // (H // K), :i] += weights[:, None] * dz[n, j, h].to(weights)
            e = by_slot[starts[n] : starts[n + 1]]
            pair_rows.append(torch.full((e.numel(),), r))
            pair_edges.append(e)
            pair_slots.append(torch.tensor([[j, h]]).expand(e.numel(), 2))
        grads = frozen.backward(inject)
        rows, e, jh = torch.cat(pair_rows), torch.cat(pair_edges), torch.cat(pair_slots)
        values = sources.pair_values(grads, rows.to(dev), columns[src[e]].to(dev)).float().cpu()
        out[e, jh[:, 0], jh[:, 1]] += values
    return HeadLoadings(edges, out)


def select_loadings(loadings: HeadLoadings, edges: torch.Tensor) -> HeadLoadings:
    """The loadings of `edges` (graph edge indices, each one of `loadings.edges`)."""
    order = loadings.edges.argsort()
    known = loadings.edges[order]
    at = torch.searchsorted(known, edges)
    if (at >= known.numel()).any() or (known[at] != edges).any():
        raise ValueError("select_loadings: some of the edges have no loadings")
    return HeadLoadings(edges, loadings.loadings[order[at]])


def head_summary(
    loadings: HeadLoadings, edge_weights: torch.Tensor, coverage: float = 0.8
) -> HeadSummary:
    """Heads ranked by their share of the attention-mediated attribution: each cross-position
    edge's weight (its influence, say) spread over heads in proportion to |loading|."""
    P, L, H = loadings.loadings.shape
    a = loadings.loadings.abs().flatten(1)  # P,L*H
    share = a / a.sum(1, keepdim=True).clamp(min=1e-30)
    mass = (edge_weights.float()[:, None] * share).sum(0)  # L*H
    shares = mass / mass.sum().clamp(min=1e-30)
    return HeadSummary(coverage, count_for_coverage(mass, coverage), L * H, shares.view(L, H))


# ----------------------------------------------------------------------------- QK attribution


class QKContext:
    """What QK attributions on one prompt share: the frozen (prefix) graphs, the bias-only values."""

    def __init__(
        self, rm: ReplacementModel, run: PromptRun, sources: SourceTable, batch_size: int = 64
    ):
        self.rm, self.run, self.sources = rm, run, sources
        # one backward row per dimension of a head: a batch wider than d_head only holds memory
        self.prefixes = PrefixGraphs(rm, run, min(batch_size, rm.cfg.d_head))
        bias_run = FrozenGraph(rm, run, 1, sources="bias")
        self.bias = {t: v.detach() for t, v in bias_run.taps.items()}  # forward values only
        self.ids = column_ids(sources, run.tokens.cpu())

    def contributions(self, tap: Tap, head: int, pos: int) -> torch.Tensor:
        """Every node's direct contribution to the D-vector at (tap, head, pos): n_cols,D."""
        frozen = self.prefixes.covering(pos)
        D, B = self.rm.cfg.d_head, frozen.batch_size
        parts = []
        for s in range(0, D, B):
            inject = frozen.injection(tap)
            dims = torch.arange(s, min(s + B, D))
            inject[torch.arange(dims.numel()), head, pos, dims] = 1.0
            parts.append(self.sources.row_values(frozen.backward({tap: inject}))[: dims.numel()])
        return torch.cat(parts).T

    def attribute(self, layer: int, head: int, query_pos: int, key_pos: int) -> QKAttribution:
        cfg, run = self.rm.cfg, self.run
        if not (
            0 <= layer < cfg.n_layers
            and 0 <= head < cfg.n_heads
            and 0 <= key_pos <= query_pos < run.n_pos
        ):
            raise ValueError(
                f"no attention edge (layer {layer}, head {head}, query {query_pos}, key {key_pos})"
            )
        kv = head // (cfg.n_heads // cfg.n_kv_heads)
        q_side = torch.cat([self.contributions(Tap("q", layer), head, query_pos),
                            self.bias[Tap("q", layer)][0, head, query_pos][None]])  # fmt: skip
        k_side = torch.cat([self.contributions(Tap("k", layer), kv, key_pos),
                            self.bias[Tap("k", layer)][0, kv, key_pos][None]])  # fmt: skip
        ids = [*self.ids, "bias"]
        q_nodes = (q_side != 0).any(1).nonzero().squeeze(1)
        k_nodes = (k_side != 0).any(1).nonzero().squeeze(1)
        terms = (q_side[q_nodes] @ k_side[k_nodes].T).float() / math.sqrt(cfg.d_head)
        score = float(
            run.queries[layer][head, query_pos] @ run.keys[layer][kv, key_pos]
        ) / math.sqrt(cfg.d_head)
        return QKAttribution(
            layer, head, query_pos, key_pos, score, float(run.patterns[layer][head, query_pos, key_pos]),
            [ids[n] for n in q_nodes.tolist()], [ids[n] for n in k_nodes.tolist()], terms.cpu(),
        )  # fmt: skip


def carrying_edges(
    graph: Graph, run: PromptRun, loadings: HeadLoadings, edge_weights: torch.Tensor, top: int
) -> list[tuple[int, int, int, int]]:
    """Open attention edges (layer, head, query i, key p) that carry a graph edge's direct hop
    from its source's position p to its target's i, ranked by the attribution they carry
    (each edge's weight spread over heads in proportion to |loading|)."""
    P, L, H = loadings.loadings.shape
    T = graph.n_pos
    pos = graph.node_positions()
    i = pos[graph.edge_targets[loadings.edges]]  # P
    p = pos[graph.edge_sources[loadings.edges]]
    a = loadings.loadings.abs()
    share = a / a.flatten(1).sum(1).clamp(min=1e-30)[:, None, None]  # P,L,H
    n, j, h = share.nonzero(as_tuple=True)
    patterns = torch.stack(run.patterns).cpu()  # L,H,T,S
    open_ = patterns[j, h, i[n], p[n]] > 0
    n, j, h = n[open_], j[open_], h[open_]
    key = ((j * H + h) * T + i[n]) * T + p[n]
    keys, slot = key.unique(return_inverse=True)  # only the hops some edge uses, never L*H*T*T
    carried = torch.zeros(keys.numel()).index_add_(
        0, slot, (edge_weights.float()[n] * share[n, j, h])
    )
    best = carried.argsort(descending=True)[:top]
    best = keys[best[carried[best] > 0]].tolist()
    return [(k // (H * T * T), k // (T * T) % H, k // T % T, k % T) for k in best]


def attention_attribution(
    *,
    model: Transformer,
    clt: CrossLayerTranscoder,
    graph: Graph,
    pruned: PruneResult,
    batch_size: int = 64,
    qk_edges: int = 0,
    qk_at: Sequence[tuple[int, int, int, int]] = (),
    coverage: float = 0.8,
    loading_edges: torch.Tensor | None = None,
) -> AttentionAttribution:
    """Head loadings of the pruned graph's cross-position edges, the head summary (weights:
    the edges' influence in the pruned graph), and QK attributions of the `qk_edges` open
    attention edges carrying most of it, then of each (layer, head, query, key) in `qk_at`.

    loading_edges: cross-position edges to compute head loadings for instead, a superset of the
    pruned graph's (a graph store keeps them to serve other prunings). `loadings` then holds
    them all; the summary and the QK choice still use the pruned graph's edges alone."""
    # The graph's own conventions: which positions hold features, what embeddings hold.
    include_bos = graph.settings.get("include_bos", not graph.featureless_positions)
    rm = ReplacementModel(model, clt, include_bos=include_bos, embedding=graph.embedding)
    run = rm.run_prompt(graph.tokens)
    if run.featureless_positions() != list(graph.featureless_positions):
        raise ValueError(
            f"the graph has no features at positions {graph.featureless_positions}, this run at "
            f"{run.featureless_positions()}: pass the graph's own model and CLT"
        )
    sources = SourceTable(rm, run)
    pos = graph.node_positions()
    cross = pruned.edge_mask & (pos[graph.edge_sources] < pos[graph.edge_targets])
    edges = cross.nonzero().squeeze(1)
    computed = head_loadings(
        rm, run, sources, graph, edges if loading_edges is None else loading_edges, batch_size
    )
    loadings = computed if loading_edges is None else select_loadings(computed, edges)
    weights = pruned.pruned_edge_scores[edges]
    summary = head_summary(loadings, weights, coverage)
    hops = []
    if qk_edges > 0 and edges.numel():
        hops = carrying_edges(graph, run, loadings, weights, qk_edges)
    hops += [tuple(hop) for hop in qk_at if tuple(hop) not in hops]
    qk = []
    if hops:
        ctx = QKContext(rm, run, sources, batch_size)
        qk = [ctx.attribute(*hop) for hop in hops]
    offset = model.blocks[0].attn.gate_offset if model.gate_mode != "off" else None
    return AttentionAttribution(computed, summary, qk, offset)
