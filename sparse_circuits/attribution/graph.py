"""The attribution graph: a plain object holding nodes and sparse edges.

Nodes, in this order (index ranges):
    features    [0, Nf)                      selected active features (layer, pos, index)
    errors      [Nf, Nf + L*T)               error node of (layer, pos) at Nf + layer*T + pos
    embeddings  [.., .. + T)                 each position's embedding (`embedding` says what it holds)
    logits      [.., .. + n_logits)          logit targets at the last position
Edges are direct effects in the linear replacement model, target <- source, with weight
    (source's contribution vector) · ∂(target)/∂(where it enters)
where a feature target is its pre-activation and a logit target its mean-centred logit (or
a logit difference). Stored as parallel arrays (COO), sorted by target then source: no
dense node x node matrix is ever needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .inputs import LogitTarget


def logit_weights(logit_targets: list[LogitTarget]) -> torch.Tensor:
    """Each logit target's weight in influence: its probability, normalised (uniform when all
    are zero)."""
    p = torch.tensor([t.prob for t in logit_targets], dtype=torch.float32)
    return p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / max(len(p), 1))


def cantor(layer: int, index: int) -> int:
    """The Cantor pairing of (layer, index): graph JSON's feature id."""
    return (layer + index) * (layer + index + 1) // 2 + index


def feature_node_id(layer: int, index: int, pos: int) -> str:
    return f"{layer}_{index}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def embedding_node_id(token_id: int, pos: int) -> str:
    return f"E_{token_id}_{pos}"


def logit_node_id(n_layers: int, token_id: int, pos: int) -> str:
    return f"{n_layers + 1}_{token_id}_{pos}"


class SourceColumns:
    """The order of source nodes shared by source tables and graphs: features, then one error
    per (layer, position), layer-major, then one embedding per position."""

    n_features: int
    n_layers: int
    n_pos: int

    @property
    def error_offset(self) -> int:
        return self.n_features

    @property
    def embed_offset(self) -> int:
        return self.n_features + self.n_layers * self.n_pos


@dataclass
class Graph(SourceColumns):
    prompt: str
    tokens: torch.Tensor  # T
    token_strings: list[str]
    n_layers: int
    vocab_size: int
    features: torch.Tensor  # Nf,3  (layer, pos, index)
    activations: torch.Tensor  # Nf
    logit_targets: list[LogitTarget]
    edge_targets: torch.Tensor  # E  node index
    edge_sources: torch.Tensor  # E  node index
    edge_weights: torch.Tensor  # E  float32
    n_active_features: int  # active on the prompt; those beyond the budget are not nodes
    featureless_positions: list[int] = field(default_factory=list)  # BOS: the error holds the MLP
    embedding: str = "token+position"  # what embedding nodes hold: "token+position" or "token"
    settings: dict = field(
        default_factory=dict
    )  # how it was computed (graph JSON's generation_settings)

    # ------------------------------------------------------------------ node index ranges
    @property
    def n_pos(self) -> int:
        return self.tokens.numel()

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def logit_offset(self) -> int:
        return self.embed_offset + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_offset + len(self.logit_targets)

    @property
    def n_edges(self) -> int:
        return self.edge_weights.numel()

    def logit_weights(self) -> torch.Tensor:
        return logit_weights(self.logit_targets)

    def node_positions(self) -> torch.Tensor:
        """Position of every node: n_nodes."""
        T = self.n_pos
        return torch.cat([
            self.features[:, 1].cpu(), torch.arange(T).repeat(self.n_layers), torch.arange(T),
            torch.full((len(self.logit_targets),), T - 1),
        ])  # fmt: skip

    def node_layers(self) -> torch.Tensor:
        """Layer of every node: a feature's or error's own, -1 for embeddings, L for logits."""
        L, T = self.n_layers, self.n_pos
        return torch.cat([
            self.features[:, 0].cpu(), torch.arange(L).repeat_interleave(T), torch.full((T,), -1),
            torch.full((len(self.logit_targets),), L),
        ])  # fmt: skip

    def node_kind(self, node: int) -> str:
        for kind, end in (("feature", self.error_offset), ("error", self.embed_offset),
                          ("embedding", self.logit_offset), ("logit", self.n_nodes)):  # fmt: skip
            if node < end:
                return kind
        raise IndexError(f"node {node} is outside the graph's {self.n_nodes} nodes")

    def feature_node(self, layer: int, pos: int, index: int) -> int | None:
        """The node index of a feature, or None when it is not a node."""
        hit = ((self.features == torch.tensor([layer, pos, index])).all(1)).nonzero()
        return int(hit[0]) if hit.numel() else None

    def node_id(self, node: int) -> str:
        """The node's id in graph JSON v1."""
        kind, T = self.node_kind(node), self.n_pos
        if kind == "feature":
            layer, pos, index = self.features[node].tolist()
            return feature_node_id(layer, index, pos)
        if kind == "error":
            layer, pos = divmod(node - self.error_offset, T)
            return error_node_id(layer, pos)
        if kind == "embedding":
            pos = node - self.embed_offset
            return embedding_node_id(int(self.tokens[pos]), pos)
        return logit_node_id(
            self.n_layers, self.logit_targets[node - self.logit_offset].token_id, T - 1
        )

    def dense_adjacency(self) -> torch.Tensor:
        """A[target, source] as a dense matrix. For small graphs and tests only."""
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edge_weights.dtype)
        A[self.edge_targets, self.edge_sources] = self.edge_weights
        return A
