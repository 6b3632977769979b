"""A decoder-only transformer in plain torch, GPT-2 and Llama families, with gated sparse attention.

Shape letters, used in every shape comment below:
    B batch, T query positions, S key positions (S == T here), H query heads,
    K key/value heads (grouped-query attention: H is a multiple of K), D head dim,
    M d_model, F d_mlp, V vocab, L layers.

The places that later stages capture or freeze are `HookPoint`s (identities a torch forward
hook can read or overwrite), named in plain sight:

    blocks.{l}.hook_resid_pre      residual stream entering block l            [B, T, M]
    blocks.{l}.attn_norm.hook_scale  the norm's per-token scale 1/sqrt(var+eps) [B, T, 1]
    blocks.{l}.attn.hook_q / hook_k / hook_v   after RoPE                       [B, H|K, T, D]
    blocks.{l}.attn.hook_pattern   attention pattern after the gate             [B, H, T, S]
    blocks.{l}.attn.hook_z         attention output per head, before o_proj     [B, T, H, D]
    blocks.{l}.hook_attn_out       attention block output                       [B, T, M]
    blocks.{l}.mlp_norm.hook_scale
    blocks.{l}.hook_mlp_in         the MLP's normalised input (a CLT's input)   [B, T, M]
    blocks.{l}.hook_mlp_out        the MLP's output (a CLT's target)            [B, T, M]
    final_norm.hook_scale

Gated attention follows arXiv 2512.05865: p = causal softmax over all keys, gate logit
g = s + b, z = 1[g + noise > 0] in training (straight-through) and 1[g > 0] at inference,
output sum_j p_ij z_ij v_j with no renormalisation. Two paths compute it, chosen by
`Transformer.set_gated_impl`: "reference" materialises the T x T pattern (the default, and
always taken while a hook reads or replaces hook_pattern, as attribution does); "tiled" is
one operation (gated_attention.py) that never holds a T x T tensor, which sparsify runs.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from .gated_attention import gated_attention

GateMode = Literal["off", "stochastic", "hard"]
# "tiled": one memory-efficient operation (gated_attention.py); "reference": materialise the
# T x T pattern (the path a hook on hook_pattern always takes)
GatedImpl = Literal["reference", "tiled"]


class GateConfig(BaseModel):
    """Gate settings a sparsified model carries in its config.json."""

    model_config = ConfigDict(extra="forbid")
    offset: float = Field(
        0.0, description="Gate offset b used at inference (annealed to 0 by post-training)."
    )


class ModelConfig(BaseModel):
    """Architecture of one model; the fields of our config.json."""

    model_config = ConfigDict(extra="forbid")
    family: Literal["gpt2", "llama"] = Field(
        description="gpt2: LayerNorm, learned positions, GELU MLP. llama: RMSNorm, RoPE, SwiGLU, GQA."
    )
    vocab_size: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(None, description="Key/value heads (GQA); defaults to n_heads.")
    d_head: int | None = Field(None, description="Head dim; defaults to d_model // n_heads.")
    d_mlp: int = Field(gt=0)
    context_length: int = Field(gt=0, description="Longest sequence the model accepts.")
    norm_eps: float = 1e-5
    bias: bool = Field(False, description="Biases on every linear and norm (GPT-2).")
    qkv_bias: bool = Field(False, description="Biases on q/k/v projections only (Qwen2).")
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = Field(None, description="Llama-3 style RoPE frequency scaling.")
    mlp_activation: Literal["gelu_tanh", "gelu", "silu"] | None = Field(
        None, description="Defaults: gelu_tanh for gpt2, silu (SwiGLU) for llama."
    )
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    gate: GateConfig | None = Field(None, description="Present on a sparsified model.")

    @model_validator(mode="after")
    def _fill_and_check(self) -> ModelConfig:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.family == "llama" and self.d_head % 2:
            raise ValueError(f"RoPE needs an even d_head, got {self.d_head}")
        if self.mlp_activation is None:
            self.mlp_activation = "gelu_tanh" if self.family == "gpt2" else "silu"
        return self


class HookPoint(nn.Identity):
    """A named place in the forward pass: torch forward hooks on it read or replace the value."""


# ----------------------------------------------------------------------------- norms


class LayerNorm(nn.Module):
    """GPT-2 LayerNorm with its per-token scale exposed, so attribution can freeze it."""

    def __init__(self, d: int, eps: float, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None
        self.hook_scale = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))  # B,T,1
        y = x * scale * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """Llama RMSNorm with its per-token scale exposed; computed in fp32 like the reference."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = self.hook_scale(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))  # B,T,1
        return self.weight * (x32 * scale).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


# ----------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2, dtype=torch.float64) / cfg.d_head)
    )
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face Llama convention). x: B,H,T,D; cos/sin: T,D."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- attention


