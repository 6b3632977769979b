"""The replacement model: the model with each MLP output replaced by the CLT's reconstruction
plus an error term, and the prompt run that fixes everything attribution freezes.

Shape letters: T positions, S key positions, H heads, L layers, M d_model, F features per
layer, V vocab.

On the prompt, the original model's MLP output at layer l is split exactly into
    mlp_out_l = Σ_{i≤l} a_i · W_dec[i][:, l-i] + b_dec[l] + error_l
and `PromptRun` keeps every term, together with the values the linear replacement model
freezes: attention patterns (for a sparsified model the gated pattern, exactly zero on closed
edges) and the norms' per-token scales.

BOS positions hold no features when the CLT was trained without BOS rows (harvest's default,
recorded in the store's `include_bos`): there the reconstruction is zero (no b_dec either) and
the error node carries the whole MLP output, as the splice keeps the real MLP output there.

Embedding nodes (`embedding`): "token+position" (ours) holds the whole embedding the first
block reads, the token embedding plus a GPT-2 model's learned position embedding;
"token" (circuit-tracer's) holds the token embedding alone, and the position embedding joins
the biases that no node explains. A RoPE model has no position embedding: the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..clt.harvest import bos_mask
from ..clt.model import CrossLayerTranscoder
from ..clt.splice import check_compatible
from ..errors import StageError
from ..sparse_attention.hooks import capture
from ..sparse_attention.model import Transformer

EmbeddingConvention = Literal["token+position", "token"]
EMBEDDING_CONVENTIONS: dict[str, str] = {
    "token+position": "token embedding plus learned position embedding (sparse-circuits)",
    "token": "token embedding alone (circuit-tracer); the position embedding is left with the biases",
}


def clt_include_bos(clt_info: dict | None) -> bool:
    """Whether the CLT was trained on BOS rows: its activation store's `include_bos` (harvest
    leaves them out by default, and so does a CLT that records no store)."""
    attrs = ((clt_info or {}).get("activations") or {}).get("attrs") or {}
    return bool(attrs.get("include_bos", False))


def norm_scale_hooks(n_layers: int) -> list[str]:
    """Every norm's per-token scale: the nonlinear part of a norm that attribution freezes."""
    names = [
        f"blocks.{li}.{n}.hook_scale" for li in range(n_layers) for n in ("attn_norm", "mlp_norm")
    ]
    return names + ["final_norm.hook_scale"]


