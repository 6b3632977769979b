"""The linear replacement model: one batched forward pass of the model with everything
nonlinear frozen at its prompt values, kept for many backward passes.

Shape letters: B batch (one attribution target per row), T positions, L layers, M d_model,
H query heads, K key/value heads, D head dim.

Frozen: attention patterns (q and k still run, for QK attribution, but what the model
computes from them is replaced), every
norm's per-token scale, and each MLP output (the CLT reconstruction plus the error term, so
feature activations are frozen too and an edge is a direct effect). What is left is linear:
residual additions, norm centring and weights, v and o projections under fixed patterns.

Leaves, where gradients are read: the embeddings [B,T,M] and each layer's MLP output [B,T,M].
Taps, where gradients are injected (or read): each layer's MLP input (feature pre-activations
read it), the final norm's output (logits read it), and each layer's q, k, v, z.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..sparse_attention.hooks import hooks, stop_after
from .replacement import PromptRun, ReplacementModel, norm_scale_hooks

TapKind = Literal["mlp_in", "final", "q", "k", "v", "z"]
_TAP_HOOKS = {"mlp_in": "blocks.{layer}.hook_mlp_in", "q": "blocks.{layer}.attn.hook_q", "k": "blocks.{layer}.attn.hook_k",
              "v": "blocks.{layer}.attn.hook_v", "z": "blocks.{layer}.attn.hook_z"}  # fmt: skip


class Tap(NamedTuple):
    kind: TapKind
    layer: int = -1  # -1 for "final"


class LeafGrads(NamedTuple):
    embed: torch.Tensor  # B,T,M
    mlp_out: torch.Tensor  # B,T,L,M
    taps: dict[Tap, torch.Tensor]  # gradients at the taps asked for in `wrt`


@contextmanager
def weights_frozen(*modules: nn.Module) -> Iterator[None]:
    """No parameter requires grad inside the block (the graph then saves only what activation
    gradients need); the flags are restored after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


@contextmanager
def gates_off(model: nn.Module) -> Iterator[None]:
    """Gate mode off for the block. Under a frozen pattern the gate changes no value; off, the
    layers keep no gate statistics, whose autograd graph would hold every layer's T x T."""
    mode, offset = model.gate_mode, model.blocks[0].attn.gate_offset
    try:
        model.set_gate("off")
        yield
    finally:
        model.set_gate(mode, offset)


# Below this share of nonzeros a frozen pattern is kept sparse: a sparsified model's patterns
# (about 1 % open) and diagonal ones then cost by their nonzeros in every backward pass.
SPARSE_PATTERN_DENSITY = 0.05


def frozen_pattern(pattern: torch.Tensor) -> torch.Tensor:
    """The pattern as the frozen model applies it: sparse COO when few entries are nonzero."""
    if pattern.dtype not in (torch.float32, torch.float64):
        return pattern  # sparse matmuls are not offered for half precision everywhere
    if pattern.count_nonzero() > SPARSE_PATTERN_DENSITY * pattern.numel():
        return pattern
    return pattern.to_sparse().coalesce()


