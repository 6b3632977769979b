"""The cross-layer transcoder (CLT): features read one layer's MLP input and write to that
layer's MLP output and every later one's.

Shape letters, used in every shape comment below:
    B batch (tokens), L layers, F features per layer, M d_model,
    K output layers of one source layer's decoder (L - i for layer i; 1 for a per-layer
    transcoder, `cross_layer=False`).

Parameters are named and laid out like circuit-tracer's CLT, so its per-layer files are a
direct export (FORMATS.md):
    W_enc [L, F, M]   b_enc [L, F]   W_dec[i] [F, K_i, M]   b_dec [L, M]   log_threshold [L, F]
    pre_l = x_l · W_enc[l]ᵀ + b_enc[l]
    a_l   = act(pre_l)                        relu | jumprelu | topk | batchtopk
    y_k   = Σ_{i≤k} a_i · W_dec[i][:, k-i, :] + b_dec[k]

The forward returns a `CLTOutput` that carries its loss terms (unweighted; the trainer
weights them):
    nmse      normalised MSE, Σ_m (y - ŷ)² / (M · var_l), averaged over tokens and layers
              (the fraction of variance unexplained when var_l is the targets' variance)
    sparsity  Σ_{l,f} tanh(c · a · ||W_dec row||), averaged over tokens (Anthropic's CLT
              penalty; ||W_dec row|| is the norm of the feature's decoders to all its layers)
    preact    Σ_{l,f} ReLU(-pre) · ||W_dec row||, averaged over tokens (pushes features that
              never fire back towards firing; Anthropic's January 2025 CLT update)
    auxk      TopK/BatchTopK only: the top-k_aux dead features reconstruct the residual
              (Gao et al. 2024), scaled by min(dead / k_aux, 1)

BatchTopK under DDP (`distributed_batch`) selects over the global batch, as one process of
the same batch would: each rank offers its largest pre-activations, the global B·k-th largest
becomes a threshold, and each rank keeps its values at or above it (ties aside, the same set).

The training forward (`forward` with targets) computes the same values as the stages
`encode` → `activate` → `decode` and the formulas above, in a layout and a few fused
operations chosen for speed (the tests hold it equal to the stages, outputs and gradients):
pre-activations layer-major (L,B,F: one batched GEMM with the bias, every layer's slice
contiguous); ReLU/JumpReLU and both penalties in one autograd function whose backward makes a
handful of passes over L,B,F; the decoder as one GEMM per source layer into (and, backward,
out of) strided views of one output, no stacking or per-layer copies. TopK/BatchTopK decode
only the selected rows of each W_dec[i] (an embedding bag weighted by the activations) where
that is faster than the dense GEMMs (`CrossLayerTranscoder.sparse_decode`); so do ReLU/JumpReLU
on a batch where few features fire (the rows of the active features and of those in the
threshold's gradient window).

JumpReLU follows Rajamanoharan et al. 2024 ("Jumping Ahead"): a = z · H(z - θ) with a
learned θ = exp(log_threshold) and straight-through pseudo-derivatives through a rectangle
kernel K(u) = 1[|u| < 1/2] of bandwidth ε:
    ∂a/∂θ = -(θ/ε) · K((z - θ)/ε)        ∂H(z - θ)/∂θ = -(1/ε) · K((z - θ)/ε)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

Activation = Literal["relu", "jumprelu", "topk", "batchtopk"]

# Active fraction up to which decoding the selected rows beats the dense decoder GEMMs: the
# sparse path moves B·k rows of K·M floats three times, the dense one does 3·B·F·K·M
# multiply-adds. Measured (`benchmarks/bench_clt.py --activation topk --decoder-sweep`, fp32,
# one CPU thread, L=4, M=128, F=1024, B=1024, whole training steps): the dense step took 1.98×,
# 1.36×, 1.33×, 1.25× the sparse one at k/F = 1/128 … 1/16, and 0.83× at 1/8.
SPARSE_DECODE_MAX_DENSITY = 1 / 16


class CLTConfig(BaseModel):
    """Architecture of one CLT; the `clt` field of a CLT dir's config.json."""

    model_config = ConfigDict(extra="forbid")
    n_layers: int = Field(gt=0, description="Layers the CLT reads from and writes to (L).")
    d_model: int = Field(gt=0, description="Width of the MLP input and output (M).")
    d_features: int = Field(gt=0, description="Features per layer (F).")
    activation: Activation = Field(
        "jumprelu",
        description="relu; jumprelu (learned thresholds); topk (k per token and layer); "
        "batchtopk (k per token on average over the batch).",
    )
    k: int | None = Field(
        None, gt=0, description="Active features per token and layer (topk, batchtopk)."
    )
    batchtopk_scope: Literal["layer", "all"] = Field(
        "layer",
        description="batchtopk: keep the top B·k of each layer ('layer') or the top B·L·k over all layers ('all').",
    )
    cross_layer: bool = Field(
        True,
        description="Decoders to every later layer; False is the per-layer transcoder (same layer only).",
    )
    bandwidth: float = Field(0.05, gt=0, description="JumpReLU straight-through kernel width ε.")
    initial_threshold: float = Field(
        0.1, gt=0, description="JumpReLU threshold θ at initialisation."
    )
    sparsity_c: float = Field(
        4.0, gt=0, description="c in the tanh(c · a · ||W_dec||) sparsity penalty."
    )
    k_aux: int | None = Field(
        None, gt=0, description="Dead features per token and layer in AuxK; default d_model // 2."
    )

    @model_validator(mode="after")
    def _check(self) -> CLTConfig:
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(
                    f"activation {self.activation!r} needs k (active features per token and layer)"
                )
            if self.k > self.d_features:
                raise ValueError(f"k={self.k} exceeds d_features={self.d_features}")
        return self

    @property
    def decoder_layers(self) -> list[int]:
        """K_i: how many output layers the decoder of source layer i writes to."""
        return [self.n_layers - i if self.cross_layer else 1 for i in range(self.n_layers)]