class GateStats(NamedTuple):
    """Per-(batch, head) gate statistics of one layer."""

    expected_open: torch.Tensor  # B,H  mean sigmoid(g) over causal pairs (differentiable)
    open_edges: torch.Tensor  # B,H  count of causal pairs with g > 0 (deterministic gate)
    empty_queries: torch.Tensor  # B,H  queries with no open key


def causal_pair_count(T: int) -> int:
    return T * (T + 1) // 2


def gated_pattern(
    q: torch.Tensor,
    k: torch.Tensor,
    offset: float,
    mode: GateMode,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GateStats | None]:
    """One layer's attention pattern after the gate: returns (pattern B,H,T,S, gate statistics,
    None when the gate is off). `noise`: the stochastic gates' logistic noise [B,H,T,S] (e.g.
    `gated_attention.logistic_noise`, what the tiled operation draws); default: a fresh draw.

    T x T steps run in place wherever the backward does not need the overwritten value (the
    same arithmetic, so the same results), which keeps the peak near the tensors backward saves.
    """
    T, S = q.shape[-2], k.shape[-2]
    causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = (q @ k.transpose(-1, -2)).div_(math.sqrt(q.shape[-1]))  # B,H,T,S
    scores.masked_fill_(~causal, float("-inf"))
    p = scores.softmax(-1)  # the ordinary causal softmax over all keys
    if mode == "off":
        return p, None
    # Gate logit, in place: softmax's backward needs its output only. -inf off the causal
    # mask, so closed there.
    g = scores.add_(offset)
    del scores
    expected_open = torch.sigmoid(g).sum((-1, -2)) / causal_pair_count(T)  # B,H
    hard = g > 0  # the deterministic gate, counted before noise goes into g in place
    stats = GateStats(expected_open, hard.sum((-1, -2)), (~hard.any(-1)).sum(-1))
    if mode == "stochastic":
        if noise is None:
            u = torch.rand_like(g).clamp_(1e-6, 1 - 1e-6)
            log1m_u = u.neg().log1p_()
            noise = u.log_().sub_(log1m_u)  # logistic noise log(u) - log(1 - u)
            del u, log1m_u
        noisy = g.add_(noise)
        del g, noise
        soft = torch.sigmoid(noisy)
        z = (noisy > 0).to(soft.dtype).add_(soft).sub_(soft.detach())  # straight-through
        del noisy
    else:
        z = hard.to(p.dtype)
    return p * z, stats  # not renormalised: a query with no open key outputs 0


def apply_pattern(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """pattern [B or 1, H, T, S] @ v [B, H, S, D] -> [B, H, T, D].

    A pattern given with batch 1 (a frozen one) is applied as one matmul per head with the
    batch folded into the columns, never copied B times; it may be a sparse COO tensor (a
    sparsified model's frozen pattern: ~1 % of it nonzero), which costs by its nonzeros."""
    if pattern.shape[0] != 1:
        return pattern @ v
    B, H, S, D = v.shape
    columns = v.permute(1, 2, 0, 3).reshape(H, S, B * D)  # H,S,B*D
    out = torch.bmm(pattern[0], columns) if pattern.is_sparse else pattern[0] @ columns
    return out.view(H, -1, B, D).permute(2, 0, 1, 3)  # B,H,T,D


def gated_attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: float, mode: GateMode
) -> tuple[torch.Tensor, GateStats | None]:
    """One layer's gated attention: returns (output B,H,T,D, gate statistics). Holds this
    layer's T x T tensors only; callers checkpoint it so backward recomputes them instead of
    keeping every layer's."""
    pattern, stats = gated_pattern(q, k, offset, mode)
    return pattern @ v, stats


