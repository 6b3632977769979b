"""The source nodes of attribution rows and their values from one backward pass.

Shape letters: B rows, T positions, L layers, M d_model, N active features, K output layers
of one source layer's decoder, n active features of one layer.

Columns, in this order: every active feature (sorted by layer, position, index), every error
node (layer-major: l * T + pos), every embedding (pos). A source's value in a row is its
contribution vector dotted with the row's gradient where the vector enters:
    feature (i, p, f): Σ_{k≥i} a · W_dec[i][f, k-i] · ∂target/∂mlp_out_k[p]
    error (k, p):      error_k[p] · ∂target/∂mlp_out_k[p]
    embedding p:       embedding[p] · ∂target/∂embed[p]
Contribution vectors are stored ragged, one per active feature (as circuit-tracer does): a
position with many active features (BOS-like outliers, wide CLTs) costs its own features only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .frozen import LeafGrads
from .graph import SourceColumns
from .replacement import PromptRun, ReplacementModel


class _LayerBlock(NamedTuple):
    """Active features of one source layer, sorted by position: columns first .. first + n,
    the features at position p in rows segments[p] .. segments[p + 1] of `vectors`."""

    layer: int
    n_out: int  # K
    first: int  # column of the block's first feature
    pos: torch.Tensor  # n  (ascending)
    segments: list[int]  # T+1  offsets of each position's features
    vectors: torch.Tensor  # n,K*M  contribution vectors a · W_dec[i][f] (flattened)


class SourceTable(SourceColumns):
    @torch.no_grad()
    def __init__(self, rm: ReplacementModel, run: PromptRun):
        L, T = rm.cfg.n_layers, run.n_pos
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
            W = rm.clt.W_dec[i]  # F,K,M
            vectors = (self.activations[cols, None, None] * W[index[cols]]).flatten(1).to(dtype)
            self.col_block[cols] = len(self.blocks)
            self.col_local[cols] = torch.arange(cols.numel(), device=dev)
            p = pos[cols]  # features are sorted by (layer, pos, index): contiguous columns
            segments = torch.searchsorted(p, torch.arange(T + 1, device=dev)).tolist()
            self.blocks.append(_LayerBlock(i, W.shape[1], int(cols[0]), p, segments, vectors))

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
            Gi = G[:, :, blk.layer : blk.layer + blk.n_out].flatten(2)  # B,T',K*M
            vals = out[:, blk.first : blk.first + blk.pos.numel()]  # B,n (a view)
            seg = blk.segments
            for p in range(Tp):  # one matmul per position: its own features, no padding
                a, b = seg[p], seg[p + 1]
                if b > a:
                    torch.matmul(Gi[:, p], blk.vectors[a:b].T, out=vals[:, a:b])
        errors = (G * self.errors[:, :Tp].transpose(0, 1)).sum(-1)  # B,T',L
        out[:, self.error_offset : self.embed_offset].view(B, L, T)[:, :, :Tp] = errors.transpose(
            1, 2
        )
        out[:, self.embed_offset : self.embed_offset + Tp] = (
            grads.embed * self.embeddings[:Tp]
        ).sum(-1)
        return out

    def position_runs(self) -> list[int]:
        """Column offsets splitting the columns into runs sorted by position: each source
        layer's features, each layer's errors, the embeddings; the last offset is n_cols."""
        L, T = self.n_layers, self.n_pos
        layer = self.features[:, 0].cpu().contiguous()
        features = torch.searchsorted(layer, torch.arange(L)).tolist()
        return sorted(
            {
                *features,
                *(self.error_offset + li * T for li in range(L)),
                self.embed_offset,
                self.n_cols,
            }
        )

    def pair_values(self, grads: LeafGrads, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The value of source cols[n] in row rows[n]: n."""
        G, E = grads.mlp_out, grads.embed
        out = G.new_zeros(rows.shape[0])
        is_feat = cols < self.n_features
        if self.n_features:
            block_of = torch.where(is_feat, self.col_block[cols.clamp(max=self.n_features - 1)], -1)
            for b, blk in enumerate(self.blocks):
                sel = (block_of == b).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                local = self.col_local[cols[sel]]
                g = G[rows[sel], blk.pos[local], blk.layer : blk.layer + blk.n_out].flatten(1)
                out[sel] = (g * blk.vectors[local]).sum(-1)  # n,K*M -> n
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