def check_tokens(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """A prompt as a 1-D long tensor of valid ids no longer than the context."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise StageError(
            f"a prompt is a non-empty 1-D sequence of token ids, got shape {tuple(tokens.shape)}"
        )
    T, cfg = tokens.numel(), model.cfg
    if T > cfg.context_length:
        raise StageError(
            f"the prompt has {T} tokens, more than the model's context length {cfg.context_length}"
        )
    bad = tokens[(tokens < 0) | (tokens >= cfg.vocab_size)]
    if bad.numel():
        raise StageError(
            f"token id {int(bad[0])} is outside the model's vocabulary of {cfg.vocab_size}"
        )
    return tokens


@dataclass
class PromptRun:
    """One clean forward pass of the original model on a prompt, split into CLT terms."""

    tokens: torch.Tensor  # T
    logits: torch.Tensor  # T,V  the original model's
    embeddings: torch.Tensor  # T,M  the embedding nodes' vectors (see `embedding` above)
    embedding_rest: torch.Tensor  # T,M  the rest of hook_embed: zero, or the position embedding
    feature_mask: torch.Tensor  # T bool  positions with features (False at BOS, see above)
    patterns: list[torch.Tensor]  # L x [H,T,S]  after the gate
    scales: dict[str, torch.Tensor]  # norm hook name -> [T,1]
    queries: list[torch.Tensor]  # L x [H,T,D]  after RoPE
    keys: list[torch.Tensor]  # L x [K,T,D]
    mlp_in: torch.Tensor  # L,T,M
    mlp_out: torch.Tensor  # L,T,M
    pre_acts: torch.Tensor  # T,L,F  CLT pre-activations
    features: torch.Tensor  # T,L,F  CLT activations
    reconstruction: torch.Tensor  # L,T,M  decoder outputs including b_dec
    errors: torch.Tensor  # L,T,M  mlp_out - reconstruction

    @property
    def n_pos(self) -> int:
        return self.tokens.numel()

    def prefix(self, n: int) -> PromptRun:
        """The run on the first n positions: a causal model's values there are the same."""
        return PromptRun(
            tokens=self.tokens[:n],
            logits=self.logits[:n],
            embeddings=self.embeddings[:n],
            embedding_rest=self.embedding_rest[:n],
            feature_mask=self.feature_mask[:n],
            patterns=[p[:, :n, :n] for p in self.patterns],
            scales={k: v[:n] for k, v in self.scales.items()},
            queries=[q[:, :n] for q in self.queries],
            keys=[k[:, :n] for k in self.keys],
            mlp_in=self.mlp_in[:, :n],
            mlp_out=self.mlp_out[:, :n],
            pre_acts=self.pre_acts[:n],
            features=self.features[:n],
            reconstruction=self.reconstruction[:, :n],
            errors=self.errors[:, :n],
        )

    def active_features(self) -> torch.Tensor:
        """(layer, pos, index) of every active feature, sorted in that order: N,3."""
        pos, layer, index = self.features.nonzero(as_tuple=True)
        order = torch.argsort((layer * self.n_pos + pos) * self.features.shape[-1] + index)
        return torch.stack((layer, pos, index), dim=1)[order]

    def featureless_positions(self) -> list[int]:
        """Positions that hold no features (BOS)."""
        return (~self.feature_mask).nonzero().squeeze(1).tolist()


class ReplacementModel:
    """A model and a CLT that replaces its MLPs; computes prompt runs.

    include_bos: whether BOS positions get features; default: as the CLT was trained
    (`clt_info`'s store). embedding: what an embedding node holds (module docstring)."""

    def __init__(
        self,
        model: Transformer,
        clt: CrossLayerTranscoder,
        clt_info: dict | None = None,
        *,
        include_bos: bool | None = None,
        embedding: EmbeddingConvention = "token+position",
    ):
        check_compatible(model, clt, clt_info)
        if embedding not in EMBEDDING_CONVENTIONS:
            raise StageError(
                f"embedding must be one of {sorted(EMBEDDING_CONVENTIONS)}, got {embedding!r}"
            )
        self.model, self.clt = model.eval(), clt.eval()
        self.include_bos = clt_include_bos(clt_info) if include_bos is None else include_bos
        # Without a learned position embedding (RoPE) the conventions agree: call it "token".
        self.embedding = embedding if model.pos_embed is not None else "token"

    def feature_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """T bool: the positions that hold features (not BOS, unless the CLT saw BOS rows)."""
        return bos_mask(tokens, self.cfg.bos_token_id, self.include_bos)

    def activate(self, pre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CLT's activations of pre-activations T,L,F at the positions in `mask` (T bool),
        as a batch of those rows (BatchTopK selects among them); zero elsewhere."""
        if bool(mask.all()):
            return self.clt.activate(pre)
        features = torch.zeros_like(pre)
        features[mask] = self.clt.activate(pre[mask])
        return features

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def encoder_dtype(self) -> torch.dtype:
        return self.clt.W_enc.dtype

    @torch.no_grad()
    def run_prompt(self, tokens: torch.Tensor) -> PromptRun:
        tokens = check_tokens(self.model, tokens).to(self.device)
        L = self.cfg.n_layers
        per_layer = (
            "attn.hook_pattern",
            "attn.hook_q",
            "attn.hook_k",
            "hook_mlp_in",
            "hook_mlp_out",
        )
        names = ["hook_embed", *norm_scale_hooks(L)] + [
            f"blocks.{li}.{n}" for li in range(L) for n in per_layer
        ]
        with capture(self.model, names) as got:
            logits = self.model(tokens[None]).logits[0]  # T,V
        mlp_in = torch.stack([got[f"blocks.{li}.hook_mlp_in"][0] for li in range(L)])  # L,T,M
        mlp_out = torch.stack([got[f"blocks.{li}.hook_mlp_out"][0] for li in range(L)])
        clt_dtype = self.encoder_dtype()
        mask = self.feature_mask(tokens)  # T
        pre = self.clt.encode(mlp_in.transpose(0, 1).to(clt_dtype))  # T,L,F
        features = self.activate(pre, mask)
        recon = self.clt.decode(features) * mask[:, None, None]  # T,L,M; no b_dec at BOS
        recon = recon.transpose(0, 1).to(mlp_out.dtype)  # L,T,M
        embedded = got["hook_embed"][0]  # T,M
        vectors = embedded if self.embedding == "token+position" else self.model.embed(tokens)
        return PromptRun(
            tokens=tokens,
            logits=logits,
            embeddings=vectors,
            embedding_rest=embedded - vectors,
            feature_mask=mask,
            patterns=[got[f"blocks.{li}.attn.hook_pattern"][0] for li in range(L)],
            scales={n: got[n][0] for n in norm_scale_hooks(L)},
            queries=[got[f"blocks.{li}.attn.hook_q"][0] for li in range(L)],
            keys=[got[f"blocks.{li}.attn.hook_k"][0] for li in range(L)],
            mlp_in=mlp_in,
            mlp_out=mlp_out,
            pre_acts=pre,
            features=features,
            reconstruction=recon,
            errors=mlp_out - recon,
        )

    def activate_layer(
        self, pre_layer: torch.Tensor, layer: int, pre_all: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Activations of one layer from its pre-activations (T,F) at the positions in `mask`;
        `pre_all` (T,L,F) supplies the other layers for batch-wide activations (BatchTopK)."""
        if self.clt.cfg.activation != "batchtopk":
            return self.clt.activate_layer(pre_layer, layer) * mask[:, None]
        pre = pre_all.clone()
        pre[:, layer] = pre_layer
        return self.activate(pre, mask)[:, layer]

    def decoder_output(
        self, features: torch.Tensor, layer: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """Σ_{i≤layer} a_i · W_dec[i][:, layer-i] + b_dec[layer] for activations T,L,F at the
        positions in `mask` (T bool), zero elsewhere: T,M."""
        return self.clt.decode_layer(features, layer) * mask[:, None]