def tiled_gated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: float, mode: GateMode
) -> tuple[torch.Tensor, GateStats]:
    """`gated_attention_core` as one tiled operation that holds no T x T tensor; k and v may
    keep their K grouped heads. Stochastic noise comes from a hash seeded by torch's generator."""
    res = gated_attention(q, k, v, offset=offset, mode=mode)
    return res.out, GateStats(res.expected_open, res.open_edges, res.empty_queries)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, K, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.n_heads, self.n_kv_heads, self.d_head = H, K, D
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(M, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(M, K * D, bias=qkv_bias)
        self.v_proj = nn.Linear(M, K * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, M, bias=cfg.bias)
        self.use_rope = cfg.family == "llama"
        # The gate: no parameters of its own. Its mode and offset are set on the whole model.
        self.gate_mode: GateMode = "off"
        self.gate_offset = 0.0
        self.gated_impl: GatedImpl = "reference"
        self.last_gate_stats: GateStats | None = None
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.d_head
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # B,H,T,D
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # B,K,T,D
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # B,K,T,D
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        pattern_hooked = bool(self.hook_pattern._forward_hooks)
        tiled = self.gated_impl == "tiled" and self.gate_mode != "off" and not pattern_hooked
        if K != H and not tiled:  # the tiled operation shares grouped heads itself
            k = k.repeat_interleave(H // K, dim=1)  # B,H,T,D
            v = v.repeat_interleave(H // K, dim=1)
        if tiled:
            out, stats = tiled_gated_attention(q, k, v, self.gate_offset, self.gate_mode)
        elif self.gate_mode == "off" and not pattern_hooked:
            out, stats = F.scaled_dot_product_attention(q, k, v, is_causal=True), None  # B,H,T,D
        elif pattern_hooked:
            # A hook reads or replaces the pattern: materialise it and apply it here.
            pattern, stats = gated_pattern(q, k, self.gate_offset, self.gate_mode)
            out = apply_pattern(self.hook_pattern(pattern), v)
        elif torch.is_grad_enabled():
            out, stats = checkpoint(
                gated_attention_core, q, k, v, self.gate_offset, self.gate_mode, use_reentrant=False
            )
        else:
            out, stats = gated_attention_core(q, k, v, self.gate_offset, self.gate_mode)
        self.last_gate_stats = stats
        z = self.hook_z(out.transpose(1, 2))  # B,T,H,D
        return self.o_proj(z.reshape(B, T, H * D))


# ----------------------------------------------------------------------------- MLP and block


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        M, F_ = cfg.d_model, cfg.d_mlp
        self.gated = cfg.family == "llama"  # SwiGLU
        if self.gated:
            self.gate_proj = nn.Linear(M, F_, bias=False)
        self.up_proj = nn.Linear(M, F_, bias=cfg.bias)
        self.down_proj = nn.Linear(F_, M, bias=cfg.bias)
        self.act = {
            "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
            "gelu": F.gelu,
            "silu": F.silu,
        }[cfg.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = x + self.hook_attn_out(self.attn(self.attn_norm(x), rope))
        x = x + self.hook_mlp_out(self.mlp(self.hook_mlp_in(self.mlp_norm(x))))
        return x


# ----------------------------------------------------------------------------- the model


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # B,T,V
    loss: torch.Tensor | None  # mean next-token cross-entropy where targets were given
    gate_stats: list[GateStats] | None  # one per layer while gates are on


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.context_length, cfg.d_model) if cfg.family == "gpt2" else None
        )
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.hook_embed = HookPoint()
        if cfg.family == "llama":
            self.register_buffer("rope_inv_freq", rope_inverse_frequencies(cfg), persistent=False)
        self.apply(self._init_weights)
        if cfg.gate is not None:
            self.set_gate("hard", cfg.gate.offset)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # --- gates
    def set_gate(self, mode: GateMode, offset: float = 0.0) -> None:
        """Switch every layer's gate: off (dense), stochastic (training) or hard (inference)."""
        for block in self.blocks:
            block.attn.gate_mode, block.attn.gate_offset = mode, float(offset)

    def set_gated_impl(self, impl: GatedImpl) -> None:
        """Choose every layer's gated path: "tiled" or "reference" (see GatedImpl)."""
        for block in self.blocks:
            block.attn.gated_impl = impl

    @property
    def gate_mode(self) -> GateMode:
        return self.blocks[0].attn.gate_mode

    # --- forward
    def rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.pos_embed is not None:
            return None
        angles = torch.outer(
            torch.arange(T, device=device, dtype=torch.float32), self.rope_inv_freq
        )  # T,D/2
        angles = torch.cat((angles, angles), dim=-1)  # T,D
        # Angles in fp32 for accuracy, cos/sin in the weights' dtype (as the reference) so that
        # a bf16/fp16 model's q and k keep their dtype.
        dtype = self.embed.weight.dtype
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        B, T = tokens.shape
        if T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {T} tokens is longer than the context length {self.cfg.context_length}"
            )
        x = self.embed(tokens)  # B,T,M
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=tokens.device))
        x = self.hook_embed(x)
        rope = self.rope(T, tokens.device)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.final_norm(x))  # B,T,V
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        stats = [b.attn.last_gate_stats for b in self.blocks] if self.gate_mode != "off" else None
        return ModelOutput(logits, loss, stats)

    # --- bookkeeping
    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameters, tied ones once; non_embedding leaves out learned positions (as nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_embed is not None:
            n -= self.pos_embed.weight.numel()
        return n

    def flops_per_token(self, T: int) -> float:
        """Forward+backward FLOPs per token (PaLM appendix B): 6N plus attention's 12*L*H*D*T."""
        cfg = self.cfg
        return 6 * self.num_parameters() + 12 * cfg.n_layers * cfg.n_heads * cfg.d_head * T

    def hook_points(self) -> dict[str, HookPoint]:
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}
