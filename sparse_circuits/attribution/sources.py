"""The source nodes of attribution rows and their values from one backward pass.

Shape letters: B rows, T positions, L layers, M d_model, N active features, K output layers
of one source layer's decoder, P most active features of one layer at one position.

Columns, in this order: every active feature (sorted by layer, position, index), every error
node (layer-major: l * T + pos), every embedding (pos). A source's value in a row is its
contribution vector dotted with the row's gradient where the vector enters:
    feature (i, p, f): Σ_{k≥i} a · W_dec[i][f, k-i] · ∂target/∂mlp_out_k[p]
    error (k, p):      error_k[p] · ∂target/∂mlp_out_k[p]
    embedding p:       embedding[p] · ∂target/∂embed[p]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .frozen import LeafGrads
from .graph import SourceColumns
from .replacement import PromptRun, ReplacementModel


class _LayerBlock(NamedTuple):
    """Active features of one source layer, laid out by position for one batched matmul."""

    layer: int
    n_out: int  # K
    cols: torch.Tensor  # n  column index of each feature
    pos: torch.Tensor  # n
    slot: torch.Tensor  # n  rank among this layer's features at the same position
    vectors: torch.Tensor  # T,P,K*M  contribution vectors (zero in unused slots)


class SourceTable(SourceColumns):
    @torch.no_grad()
    def __init__(self, rm: ReplacementModel, run: PromptRun):
        L, T, M = rm.cfg.n_layers, run.n_pos, rm.cfg.d_model
        dtype = run.mlp_out.dtype
        self.n_layers, self.n_pos = L, T
        self.features = run.active_features()  # N,3 (layer, pos, index)
        layer, pos, index = self.features.unbind(1)
        self.activations = run.features[pos, layer, index]  # N
        self.n_features = N = self.features.shape[0]
        self.errors = run.errors  # L,T,M
        self.embeddings = run.embeddings  # T,M
        dev = self.features.device
        self.col_block = torch.full((N,), -1, dtype=torch.long, device=dev)
        self.col_local = torch.full((N,), -1, dtype=torch.long, device=dev)
        self.blocks: list[_LayerBlock] = []
        for i in range(L):
            cols = (layer == i).nonzero().squeeze(1)
            if cols.numel() == 0:
                continue
            p = pos[cols]
            first = torch.searchsorted(p, p)  # cols are sorted by position within a layer
            slot = torch.arange(cols.numel(), device=dev) - first
            W = rm.clt.W_dec[i]  # F,K,M
            K = W.shape[1]
            vectors = torch.zeros(T, int(slot.max()) + 1, K * M, dtype=dtype, device=W.device)
            vectors[p, slot] = (
                (self.activations[cols, None, None] * W[index[cols]]).flatten(1).to(dtype)
            )
            self.col_block[cols] = len(self.blocks)
            self.col_local[cols] = torch.arange(cols.numel(), device=dev)
            self.blocks.append(_LayerBlock(i, K, cols, p, slot, vectors))

    @property
    def n_cols(self) -> int:
        return self.embed_offset + self.n_pos

    def row_values(self, grads: LeafGrads) -> torch.Tensor:
        """Every source's value in each row: B,n_cols. The gradients may cover a prefix of
        the prompt only (T' <= T positions: a backward pass on a prefix graph); sources
        beyond it get 0."""
        G = grads.mlp_out  # B,T',L,M
        B, Tp, L, M = G.shape
        T = self.n_pos
        out = G.new_zeros(B, self.n_cols)
        for blk in self.blocks:
            Gi = (
                G[:, :, blk.layer : blk.layer + blk.n_out].reshape(B, Tp, -1).transpose(0, 1)
            )  # T',B,K*M
            vals = torch.bmm(Gi, blk.vectors[:Tp].transpose(1, 2))  # T',B,P
            inside = blk.pos < Tp
            out[:, blk.cols[inside]] = vals[blk.pos[inside], :, blk.slot[inside]].T
        errors = (G * self.errors[:, :Tp].transpose(0, 1)).sum(-1)  # B,T',L
        out[:, self.error_offset : self.embed_offset].view(B, L, T)[:, :, :Tp] = errors.transpose(
            1, 2
        )
        out[:, self.embed_offset : self.embed_offset + Tp] = (
            grads.embed * self.embeddings[:Tp]
        ).sum(-1)
        return out

    def pair_values(self, grads: LeafGrads, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The value of source cols[n] in row rows[n]: n."""
        G, E = grads.mlp_out, grads.embed
        out = G.new_zeros(rows.shape[0])
        is_feat = cols < self.n_features
        for b, blk in enumerate(self.blocks):
            sel = (
                (is_feat & (self.col_block[cols.clamp(max=self.n_features - 1)] == b))
                .nonzero()
                .squeeze(1)
            )
            if sel.numel() == 0:
                continue
            local = self.col_local[cols[sel]]
            p, slot = blk.pos[local], blk.slot[local]
            g = G[rows[sel], p, blk.layer : blk.layer + blk.n_out].flatten(1)  # n,K*M
            out[sel] = (g * blk.vectors[p, slot]).sum(-1)
        sel = ((cols >= self.error_offset) & (cols < self.embed_offset)).nonzero().squeeze(1)
        layer, p = (
            (cols[sel] - self.error_offset).div(self.n_pos, rounding_mode="floor"),
            (cols[sel] - self.error_offset) % self.n_pos,
        )
        out[sel] = (G[rows[sel], p, layer] * self.errors[layer, p]).sum(-1)
        sel = (cols >= self.embed_offset).nonzero().squeeze(1)
        p = cols[sel] - self.embed_offset
        out[sel] = (E[rows[sel], p] * self.embeddings[p]).sum(-1)
        return out

    def column_positions(self) -> torch.Tensor:
        """Position of every column's source: n_cols."""
        dev = self.features.device
        errs = torch.arange(self.n_pos, device=dev).repeat(self.n_layers)
        return torch.cat([self.features[:, 1], errs, torch.arange(self.n_pos, device=dev)])

    def column_layers(self) -> torch.Tensor:
        """Layer at which every column's vector enters the residual stream (-1 for embeddings):
        a feature's own layer, an error's layer."""
        dev = self.features.device
        errs = torch.arange(self.n_layers, device=dev).repeat_interleave(self.n_pos)
        return torch.cat([self.features[:, 0], errs, torch.full((self.n_pos,), -1, device=dev)])