class FrozenGraph:
    """A batched forward of the linear replacement model, kept for repeated backward passes.

    patterns: "full" (the prompt's) or "diagonal" (each query attends to itself only, with the
    prompt's weight: gradients then never leave their position).
    sources: "prompt" (embeddings of `tokens`, the prompt's MLP outputs) or "bias" (of the
    embeddings only what no embedding node holds, MLP outputs b_dec only where features are:
    the forward values are then what no node explains).
    taps: the kinds of tap kept for injections and reads (default all). Each kept tap holds a
    B x T x M tensor per layer, so a caller that injects at MLP inputs and logits alone keeps
    those two and the graph holds a third of the memory.
    """

    def __init__(
        self,
        rm: ReplacementModel,
        run: PromptRun,
        batch_size: int,
        *,
        patterns: Literal["full", "diagonal"] = "full",
        sources: Literal["prompt", "bias"] = "prompt",
        tokens: torch.Tensor | None = None,
        taps: Collection[TapKind] = ("mlp_in", "final", "q", "k", "v", "z"),
    ):
        self.rm, self.run, self.batch_size = rm, run, batch_size
        model, L = rm.model, rm.cfg.n_layers
        tokens = run.tokens if tokens is None else tokens.to(run.tokens.device)
        if tokens.shape != run.tokens.shape:
            raise ValueError(
                f"the frozen model runs on {run.n_pos} positions, got tokens of shape {tuple(tokens.shape)}"
            )
        self.taps: dict[Tap, torch.Tensor] = {}
        self.mlp_out_leaves: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        self.embed_leaf: torch.Tensor | None = None
        fns = {}

        def embed(x: torch.Tensor) -> torch.Tensor:
            rest = run.embedding_rest.to(x.dtype).expand_as(x)
            self.embed_leaf = (x if sources == "prompt" else rest).detach().requires_grad_()
            return self.embed_leaf

        fns["hook_embed"] = embed
        for name in norm_scale_hooks(L):
            fns[name] = lambda _x, v=run.scales[name][None]: v  # 1,T,1
        for li in range(L):
            pattern = run.patterns[li]  # H,T,S
            if patterns == "diagonal":
                pattern = torch.diag_embed(pattern.diagonal(dim1=-2, dim2=-1))
            pattern = frozen_pattern(pattern[None])  # 1,H,T,S
            fns[f"blocks.{li}.attn.hook_pattern"] = lambda _x, v=pattern: v
            bias = rm.clt.b_dec[li].to(run.mlp_out) * run.feature_mask[:, None]  # T,M
            out = run.mlp_out[li] if sources == "prompt" else bias
            out = out.detach()

            def mlp_out(_x: torch.Tensor, li=li, out=out) -> torch.Tensor:
                leaf = out.expand(batch_size, -1, -1).clone().requires_grad_()  # B,T,M
                self.mlp_out_leaves[li] = leaf
                return leaf

            fns[f"blocks.{li}.hook_mlp_out"] = mlp_out
            for kind, hook in _TAP_HOOKS.items():
                fns[hook.format(layer=li)] = self._recorder(Tap(kind, li), keep=kind in taps)

        def final(out: torch.Tensor) -> None:
            if "final" in taps:
                self.taps[Tap("final")] = out

        with (
            weights_frozen(model, rm.clt),
            gates_off(model),
            hooks(model, fns),
            torch.enable_grad(),
            stop_after(model, "final_norm", final),  # the logits themselves are never needed
        ):
            model(tokens[None].expand(batch_size, -1))

    def _recorder(self, tap: Tap, keep: bool):
        # q and k feed only the pattern and the MLP input only the MLP, whose outputs the
        # frozen model replaces: past the tap, one batch row is enough (the rest is discarded
        # work that would cost more than the backward passes of a short prompt).
        one_row = tap.kind in ("q", "k", "mlp_in")

        def record(x: torch.Tensor) -> torch.Tensor | None:
            if keep:
                self.taps[tap] = x
            return x[:1] if one_row else None

        return record

    def injection(self, tap: Tap) -> torch.Tensor:
        """A zero gradient for `tap`, to fill row by row."""
        return torch.zeros_like(self.taps[tap])

    def injections(self, rows: Sequence[tuple[Tap, int, torch.Tensor]]) -> dict[Tap, torch.Tensor]:
        """Row r injects vector rows[r][2] (M) at residual-width tap rows[r][0] ("mlp_in" or
        "final"), position rows[r][1]; the other rows inject nothing. len(rows) <= B."""
        inject: dict[Tap, torch.Tensor] = {}
        for r, (tap, pos, vector) in enumerate(rows):
            if tap not in inject:
                inject[tap] = self.injection(tap)
            inject[tap][r, pos] = vector.detach().to(inject[tap].dtype)
        return inject

    def feature_rows(self, feats: torch.Tensor) -> list[tuple[Tap, int, torch.Tensor]]:
        """Injections reading each feature's pre-activation: its encoder row at its layer's MLP
        input. feats: n,3 (layer, pos, index)."""
        W_enc = self.rm.clt.W_enc
        return [(Tap("mlp_in", li), p, W_enc[li, f]) for li, p, f in feats.tolist()]

    def logit_rows(self, directions: torch.Tensor) -> list[tuple[Tap, int, torch.Tensor]]:
        """Injections reading logit targets: their directions (n,M) at the final norm's output,
        last position."""
        return [(Tap("final"), self.run.n_pos - 1, d) for d in directions]

    def backward(
        self, inject: dict[Tap, torch.Tensor], wrt: Sequence[Tap] = (), create_graph: bool = False
    ) -> LeafGrads:
        """Gradients of Σ_taps <inject, tap> at the leaves (and at the taps in `wrt`)."""
        outputs = [self.taps[t] for t in inject]
        inputs = [self.embed_leaf, *self.mlp_out_leaves, *(self.taps[t] for t in wrt)]
        got = torch.autograd.grad(
            outputs,
            inputs,
            list(inject.values()),
            retain_graph=True,
            allow_unused=True,
            create_graph=create_graph,
        )
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs, strict=True)]
        L = len(self.mlp_out_leaves)
        return LeafGrads(
            got[0], torch.stack(got[1 : 1 + L], dim=2), dict(zip(wrt, got[1 + L :], strict=True))
        )


class PrefixGraphs:
    """FrozenGraphs on prefixes of the prompt, built when first asked for. A target at
    position p reads positions <= p only, so its backward pass can run on the shortest
    prefix holding p; attention costs grow as T^2 per row, and the prefixes' lengths are
    T/n, 2T/n, ..., T for n = `n_prefixes` (memory: about (n+1)(2n+1)/(6n) full graphs)."""

    def __init__(
        self, rm: ReplacementModel, run: PromptRun, batch_size: int, n_prefixes: int = 4, **kw
    ):
        self.rm, self.run, self.batch_size, self.kw = rm, run, batch_size, kw
        T = run.n_pos
        self.lengths = sorted({math.ceil(T * k / n_prefixes) for k in range(1, n_prefixes + 1)})
        self.graphs: dict[int, FrozenGraph] = {}

    def covering(self, max_pos: int) -> FrozenGraph:
        """The shortest prefix graph that holds position `max_pos`."""
        n = next(length for length in self.lengths if length > max_pos)
        if n not in self.graphs:
            run = self.run if n == self.run.n_pos else self.run.prefix(n)
            self.graphs[n] = FrozenGraph(self.rm, run, self.batch_size, **self.kw)
        return self.graphs[n]
