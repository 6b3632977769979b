"""The transformer and its gated sparse attention, against the semantics in DESIGN.md.

Shape letters as in model.py: B batch, T positions, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from sparse_circuits.sparse_attention import model as model_module
from sparse_circuits.sparse_attention.hooks import capture, freeze, hooks
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer
from sparse_circuits.sparse_attention.modeldir import load_model, save_model

V, T, B = 40, 10, 2
GPT2 = dict(
    family="gpt2",
    vocab_size=V,
    n_layers=2,
    d_model=16,
    n_heads=2,
    d_mlp=48,
    context_length=16,
    bias=True,
)
LLAMA = dict(
    family="llama", vocab_size=V, n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_mlp=48, context_length=16,
    tie_embeddings=False,
)  # fmt: skip
FAMILIES = {"gpt2": GPT2, "llama": LLAMA}


def make_model(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    """A random model with weights large enough that attention patterns are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**FAMILIES[family], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.4)
            elif name.endswith("weight"):  # a norm's gain
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def tokens(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (B, t), generator=torch.Generator().manual_seed(seed))


def by_hand_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """s_ij = q_i . k_j / sqrt(D) with key/value head h // (H/K) serving query head h. q: B,H,T,D; k: B,K,T,D."""
    H, K = q.shape[1], k.shape[1]
    k = k[:, torch.arange(H) // (H // K)]  # B,H,T,D
    return torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])