class CLTOutput(NamedTuple):
    reconstruction: torch.Tensor  # B,L,M
    features: torch.Tensor  # B,L,F  activations a
    pre_acts: torch.Tensor  # B,L,F  pre-activations
    nmse: torch.Tensor | None  # scalar; None without targets
    sparsity: torch.Tensor | None  # scalar
    preact: torch.Tensor | None  # scalar
    auxk: torch.Tensor | None  # scalar (zero unless topk/batchtopk with dead features)


def sparsity_coefficient(step: int, *, final: float, warmup_steps: int) -> float:
    """λ_S at `step`: a linear ramp from 0 to `final` over `warmup_steps`, then flat."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, step / warmup_steps)


def l0(features: torch.Tensor) -> torch.Tensor:
    """Active features per token at each layer, averaged over tokens: B,L,F -> L."""
    return (features != 0).float().sum(-1).mean(0)


# ----------------------------------------------------------------------------- activations


class JumpReLUFunction(torch.autograd.Function):
    """a = x · H(x - θ); ∂a/∂x = H(x - θ), ∂a/∂θ = -(θ/ε) K((x - θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        on = x > threshold
        ctx.save_for_backward(x, threshold, on)
        ctx.bandwidth = bandwidth
        return x * on  # a multiply by the mask: faster than torch.where on CPU, the same on GPU

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, threshold, on = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = grad_out * on if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            # θ is constant over the batch: sum the kernel-weighted gradient first, scale once.
            in_window = (x - threshold).abs() < eps / 2  # K((x - θ)/ε) = 1
            window_sum = (grad_out * in_window).sum_to_size(threshold.shape)
            grad_t = (-(threshold / eps) * window_sum).to(threshold.dtype)
        return grad_x, grad_t, None


class StepFunction(torch.autograd.Function):
    """H(x - θ); ∂H/∂x = 0, ∂H/∂θ = -(1/ε) K((x - θ)/ε) (straight-through). For an L0 penalty."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            in_window = (x - threshold).abs() < eps / 2
            window_sum = (grad_out * in_window).sum_to_size(threshold.shape)
            grad_t = (-(1.0 / eps) * window_sum).to(threshold.dtype)
        return grad_x, grad_t, None


def jumprelu(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return JumpReLUFunction.apply(x, threshold, bandwidth)


def step(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return StepFunction.apply(x, threshold, bandwidth)


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each token's k largest pre-activations per layer, ReLU'd: B,L,F -> B,L,F."""
    values, indices = pre.topk(k, dim=-1)  # B,L,k
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def batchtopk_activation(
    pre: torch.Tensor, k: int, scope: Literal["layer", "all"], distributed: bool = False
) -> torch.Tensor:
    """Keep the B·k largest pre-activations of each layer (or B·L·k over all layers), ReLU'd.
    distributed: B is the global batch of every rank of the process group (each holding B/world)."""
    B, L, F = pre.shape
    world = dist.get_world_size() if distributed and dist.is_initialized() else 1
    if world > 1:
        rows = pre.detach().transpose(0, 1).reshape(L, B * F)  # L,B*F
        if scope == "all":
            rows = rows.reshape(1, L * B * F)
        n_keep = B * world * k * (1 if scope == "layer" else L)  # over the global batch
        offer = rows.topk(min(n_keep, rows.shape[1]), dim=-1).values.contiguous()  # R,c
        gathered = [torch.empty_like(offer) for _ in range(world)]
        dist.all_gather(gathered, offer)
        theta = torch.cat(gathered, 1).topk(n_keep, dim=-1).values[:, -1]  # R
        theta = theta.view(1, -1, 1) if scope == "layer" else theta.view(1, 1, 1)
        return (pre * (pre >= theta)).relu()
    if scope == "layer":
        flat = pre.transpose(0, 1).reshape(L, B * F)  # L,B*F
        values, indices = flat.topk(B * k, dim=-1)
        kept = torch.zeros_like(flat).scatter(-1, indices, values.relu())
        return kept.view(L, B, F).transpose(0, 1)
    flat = pre.reshape(-1)  # B*L*F
    values, indices = flat.topk(B * L * k)
    return torch.zeros_like(flat).scatter(0, indices, values.relu()).view(B, L, F)


# ----------------------------------------------------------------------------- training kernels
# The training forward's fused pieces. Every tensor here is layer-major: pre, a [L,B,F].


class GatedPenaltiesFunction(torch.autograd.Function):
    """ReLU/JumpReLU features and the sums of both penalties, sparse wherever it can be:
        a = pre · 1[pre > θ]                       (θ = 0 for ReLU)
        S = Σ tanh(c · a · n)      P = Σ ReLU(-pre) · n      (n: decoder norms L,F; sums over L,B,F)
    Backward, with g = ∂/∂a + ∂S · c·n·(1 - tanh²) the gradient reaching a:
        ∂pre = g · 1[pre > θ] - ∂P · n · 1[pre < 0]           (θ > 0: the two never overlap)
        ∂θ   = -(θ/ε) Σ_b g · K((pre - θ)/ε)                  (JumpReLU's straight-through)
        ∂n   = ∂S · c · Σ_b a · (1 - tanh²) + ∂P · Σ_b ReLU(-pre)
    One pass over pre finds the "near" entries, pre > θ - ε/2 (ReLU: pre > 0): the active ones
    and JumpReLU's window below θ. Everything but a, P and ∂pre then runs over those alone
    (a few percent of L·B·F), g included: it is needed on near entries only. Also returns the
    near entries' flat positions l·B·F + b·F + f, sorted: the rows the sparse decoder reads.
    """

    @staticmethod
    def forward(ctx, pre, threshold, dec_norm, c: float, bandwidth: float):
        L, B, F = pre.shape
        acc = torch.promote_types(pre.dtype, torch.float32)  # the sums in float32 at least
        flat = pre.view(-1)
        cut = 0.0 if threshold is None else (threshold - bandwidth / 2).unsqueeze(1)  # L,1,F
        near = (pre > cut).view(-1).nonzero().squeeze(1)  # sorted flat positions
        norm_near = near // (B * F) * F + near % F  # l·F + f
        pre_near = flat[near]
        if threshold is None:
            on_near = in_window = None  # every near entry is active; no window
            active, norm_index, a_active = near, norm_near, pre_near
        else:
            th_near = threshold.view(-1)[norm_near]
            on_near = pre_near > th_near
            in_window = pre_near < th_near + bandwidth / 2  # and above θ - ε/2: |pre - θ| < ε/2
            active, norm_index, a_active = near[on_near], norm_near[on_near], pre_near[on_near]
        a = torch.zeros_like(pre)
        a.view(-1)[active] = a_active
        cn = c * dec_norm.to(acc).view(-1)[norm_index]  # N
        t = torch.mul(a_active.to(acc), cn).tanh_()  # tanh(c·a·n), 0 off the active entries
        sparsity = t.sum()
        neg_sum = pre.clamp(max=0).sum(1, dtype=acc).neg_()  # L,F: Σ_b ReLU(-pre)
        preact = (neg_sum * dec_norm.to(acc)).sum()
        ctx.save_for_backward(
            pre, threshold, dec_norm, near, norm_near, on_near, in_window,
            active, norm_index, a_active, t, neg_sum,
        )  # fmt: skip
        ctx.c, ctx.bandwidth = c, bandwidth
        ctx.mark_non_differentiable(near)
        return a, sparsity, preact, near

    @staticmethod
    def backward(ctx, grad_a, grad_s, grad_p, _grad_near):
        pre, threshold, dec_norm, near, norm_near, on_near, in_window, *rest = ctx.saved_tensors
        active, norm_index, a_active, t, neg_sum = rest
        c, eps = ctx.c, ctx.bandwidth
        L, B, F = pre.shape
        acc = t.dtype
        n = dec_norm.to(acc).view(-1)
        gsc = (grad_s if grad_s is not None else t.new_zeros(())) * c
        # g on the near entries: ∂/∂a + ∂S·c·n, less ∂S·c·n·t² on the active ones
        g = gsc * n[norm_near]
        if grad_a is not None:
            g = g + grad_a.reshape(-1)[near].to(acc)
        g_active = (g if on_near is None else g[on_near]) - gsc * n[norm_index] * t * t
        grad_threshold = None
        if threshold is not None and ctx.needs_input_grad[1]:
            g[on_near] = g_active
            window_sum = torch.zeros(L * F, dtype=acc, device=pre.device)
            window_sum.index_add_(0, norm_near[in_window], g[in_window])
            grad_threshold = (-(threshold / eps) * window_sum.view(L, F)).to(threshold.dtype)
        if grad_p is not None and float(grad_p) != 0:  # -∂P·n where pre < 0 (uint8: no bool cast)
            negative = (pre < 0).view(torch.uint8)
            grad_pre = torch.mul(negative, (-grad_p * n).view(L, 1, F).to(pre.dtype))
        else:
            grad_pre = torch.zeros_like(pre)
        grad_pre.view(-1)[active] = g_active.to(pre.dtype)  # pre > θ ≥ 0 there: no overlap
        grad_norm = None
        if ctx.needs_input_grad[2]:  # Σ_b a·(1 - t²) over the active entries, Σ_b ReLU(-pre)
            sech2_sum = torch.zeros(L * F, dtype=acc, device=pre.device)
            sech2_sum.index_add_(0, norm_index, a_active.to(acc) * (1 - t * t))
            grad_norm = gsc * sech2_sum.view(L, F)
            if grad_p is not None:
                grad_norm = grad_norm + grad_p * neg_sum
            grad_norm = grad_norm.to(dec_norm.dtype)
        return grad_pre, grad_threshold, grad_norm, None, None


class DenseDecodeFunction(torch.autograd.Function):
    """y[:, i + j] = Σ_i a_i · W_dec[i][:, j] (no bias): one GEMM per source layer, accumulated
    in place into the strided B,K_i·M view of one output; backward reads the same views.
    a: L,B,F (layer-major).  W_dec[i]: F,K_i,M.  Returns B,L,M in a's dtype."""

    @staticmethod
    def forward(ctx, a, *W_dec):
        L, B, F = a.shape
        M = W_dec[0].shape[-1]
        y = a.new_empty(B, L, M)
        for i, W in enumerate(W_dec):
            K = W.shape[1]
            out = y[:, i : i + K].view(B, K * M)  # row stride L*M
            W_i = W.to(a.dtype).view(F, K * M)
            if i == 0:  # the first source writes every layer it reaches: no zero fill
                if K < L:
                    y.zero_()
                    out.addmm_(a[0], W_i)
                else:
                    torch.mm(a[0], W_i, out=out)
            else:
                out.addmm_(a[i], W_i)
        ctx.save_for_backward(a, *W_dec)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        a, *W_dec = ctx.saved_tensors
        L, B, F = a.shape
        M = grad_y.shape[-1]
        grad_y = grad_y.to(a.dtype).contiguous()
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        grad_W = []
        for i, W in enumerate(W_dec):
            K = W.shape[1]
            g_i = grad_y[:, i : i + K].view(B, K * M)  # B,K*M
            if grad_a is not None:
                torch.mm(g_i, W.to(a.dtype).view(F, K * M).t(), out=grad_a[i])  # B,F
            if ctx.needs_input_grad[1 + i]:
                grad_W.append((a[i].t() @ g_i).view(F, K, M).to(W.dtype))  # F,K,M
            else:
                grad_W.append(None)
        return grad_a, *grad_W


def decode_selected_rows(
    indices: list[torch.Tensor],
    offsets: list[torch.Tensor],
    values: list[torch.Tensor],
    W_dec: Iterable[torch.Tensor],
    b_dec: torch.Tensor | None,
    batch: int,
) -> torch.Tensor:
    """The decoder from selected rows only: source layer i's token b adds Σ_j v_j · W_dec[i][f_j]
    over its features f_j (indices[i][offsets[i][b]:offsets[i][b+1]], weights values[i]): B,L,M.
    One weighted embedding bag per source layer; autograd's backward scatters into the rows
    used and takes each value's gradient as a dot product with them."""
    W_dec = list(W_dec)
    L, M = len(W_dec), W_dec[0].shape[-1]
    if b_dec is not None:
        y = b_dec.expand(batch, L, M).clone()
    else:
        y = W_dec[0].new_zeros(batch, L, M)
    for i, W in enumerate(W_dec):
        F, K, _ = W.shape
        out_i = nn.functional.embedding_bag(
            indices[i], W.view(F, K * M), offsets[i], mode="sum",
            per_sample_weights=values[i].to(W.dtype),
        )  # fmt: skip
        y[:, i : i + K] += out_i.view(batch, K, M)  # source i writes to layers i..i+K-1
    return y


def _bags(flat: torch.Tensor, F: int, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions b·F + f (any order) of one layer -> (features in token order, offsets
    B, the order taken)."""
    flat, order = flat.sort()
    counts = torch.bincount(flat // F, minlength=B)
    return flat % F, counts.cumsum(0) - counts, order


# ----------------------------------------------------------------------------- the CLT


class CrossLayerTranscoder(nn.Module):
    def __init__(self, cfg: CLTConfig):
        super().__init__()
        self.cfg = cfg
        L, F, M = cfg.n_layers, cfg.d_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, M))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(F, K, M)) for K in cfg.decoder_layers]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, M))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, F), math.log(cfg.initial_threshold)))
        # BatchTopK over the global batch of a DDP process group (the trainer sets it).
        self.distributed_batch = False
        # How training decodes: from the selected rows of W_dec ("always"), with dense GEMMs
        # ("never"), or "auto": sparse where k/F (TopK/BatchTopK) or the batch's active
        # fraction (ReLU/JumpReLU) is at most SPARSE_DECODE_MAX_DENSITY. A way of computing,
        # not part of the architecture.
        self.sparse_decode: Literal["auto", "always", "never"] = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Encoder rows of norm ≈ 1/√3 make pre-activations O(1) on unit-variance inputs; small
        # decoders keep the first reconstructions near b_dec.
        L, F, M = self.cfg.n_layers, self.cfg.d_features, self.cfg.d_model
        nn.init.uniform_(self.W_enc, -1 / math.sqrt(M), 1 / math.sqrt(M))
        for W in self.W_dec:
            nn.init.uniform_(W, -1 / math.sqrt(L * F), 1 / math.sqrt(L * F))

    @property
    def decodes_sparse(self) -> bool:
        """Whether training decodes TopK/BatchTopK features from their selected rows only
        (ReLU/JumpReLU choose per batch, on the fraction active)."""
        cfg = self.cfg
        if cfg.activation not in ("topk", "batchtopk") or self.sparse_decode == "never":
            return False
        if self.sparse_decode == "always":
            return True
        return cfg.k / cfg.d_features <= SPARSE_DECODE_MAX_DENSITY

    @property
    def num_features(self) -> int:
        return self.cfg.n_layers * self.cfg.d_features

    @property
    def threshold(self) -> torch.Tensor | None:
        """θ [L, F] for JumpReLU, else None."""
        return self.log_threshold.exp() if self.cfg.activation == "jumprelu" else None

    def flops_per_token(self, training: bool = True) -> int:
        """Matmul FLOPs per token. Training: the encoder twice (forward, weight gradient; inputs
        need no gradient) and the decoder three times (forward, weight and feature gradients)."""
        enc = 2 * self.cfg.n_layers * self.cfg.d_features * self.cfg.d_model
        dec = 2 * self.cfg.d_features * self.cfg.d_model * sum(self.cfg.decoder_layers)
        return 2 * enc + 3 * dec if training else enc + dec

    # ------------------------------------------------------------------ the three stages

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pre-activations: B,L,M -> B,L,F."""
        return torch.einsum("blm,lfm->blf", inputs, self.W_enc) + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Activations of every layer: B,L,F -> B,L,F (BatchTopK selects over the batch)."""
        if self.cfg.activation == "batchtopk":
            return batchtopk_activation(
                pre, self.cfg.k, self.cfg.batchtopk_scope, distributed=self.distributed_batch
            )
        return self._per_token(pre, self.threshold)

    def _per_token(self, pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        """relu, jumprelu (θ broadcast against `pre`) or topk over the last dimension."""
        cfg = self.cfg
        if cfg.activation == "relu":
            return pre.relu()
        if cfg.activation == "jumprelu":
            return jumprelu(pre, threshold, cfg.bandwidth)
        return topk_activation(pre, cfg.k)

    def decode(self, features: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """y_k = Σ_{i≤k} a_i · W_dec[i][:, k-i, :] (+ b_dec[k]): B,L,F -> B,L,M."""
        y = self._decode_dense(features.transpose(0, 1).contiguous())  # L,B,F in
        return y + self.b_dec if bias else y

    # ------------------------------------------------------------------ one layer at a time
    # For callers that run the CLT inside a model's forward pass (the splice, attribution,
    # feature statistics): the same weights and activation as the batched stages above.

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-activations of one layer: ...,M -> ...,F."""
        return x @ self.W_enc[layer].T + self.b_enc[layer]

    def activate_layer(self, pre: torch.Tensor, layer: int) -> torch.Tensor:
        """The activation on one layer's pre-activations (...,F). BatchTopK depends on the
        whole batch of every layer and has no per-layer form: convert it with `to_jumprelu`."""
        if self.cfg.activation != "batchtopk":
            threshold = self.threshold
            return self._per_token(pre, None if threshold is None else threshold[layer])
        raise ValueError(
            "a batchtopk CLT depends on the whole batch and cannot be applied layer by layer; "
            "convert it with CrossLayerTranscoder.to_jumprelu(inputs) first"
        )

    def decode_layer(
        self, features: torch.Tensor | list[torch.Tensor], layer: int, bias: bool = True
    ) -> torch.Tensor:
        """Output at `layer` from the features of layers 0..layer: features[i] (...,F) for
        i ≤ layer, a list or a ...,L,F tensor's layers (`features[..., i, :]`): ...,M."""
        parts = features if isinstance(features, list) else features.unbind(-2)
        y = None
        for i in range(layer + 1):
            offset, W = layer - i, self.W_dec[i]  # W: F,K_i,M
            if offset < W.shape[1]:  # a per-layer transcoder has no decoder to later layers
                term = parts[i] @ W[:, offset]
                y = term if y is None else y + term
        if y is None:
            y = parts[0].new_zeros(*parts[0].shape[:-1], self.cfg.d_model)
        return y + self.b_dec[layer] if bias else y

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec row|| of every feature, its decoders to all layers concatenated: L,F."""
        return torch.stack([W.pow(2).sum((1, 2)).sqrt() for W in self.W_dec])

    # ------------------------------------------------------------------ forward and losses

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        target_variance: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        with_preact: bool = True,
    ) -> CLTOutput:
        """inputs, targets: B,L,M. target_variance: L, the per-entry variance of each layer's
        targets (1 for normalised data; default: this batch's). dead: L,F bool (for AuxK).
        with_preact: False leaves TopK/BatchTopK's pre-activation loss at 0 (a run that does not
        weight it). Computes what `encode`, `activate` and `decode` do, layer-major (module docstring)."""
        cfg = self.cfg
        B = inputs.shape[0]
        # L,B,F: one batched GEMM with the bias; each layer's B,F block contiguous.
        pre = torch.baddbmm(
            self.b_enc.unsqueeze(1), inputs.transpose(0, 1), self.W_enc.transpose(1, 2)
        )
        if targets is None:
            features = self.activate(pre.transpose(0, 1)).transpose(0, 1).contiguous()  # L,B,F
            recon = self._decode_dense(features) + self.b_dec
            return CLTOutput(
                recon, features.transpose(0, 1), pre.transpose(0, 1), None, None, None, None
            )

        dec_norm = self.decoder_norms()  # L,F
        bags = None
        if cfg.activation in ("relu", "jumprelu"):
            features, sparsity, preact, near = GatedPenaltiesFunction.apply(
                pre, self.threshold, dec_norm, cfg.sparsity_c, cfg.bandwidth
            )
            if self.sparse_decode != "never":
                bags = self._gated_bags(near, features)
        else:
            features, bags, sparsity = self._select(pre, dec_norm)
            if with_preact:  # a pass over L,B,F forward and another backward: only when weighted
                neg_sum = pre.clamp(max=0).sum(1, dtype=torch.float32)  # L,F: -Σ_b ReLU(-pre)
                preact = -(neg_sum * dec_norm.float()).sum()
            else:
                preact = sparsity.new_zeros(())
        sparsity, preact = sparsity / B, preact / B
        if bags is not None:
            recon = decode_selected_rows(*bags, self.W_dec, self.b_dec, B)
        else:
            recon = self._decode_dense(features) + self.b_dec  # B,L,M

        targets = targets.float()
        if target_variance is None:
            target_variance = (targets - targets.mean(0)).pow(2).mean((0, 2))  # L
        nmse = ((recon.float() - targets).pow(2).mean((0, 2)) / target_variance).mean()
        auxk = nmse.new_zeros(())
        if cfg.activation in ("topk", "batchtopk") and dead is not None and bool(dead.any()):
            auxk = self._auxk_loss(pre, recon, targets, target_variance, dead)
        return CLTOutput(
            recon, features.transpose(0, 1), pre.transpose(0, 1), nmse, sparsity, preact, auxk
        )

    def _decode_dense(self, features: torch.Tensor) -> torch.Tensor:
        """L,B,F (layer-major) -> B,L,M without bias."""
        return DenseDecodeFunction.apply(features, *self.W_dec)

    def _gated_bags(self, used: torch.Tensor, features: torch.Tensor):
        """ReLU/JumpReLU features (L,B,F) as bags for `decode_selected_rows`, or None where
        the dense decoder is due ('auto' and more than SPARSE_DECODE_MAX_DENSITY of them in
        the bags). The bags hold every entry whose feature gradient is used (`used`, flat
        positions l·B·F + b·F + f, sorted: GatedPenaltiesFunction's near entries): the active
        ones and, for JumpReLU's threshold gradient, those in the window below θ (pre > θ - ε/2,
        with weight 0)."""
        L, B, F = features.shape
        if (
            self.sparse_decode == "auto"
            and used.numel() > SPARSE_DECODE_MAX_DENSITY * features.numel()
        ):
            return None
        values = features.view(-1)[used]
        per_layer = torch.bincount(used // (B * F), minlength=L).tolist()
        index, offsets = [], []
        for layer, flat in enumerate(used.split(per_layer)):
            flat = flat - layer * B * F  # b·F + f, in token order
            counts = torch.bincount(flat // F, minlength=B)
            index.append(flat % F)
            offsets.append(counts.cumsum(0) - counts)
        return index, offsets, list(values.split(per_layer))

    def _select(self, pre: torch.Tensor, dec_norm: torch.Tensor):
        """TopK/BatchTopK on layer-major pre-activations (L,B,F): the dense features (L,B,F),
        the bags for `decode_selected_rows` when this CLT decodes sparse (else None) and the summed
        sparsity penalty, Σ tanh(c · a · n) over the selected entries (tanh(0) = 0 elsewhere)."""
        cfg = self.cfg
        L, B, F = pre.shape
        if cfg.activation == "batchtopk" and (
            cfg.batchtopk_scope == "all" or (self.distributed_batch and dist.is_initialized())
        ):
            # Over all layers, or over the global batch: the stage function, densely.
            features = batchtopk_activation(
                pre.transpose(0, 1), cfg.k, cfg.batchtopk_scope, self.distributed_batch
            ).transpose(0, 1)
            t = torch.tanh(features.float() * (cfg.sparsity_c * dec_norm.float()).unsqueeze(1))
            return features.contiguous(), None, t.sum()
        if cfg.activation == "topk":
            index = pre.detach().topk(cfg.k, dim=-1).indices  # L,B,k
            values = pre.gather(-1, index).relu()
            features = torch.zeros_like(pre).scatter(-1, index, values)
            norms = dec_norm.unsqueeze(1).expand(L, B, F).gather(-1, index)  # L,B,k
        else:  # batchtopk, the B·k largest of each layer
            flat = pre.view(L, B * F)
            index = flat.detach().topk(B * cfg.k, dim=-1).indices  # L,B*k
            values = flat.gather(-1, index).relu()
            features = torch.zeros_like(flat).scatter(-1, index, values).view(L, B, F)
            norms = dec_norm.gather(-1, index % F)  # L,B*k
        sparsity = torch.tanh(values.float() * (cfg.sparsity_c * norms.float())).sum()
        if not self.decodes_sparse:
            return features, None, sparsity
        if cfg.activation == "topk":
            offsets = torch.arange(0, B * cfg.k, cfg.k, device=pre.device)
            bags = ([i.reshape(-1) for i in index], [offsets] * L, [v.reshape(-1) for v in values])
        else:
            per_layer = [_bags(index[i], F, B) for i in range(L)]
            bags = (
                [f for f, _, _ in per_layer],
                [o for _, o, _ in per_layer],
                [values[i][order] for i, (_, _, order) in enumerate(per_layer)],
            )
        return features, bags, sparsity

    def _auxk_loss(self, pre, recon, targets, target_variance, dead) -> torch.Tensor:
        """Residual reconstructed by each token's top-k_aux dead features (per layer).
        pre: L,B,F (layer-major)."""
        L, B, F = pre.shape
        k_aux = min(self.cfg.k_aux or self.cfg.d_model // 2, F)
        dead_pre = pre.masked_fill(~dead.unsqueeze(1), float("-inf"))  # L,B,F
        values, index = dead_pre.topk(k_aux, dim=-1)  # L,B,k_aux; -inf where a layer has fewer dead
        values = values.relu()
        residual = (targets - recon.float()).detach()  # B,L,M
        if self.decodes_sparse:
            offsets = torch.arange(0, B * k_aux, k_aux, device=pre.device)
            aux_recon = decode_selected_rows(
                [i.reshape(-1) for i in index], [offsets] * L, [v.reshape(-1) for v in values],
                self.W_dec, None, B,
            )  # fmt: skip
        else:
            aux_features = torch.zeros_like(pre).scatter(-1, index, values)
            aux_recon = self._decode_dense(aux_features)
        scale = (dead.sum() / (k_aux * L)).clamp(max=1.0)
        return scale * ((aux_recon.float() - residual).pow(2).mean((0, 2)) / target_variance).mean()

    # ------------------------------------------------------------------ initialisation from data

    @torch.no_grad()
    def init_from_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor, fire_rate: float
    ) -> None:
        """Set b_enc so each feature fires on a `fire_rate` fraction of `inputs` (N,L,M), and
        b_dec to the targets' mean. TopK/BatchTopK need positive pre-activations to select
        from: there the rate is at least min(1/2, 2k/F), about 2k positive per token."""
        if not 0 < fire_rate < 1:
            raise ValueError(f"fire_rate must be in (0, 1), got {fire_rate}")
        if self.cfg.activation in ("topk", "batchtopk"):
            fire_rate = max(fire_rate, min(0.5, 2 * self.cfg.k / self.cfg.d_features))
        N = inputs.shape[0]
        pre = torch.einsum("blm,lfm->blf", inputs.to(self.W_enc), self.W_enc)  # N,L,F (no bias)
        cut = self.threshold if self.cfg.activation == "jumprelu" else torch.zeros_like(self.b_enc)
        # The (1 - rate) quantile over tokens: the value above which a `rate` fraction lies.
        rank = min(N, max(1, math.ceil((1 - fire_rate) * N)))
        quantile = pre.kthvalue(rank, dim=0).values  # L,F
        self.b_enc.copy_(cut - quantile)
        self.b_dec.copy_(targets.to(self.b_dec).mean(0))

    @torch.no_grad()
    def to_jumprelu(self, inputs: torch.Tensor) -> CrossLayerTranscoder:
        """A JumpReLU copy of this TopK/BatchTopK CLT, thresholds calibrated on `inputs` (N,L,M)
        so its L0 there equals this CLT's (one threshold per layer, or one for all layers with
        batchtopk_scope 'all'). BatchTopK depends on the batch; JumpReLU does not."""
        return self.with_thresholds(jumprelu_thresholds(self, [inputs], inputs.shape[0]))

    @torch.no_grad()
    def with_thresholds(self, theta: torch.Tensor) -> CrossLayerTranscoder:
        """A JumpReLU copy of this CLT with threshold theta[l] for every feature of layer l."""
        L, F = self.cfg.n_layers, self.cfg.d_features
        new_cfg = self.cfg.model_copy(update={"activation": "jumprelu"})
        with torch.device("meta"):
            clt = CrossLayerTranscoder(new_cfg)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state["log_threshold"] = theta.log()[:, None].expand(L, F).to(self.b_enc).clone()
        clt.load_state_dict(state, assign=True)
        return clt


@torch.no_grad()
def jumprelu_thresholds(
    clt: CrossLayerTranscoder, batches: Iterable[torch.Tensor], n_tokens: int, world: int = 1
) -> torch.Tensor:
    """Thresholds θ [L] under which a JumpReLU copy of the TopK/BatchTopK `clt` fires as often
    as `clt` does on `batches` (inputs B,L,M; `n_tokens` at most in all, over all ranks): per
    layer, θ is the largest pre-activation that must stay off. Streams: it keeps at most the
    n_tokens·k largest pre-activations of each layer (n_tokens·L·k with one scope 'all').
    Under DDP (`world` > 1) every rank passes its own share and gets the same θ."""
    cfg = clt.cfg
    if cfg.activation not in ("topk", "batchtopk"):
        raise ValueError(f"to_jumprelu converts topk/batchtopk CLTs, not {cfg.activation!r}")
    L = cfg.n_layers
    one = cfg.activation == "batchtopk" and cfg.batchtopk_scope == "all"
    cap = n_tokens * cfg.k * (L if one else 1) + 1  # the most that can fire, and one more
    active = torch.zeros(L, dtype=torch.float64, device=clt.b_enc.device)
    kept: torch.Tensor | None = None  # R,c: the largest pre-activations so far
    for inputs in batches:
        pre = clt.encode(inputs.to(clt.W_enc)).float()  # N,L,F
        active += (clt.activate(pre) != 0).sum((0, 2)).double()
        rows = pre.transpose(0, 1).reshape(1 if one else L, -1)  # R,N*F
        if kept is not None:
            rows = torch.cat([kept, rows], 1)
        kept = rows.topk(min(cap, rows.shape[1]), dim=-1).values
    if kept is None:
        raise ValueError("no calibration batch for the JumpReLU thresholds")
    if world > 1:
        width = torch.tensor([kept.shape[1]], device=kept.device)
        dist.all_reduce(active)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # all_gather needs equal shapes
        pad = kept.new_full((kept.shape[0], int(width) - kept.shape[1]), float("-inf"))
        kept = torch.cat([kept, pad], 1)
        gathered = [torch.empty_like(kept) for _ in range(world)]
        dist.all_gather(gathered, kept)
        kept = torch.cat(gathered, 1)
    n_on = active.sum().view(1) if one else active  # R
    theta = torch.stack([_count_threshold(v, int(n)) for v, n in zip(kept, n_on, strict=True)])
    return theta.expand(L) if one else theta


def _count_threshold(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The θ > 0 for which exactly `n_keep` of `values` (the largest ones, sorted or not)
    satisfy value > θ (ties aside)."""
    if n_keep >= values.numel():
        return values.new_tensor(1e-8)
    kth = values.topk(n_keep + 1).values[-1]  # the largest value that must stay off
    return kth.clamp(min=1e-8)