def kv_for_queries(v: torch.Tensor, H: int) -> torch.Tensor:
    return v[:, torch.arange(H) // (H // v.shape[1])]


CAUSAL = torch.ones(T, T, dtype=torch.bool).tril()


def causal_softmax(s: torch.Tensor) -> torch.Tensor:
    return s.masked_fill(~CAUSAL[: s.shape[-2], : s.shape[-1]], float("-inf")).softmax(-1)


# ----------------------------------------------------------------------------- gates off = causal attention


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gates_off_equal_standard_causal_attention(family):
    model = make_model(family)
    attn, cfg = model.blocks[0].attn, model.cfg
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    x = torch.randn(B, T, cfg.d_model)

    # by hand from the layer's weights
    q = (
        F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, H, D).transpose(1, 2)
    )  # B,H,T,D
    k = (
        F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, K, D).transpose(1, 2)
    )  # B,K,T,D
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, K, D).transpose(1, 2)
    if family == "llama":  # rotate-half RoPE, theta 10000
        inv_freq = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
        angles = torch.arange(T).float()[:, None] * inv_freq[None]  # T,D/2
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # T,D
        rot = lambda t: t * cos + torch.cat((-t[..., D // 2 :], t[..., : D // 2]), -1) * sin  # noqa: E731
        q, k = rot(q), rot(k)
    o = F.scaled_dot_product_attention(
        q, kv_for_queries(k, H), kv_for_queries(v, H), is_causal=True
    )  # B,H,T,D
    expected = F.linear(
        o.transpose(1, 2).reshape(B, T, H * D), attn.o_proj.weight, attn.o_proj.bias
    )

    rope = model.rope(T, x.device)
    for mode, offset in [("off", 0.0), ("hard", 1e4), ("stochastic", 1e4)]:
        model.set_gate(mode, offset)
        torch.testing.assert_close(attn(x, rope), expected, atol=1e-5, rtol=1e-5)
    # the materialised-pattern path taken while a hook reads the pattern
    model.set_gate("off")
    with capture(model, ["blocks.0.attn.hook_pattern"]) as seen:
        torch.testing.assert_close(attn(x, rope), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(B, H, T))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hard_gates_with_huge_offset_equal_gates_off(family):
    model = make_model(family)
    with torch.no_grad():
        dense = model(tokens()).logits
        model.set_gate("hard", 1e4)
        out = model(tokens())
    torch.testing.assert_close(out.logits, dense, atol=1e-5, rtol=1e-5)
    H = model.cfg.n_heads
    for stats in out.gate_stats:
        assert torch.equal(stats.open_edges, torch.full((B, H), T * (T + 1) // 2))
        assert torch.equal(stats.empty_queries, torch.zeros(B, H, dtype=torch.long))


# ----------------------------------------------------------------------------- hard gates


def test_hard_gates_are_not_renormalised_and_closed_queries_output_zero():
    model = make_model("llama")
    names = [f"blocks.0.attn.hook_{n}" for n in ("q", "k", "v", "z", "pattern")]
    with torch.no_grad(), capture(model, names[:2]) as dense:
        model(tokens())
    s = by_hand_scores(dense[names[0]], dense[names[1]])  # B,H,T,T
    offset = -s.masked_select(CAUSAL).median().item()  # about half of the causal pairs open
    model.set_gate("hard", offset)
    with torch.no_grad(), capture(model, names) as seen:
        model(tokens())
    q, k, v, z_out, pattern = (seen[n] for n in names)

    s = by_hand_scores(q, k)
    p = causal_softmax(s)
    gate = ((s + offset) > 0) & CAUSAL  # z_ij = 1[s_ij + b > 0]
    expected = torch.einsum("bhij,bhjd->bhid", p * gate, kv_for_queries(v, q.shape[1]))  # B,H,T,D
    torch.testing.assert_close(z_out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pattern, p * gate)

    closed = ~gate.any(-1)  # B,H,T: queries with every key closed
    partly = gate.any(-1) & (gate.sum(-1) < CAUSAL.sum(-1))
    assert closed.any() and partly.any()
    assert torch.equal(z_out.transpose(1, 2)[closed], torch.zeros(int(closed.sum()), q.shape[-1]))
    # not renormalised: the open mass is < 1 where keys are closed, and the renormalised form differs
    torch.testing.assert_close(pattern.sum(-1), (p * gate).sum(-1))
    assert (pattern.sum(-1)[partly] < 0.9).any()
    renormalised = torch.einsum(
        "bhij,bhjd->bhid",
        (p * gate) / (p * gate).sum(-1, keepdim=True).clamp_min(1e-30),
        kv_for_queries(v, q.shape[1]),
    )
    assert (renormalised - expected)[partly].abs().max() > 1e-2


def test_all_keys_closed_gives_zero_attention():
    model = make_model("gpt2")
    model.set_gate("hard", -1e4)
    with (
        torch.no_grad(),
        capture(model, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"]) as seen,
    ):
        out = model(tokens())
    assert torch.equal(seen["blocks.1.attn.hook_z"], torch.zeros_like(seen["blocks.1.attn.hook_z"]))
    # only o_proj's bias remains
    bias = model.blocks[1].attn.o_proj.bias
    torch.testing.assert_close(seen["blocks.1.hook_attn_out"], bias.expand(B, T, -1))
    assert int(out.gate_stats[1].empty_queries.min()) == T


# ----------------------------------------------------------------------------- stochastic gates


def test_stochastic_gate_forward_is_hard_noisy_and_gradient_is_straight_through():
    """A 1-layer, 2-head, 3-token case: the module (checkpointed) against a hand computation."""
    model = make_model("gpt2", n_layers=1, d_model=8, n_heads=2)
    offset, Tn, H, D = 0.3, 3, 2, 4
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, Tn, D, generator=gen).requires_grad_() for _ in range(3))
    w = torch.randn(1, Tn, H, D, generator=gen)  # L = sum(w * hook_z)
    x = torch.randn(1, Tn, 8, generator=gen)
    model.set_gate("stochastic", offset)
    points = {
        f"blocks.0.attn.hook_{n}": (lambda _x, t=t: t)
        for n, t in zip("qkv", (q, k, v), strict=True)
    }
    with hooks(model, points), capture(model, ["blocks.0.attn.hook_z"], detach=False) as seen:
        torch.manual_seed(1234)
        model.blocks[0].attn(x, None)
    z_out = seen["blocks.0.attn.hook_z"]  # 1,T,H,D
    (z_out * w).sum().backward()

    with torch.no_grad():  # by hand, from DESIGN.md
        torch.manual_seed(1234)
        u = torch.rand(1, H, Tn, Tn).clamp(1e-6, 1 - 1e-6)
        causal = CAUSAL[:Tn, :Tn]
        s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~causal, float("-inf"))
        p = s.softmax(-1)
        noisy = s + offset + torch.log(u) - torch.log(1 - u)
        z = (noisy > 0).float()
        out = (p * z) @ v  # 1,H,T,D
        torch.testing.assert_close(z_out.detach(), out.transpose(1, 2), atol=1e-6, rtol=1e-6)
        assert (z != ((s + offset > 0) & causal).float()).any(), (
            "the noise should flip some gate here"
        )

        # backward: L = sum_i w_i . sum_j p_ij z~_ij v_j with z~ = z + sig(n) - stopgrad(sig(n))
        w_h = w.transpose(1, 2)  # 1,H,T,D
        grad_v = (p * z).transpose(-1, -2) @ w_h
        G = w_h @ v.transpose(-1, -2)  # dL/d(p z~)_ij = w_i . v_j
        a = G * z  # dL/dp
        grad_s_softmax = p * (a - (p * a).sum(-1, keepdim=True))
        sig = torch.sigmoid(noisy)
        grad_s_gate = (G * p * sig * (1 - sig)).masked_fill(
            ~causal, 0.0
        )  # through z~ into g = s + b
        grad_s = grad_s_softmax + grad_s_gate
        grad_q = grad_s @ k / math.sqrt(D)
        grad_k = grad_s.transpose(-1, -2) @ q / math.sqrt(D)
    torch.testing.assert_close(v.grad, grad_v, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.grad, grad_q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k.grad, grad_k, atol=1e-6, rtol=1e-5)
    # the straight-through term is really there (a hard threshold alone has no gradient)
    assert (grad_s_gate @ k).abs().max() > 1e-3


def test_stochastic_recompute_reuses_the_forward_noise():
    """Checkpointed backward must redraw the same noise: gradients equal an uncheckpointed run."""
    model = make_model("llama")
    model.set_gate("stochastic", 0.5)

    def grads(checkpointed: bool):
        model.zero_grad()
        original = model_module.checkpoint
        if not checkpointed:
            model_module.checkpoint = lambda fn, *args, use_reentrant: fn(*args)
        try:
            torch.manual_seed(7)
            out = model(tokens(), tokens(2))
        finally:
            model_module.checkpoint = original
        (out.loss + sum(s.expected_open.mean() for s in out.gate_stats)).backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = grads(True), grads(False)
    assert torch.equal(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("mode", ["stochastic", "hard"])
def test_gate_statistics(mode):
    model = make_model("llama")
    offset = 0.25
    model.set_gate(mode, offset)
    names = [f"blocks.{layer}.attn.hook_{n}" for layer in range(2) for n in "qk"]
    with torch.set_grad_enabled(mode == "stochastic"), capture(model, names) as seen:
        out = model(tokens())
    count = T * (T + 1) // 2
    for layer, stats in enumerate(out.gate_stats):
        s = by_hand_scores(seen[f"blocks.{layer}.attn.hook_q"], seen[f"blocks.{layer}.attn.hook_k"])
        g = (s + offset).masked_fill(~CAUSAL, float("-inf"))
        torch.testing.assert_close(stats.expected_open, torch.sigmoid(g).sum((-1, -2)) / count)
        assert stats.expected_open.requires_grad == (
            mode == "stochastic"
        )  # a loss term in training
        open_ = g > 0
        assert torch.equal(stats.open_edges, open_.sum((-1, -2)))
        assert torch.equal(stats.empty_queries, (~open_.any(-1)).sum(-1))
    assert model(tokens()).gate_stats is not None
    model.set_gate("off")
    assert model(tokens()).gate_stats is None


# ----------------------------------------------------------------------------- hooks


def test_hook_point_shapes_and_pattern_replacement():
    model = make_model("llama")
    cfg = model.cfg
    H, K, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
    shapes = {
        "hook_embed": (B, T, M),
        "blocks.1.hook_resid_pre": (B, T, M),
        "blocks.1.attn_norm.hook_scale": (B, T, 1),
        "blocks.1.attn.hook_q": (B, H, T, D),
        "blocks.1.attn.hook_k": (B, K, T, D),
        "blocks.1.attn.hook_v": (B, K, T, D),
        "blocks.1.attn.hook_pattern": (B, H, T, T),
        "blocks.1.attn.hook_z": (B, T, H, D),
        "blocks.1.hook_attn_out": (B, T, M),
        "blocks.1.mlp_norm.hook_scale": (B, T, 1),
        "blocks.1.hook_mlp_in": (B, T, M),
        "blocks.1.hook_mlp_out": (B, T, M),
        "final_norm.hook_scale": (B, T, 1),
    }
    assert set(shapes) <= set(model.hook_points())
    for mode in ("off", "hard"):
        model.set_gate(mode, 0.0)
        with torch.no_grad(), capture(model, shapes) as seen:
            model(tokens())
        assert {n: tuple(t.shape) for n, t in seen.items()} == shapes
        assert (seen["blocks.1.attn.hook_pattern"] * ~CAUSAL == 0).all()
    # a hook that replaces the pattern replaces the attention: zero pattern, zero output
    with (
        torch.no_grad(),
        hooks(model, {"blocks.1.attn.hook_pattern": torch.zeros_like}),
        capture(model, ["blocks.1.attn.hook_z"]) as seen,
    ):
        model(tokens())
    assert torch.equal(seen["blocks.1.attn.hook_z"], torch.zeros(B, T, H, D))
    with pytest.raises(KeyError, match="no hook point named"):
        with capture(model, ["blocks.9.hook_mlp_in"]):
            pass


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_frozen_norm_scale_is_a_constant(family):
    model = make_model(family)
    norm = model.blocks[0].attn_norm
    x = torch.randn(B, T, model.cfg.d_model, requires_grad=True)
    with torch.no_grad(), capture(model, ["blocks.0.attn_norm.hook_scale"]) as seen:
        y = norm(x)
    scale = seen["blocks.0.attn_norm.hook_scale"]
    bias = norm.bias if family == "gpt2" else torch.zeros(())
    # a norm ignores the input's size (up to eps) ...
    torch.testing.assert_close(norm(2 * x) - bias, y - bias, atol=1e-4, rtol=1e-4)
    w = torch.randn(B, T, model.cfg.d_model)
    with freeze(model, {"blocks.0.attn_norm.hook_scale": scale}):
        torch.testing.assert_close(norm(x), y)
        torch.testing.assert_close(
            norm(2 * x) - bias, 2 * (y - bias)
        )  # ... unless its scale is frozen
        (norm(x) * w).sum().backward()
    # with the scale frozen the norm is linear: d/dx = scale * gain (after centring, for LayerNorm)
    a = scale * norm.weight * w
    expected = a - a.mean(-1, keepdim=True) if family == "gpt2" else a
    torch.testing.assert_close(x.grad, expected)


# ----------------------------------------------------------------------------- GQA, save/load, bookkeeping


def test_grouped_query_attention_equals_multi_head_with_shared_kv():
    gqa = make_model("llama")
    mha = Transformer(ModelConfig(**{**LLAMA, "n_kv_heads": LLAMA["n_heads"]}))
    H, K, D = gqa.cfg.n_heads, gqa.cfg.n_kv_heads, gqa.cfg.d_head
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(
            ("k_proj.weight", "v_proj.weight")
        ):  # K*D,M -> H*D,M: head h reads kv head h // (H/K)
            state[name] = (
                state[name].view(K, D, -1).repeat_interleave(H // K, dim=0).reshape(H * D, -1)
            )
    mha.load_state_dict(state)
    for mode in ("off", "hard"):
        gqa.set_gate(mode, 0.0)
        mha.set_gate(mode, 0.0)
        with torch.no_grad():
            torch.testing.assert_close(
                gqa(tokens()).logits, mha(tokens()).logits, atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_load_roundtrip(family, tmp_path):
    model = make_model(family, gate=GateConfig(offset=0.25))
    assert (model.gate_mode, model.blocks[0].attn.gate_offset) == ("hard", 0.25)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_model(model, tmp_path / "m", tokenizer=tok, metrics={"loss": 1.0})
    loaded, loaded_tok = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert (loaded.gate_mode, loaded.blocks[0].attn.gate_offset) == ("hard", 0.25)
    assert loaded_tok.encode("a b c").ids == [1, 2, 0]
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, model(tokens()).logits)


def test_sequence_longer_than_context_is_refused():
    model = make_model("gpt2")
    model(tokens(t=16))
    with pytest.raises(
        ValueError, match="sequence of 17 tokens is longer than the context length 16"
    ):
        model(tokens(t=17))


def test_bf16_model_runs_in_bf16():
    model = make_model("llama").to(torch.bfloat16)
    for mode in ("off", "hard"):
        model.set_gate(mode, 0.0)
        with torch.no_grad():
            assert model(tokens()).logits.dtype == torch.bfloat16


def test_parameter_count_and_flops():
    gpt2, llama = make_model("gpt2"), make_model("llama")
    M, F_, L, C = 16, 48, 2, 16
    per_layer = (
        2 * 2 * M + 4 * (M * M + M) + (M * F_ + F_) + (F_ * M + M)
    )  # 2 LayerNorms, q k v o, MLP
    assert (
        gpt2.num_parameters(non_embedding=False) == V * M + C * M + L * per_layer + 2 * M
    )  # head tied
    assert gpt2.num_parameters() == V * M + L * per_layer + 2 * M  # learned positions left out
    H, K, D = 4, 2, 4
    per_layer = (
        M + M * H * D + 2 * M * K * D + H * D * M + M + 3 * M * F_
    )  # RMSNorms, q k v o, SwiGLU
    n = 2 * V * M + L * per_layer + M  # untied embedding and head
    assert llama.num_parameters() == llama.num_parameters(non_embedding=False) == n
    assert llama.num_parameters() == sum(p.numel() for p in llama.parameters())
    assert llama.flops_per_token(T) == 6 * n + 12 * L * H * D * T


# ----------------------------------------------------------------------------- memory


def _square_saves(model: Transformer, tok: torch.Tensor, checkpointed: bool) -> int:
    """Tensors of shape [..., T, T] that autograd keeps for backward during one training forward."""
    t = tok.shape[1]
    count = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += x.dim() >= 2 and tuple(x.shape[-2:]) == (t, t)
        return x

    original = model_module.checkpoint
    if not checkpointed:
        model_module.checkpoint = lambda fn, *args, use_reentrant: fn(*args)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = model(tok, tok)
    finally:
        model_module.checkpoint = original
    out.loss.backward()
    return count


def test_training_forward_keeps_no_layer_scores_for_backward():
    """Gated attention is checkpointed: backward recomputes a layer's T x T tensors one layer at a
    time instead of keeping every layer's. The uncheckpointed control shows the count sees them."""
    n_layers, t = 4, 13  # t differs from every other dimension, so [..., t, t] means scores
    model = make_model("llama", n_layers=n_layers)
    tok = tokens(t=t)
    for mode in ("stochastic", "hard"):
        model.set_gate(mode, 0.5)
        kept_without = _square_saves(model, tok, checkpointed=False)
        assert kept_without >= n_layers  # the control: every layer keeps its scores
        per_layer = kept_without // n_layers
        assert _square_saves(model, tok, checkpointed=True) <= per_layer  # at most one layer's
