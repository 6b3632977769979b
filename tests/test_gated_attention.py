"""The tiled gated attention operation against the reference path (model.gated_pattern),
which materialises the T x T pattern: outputs, gate statistics and gradients in fp32.

Shape letters as in model.py: B batch, T positions, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_circuits.sparse_attention import gated_attention as ga
from sparse_circuits.sparse_attention import model as model_module
from sparse_circuits.sparse_attention.gated_attention import gated_attention, logistic_noise
from sparse_circuits.sparse_attention.hooks import capture
from sparse_circuits.sparse_attention.model import ModelConfig, Transformer, gated_pattern

TOL = dict(atol=1e-5, rtol=1e-5)
SEED = 1234


def reference(q, k, v, offset, mode, noise):
    """Today's path: repeat grouped heads, materialise the gated pattern, apply it."""
    H = q.shape[1]
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))  # B,H,T,D
    pattern, stats = gated_pattern(q, k, offset, mode, noise=noise)
    return pattern @ v, stats


def qkv(B, H, K, T, D, seed=0):
    """Scores of a few units, so that an offset near 0 closes some gates and opens others."""
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, H, T, D, generator=gen)).requires_grad_()
    k = (2 * torch.randn(B, K, T, D, generator=gen)).requires_grad_()
    v = torch.randn(B, K, T, D, generator=gen).requires_grad_()
    return q, k, v


def run(fn, q, k, v, w, c):
    """Output, statistics and the gradients of L = sum(w * out) + sum(c * expected_open)."""
    for t in (q, k, v):
        t.grad = None
    out, expected_open, open_edges, empty_queries = fn()
    ((out * w).sum() + (expected_open * c).sum()).backward()
    return (
        out.detach(),
        expected_open.detach(),
        open_edges,
        empty_queries,
        [t.grad.clone() for t in (q, k, v)],
    )


# ----------------------------------------------------------------------------- the operation


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("mode", ["stochastic", "hard"])
@pytest.mark.parametrize(
    "B,H,K,T,D,block_q,block_k",
    [
        (2, 4, 4, 37, 16, 8, 16),  # T not a multiple of either tile
        (2, 4, 2, 37, 16, 16, 8),  # grouped key/value heads (GQA), tiles the other way round
        (1, 6, 2, 50, 8, 16, 16),  # three query heads per key/value head, sqrt(D) irrational
        (2, 2, 1, 5, 16, None, None),  # shorter than one default tile
    ],
)
def test_operation_equals_reference(mode, B, H, K, T, D, block_q, block_k, compile):
    """Eager tiles, and tiles fused by torch.compile (training's default; the tests' default
    is eager, see conftest.py), against the materialised pattern."""
    q, k, v = qkv(B, H, K, T, D)
    w = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    c = torch.randn(B, H, generator=torch.Generator().manual_seed(2))  # a loss on the statistic
    offset = 0.3
    noise = logistic_noise(SEED, B, H, T)

    def ref():
        out, s = reference(q, k, v, offset, mode, noise)
        return out, s.expected_open, s.open_edges, s.empty_queries

    def tiled():
        return gated_attention(
            q, k, v, offset=offset, mode=mode, seed=SEED, block_q=block_q, block_k=block_k,
            compile=compile,
        )  # fmt: skip

    want, got = run(ref, q, k, v, w, c), run(tiled, q, k, v, w, c)
    assert "failed" not in ga._COMPILED, f"torch.compile failed: {ga._COMPILED.get('failed')}"
    torch.testing.assert_close(got[0], want[0], **TOL)  # output
    torch.testing.assert_close(got[1], want[1], **TOL)  # expected open fraction
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])  # counts
    for name, g_got, g_want in zip("qkv", got[4], want[4], strict=True):
        torch.testing.assert_close(g_got, g_want, **TOL, msg=lambda m, n=name: f"d{n}: {m}")
    # the case is not trivial: gates both open and closed, and noise flips some of them
    pairs = T * (T + 1) // 2
    assert (want[2] > 0).all() and (want[2] < pairs).all()
    if mode == "stochastic":
        hard_out, _ = reference(q.detach(), k.detach(), v.detach(), offset, "hard", None)
        assert (hard_out - want[0]).abs().max() > 1e-2


def test_closed_queries_output_zero_and_open_gates_equal_causal_attention():
    q, k, v = qkv(2, 4, 2, 21, 16)
    all_open = gated_attention(q, k, v, offset=1e4, mode="hard", block_q=8, block_k=8)
    dense = F.scaled_dot_product_attention(
        q, *(t.repeat_interleave(2, dim=1) for t in (k, v)), is_causal=True
    )
    torch.testing.assert_close(all_open.out, dense, **TOL)
    closed = gated_attention(q, k, v, offset=-1e4, mode="hard", block_q=8, block_k=8)
    assert torch.equal(closed.out, torch.zeros_like(closed.out))  # not renormalised
    assert torch.equal(closed.empty_queries, torch.full((2, 4), 21))
    assert torch.equal(closed.open_edges, torch.zeros(2, 4, dtype=torch.long))


def test_noise_does_not_depend_on_the_tiles_and_is_logistic():
    q, k, v = qkv(1, 2, 2, 45, 16)
    outs = [
        gated_attention(q, k, v, offset=0.0, mode="stochastic", seed=7, block_q=bq, block_k=bk)
        for bq, bk in [(4, 4), (16, 32), (64, 64)]
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o.out, outs[0].out, atol=1e-6, rtol=1e-6)
    noise = logistic_noise(7, 2, 3, 200)  # B,H,T,S
    assert torch.equal(noise, logistic_noise(7, 2, 3, 200))
    assert not torch.equal(noise, logistic_noise(8, 2, 3, 200))
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.var().item() / (math.pi**2 / 3) - 1) < 0.02
    u = torch.sigmoid(noise)  # uniform; neighbours along every axis (key, query, head, batch)
    for a, b in [(u[..., 1:], u[..., :-1]), (u[..., 1:, :], u[..., :-1, :]), (u[:, 1:], u[:, :-1])]:
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[0].flatten(), u[1].flatten()]))[0, 1]) < 0.01
    # and pair (i, j) apart from pair (j, i): queries and keys are hashed apart
    upper = torch.ones(200, 200, dtype=torch.bool).triu(1)
    a, b = u[..., upper], u.transpose(-1, -2)[..., upper]
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01


def test_nothing_of_size_t_by_t_is_saved_for_backward():
    T = 96
    q, k, v = qkv(1, 2, 2, T, 8)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = gated_attention(q, k, v, offset=0.0, mode="stochastic", seed=1, block_q=32, block_k=32)
    assert shapes, "backward saves q, k, v, the output and the log-sum-exp"
    assert all(s.count(T) <= 1 for s in shapes), shapes
    (r.out.sum() + r.expected_open.sum()).backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ----------------------------------------------------------------------------- in the model

FAMILIES = {
    "gpt2": dict(family="gpt2", n_heads=2, bias=True),
    "llama": dict(family="llama", n_heads=4, n_kv_heads=2, tie_embeddings=False),  # GQA
}


def make_model(family: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40, n_layers=2, d_model=32, d_mlp=64, context_length=32, **FAMILIES[family]
    )
    model = Transformer(cfg)
    with torch.no_grad():  # patterns far from uniform, activations of order 1
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than the sequences here, so the model's calls cross several of them."""
    monkeypatch.setattr(ga, "BLOCK_Q", 8)
    monkeypatch.setattr(ga, "BLOCK_K", 16)


@pytest.fixture
def hashed_reference_noise(monkeypatch):
    """The reference path draws the tiled operation's noise: a seed from torch's generator
    (which the activation checkpoint restores for its recompute), then `logistic_noise`."""
    original = model_module.gated_pattern

    def with_hashed_noise(q, k, offset, mode, noise=None):
        if mode == "stochastic":
            B, H, T, _ = q.shape
            noise = logistic_noise(ga.draw_seed(), B, H, T)
        return original(q, k, offset, mode, noise)

    monkeypatch.setattr(model_module, "gated_pattern", with_hashed_noise)


@pytest.mark.usefixtures("small_tiles", "hashed_reference_noise")
@pytest.mark.parametrize("mode", ["stochastic", "hard"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_tiled_equals_reference(family, mode):
    model = make_model(family)
    tokens = torch.randint(0, 40, (2, 27), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]  # T = 26

    def step(impl):
        model.zero_grad()
        model.set_gated_impl(impl)
        model.set_gate(mode, 0.2)
        torch.manual_seed(11)  # the same noise seeds for both paths
        out = model(x, y)
        (out.loss + sum(s.expected_open.mean() for s in out.gate_stats)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out, grads

    (ref, ref_grads), (tiled, tiled_grads) = step("reference"), step("tiled")
    torch.testing.assert_close(tiled.logits, ref.logits, **TOL)
    torch.testing.assert_close(tiled.loss, ref.loss, **TOL)
    for s_tiled, s_ref in zip(tiled.gate_stats, ref.gate_stats, strict=True):
        torch.testing.assert_close(s_tiled.expected_open, s_ref.expected_open, **TOL)
        assert torch.equal(s_tiled.open_edges, s_ref.open_edges)
        assert torch.equal(s_tiled.empty_queries, s_ref.empty_queries)
    for name, g in ref_grads.items():
        torch.testing.assert_close(tiled_grads[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    # not trivial: about half the gates open, and gradients reach the queries
    open_fraction = torch.stack([s.open_edges for s in ref.gate_stats]) / (26 * 27 / 2)
    assert 0.1 < open_fraction.mean() < 0.9
    assert any(g.abs().max() > 1e-3 for n, g in ref_grads.items() if "q_proj" in n)


@pytest.mark.usefixtures("small_tiles")
def test_a_hooked_pattern_takes_the_reference_path_under_tiled():
    """Attribution reads and freezes hook_pattern: with the tiled switch on, that still runs
    the materialised pattern, and without a hook the tiled output is the same."""
    model = make_model("llama").eval()
    tokens = torch.randint(0, 40, (2, 19), generator=torch.Generator().manual_seed(4))
    model.set_gate("hard", 0.1)
    model.set_gated_impl("tiled")
    with torch.no_grad():
        plain = model(tokens).logits
        with capture(model, ["blocks.1.attn.hook_pattern"]) as seen:
            hooked = model(tokens).logits
    assert seen["blocks.1.attn.hook_pattern"].shape == (2, 4, 19, 19)
    torch.testing.assert_close(plain, hooked, **TOL)


def test_training_compiles_the_tiles_unless_told_otherwise(monkeypatch):
    q = torch.zeros(1, 1, 4, 8, requires_grad=True)
    monkeypatch.delenv(ga.COMPILE_ENV, raising=False)
    assert ga.compile_by_default(q)  # training
    with torch.no_grad():
        assert not ga.compile_by_default(q)  # inference: eager
    assert not ga.compile_by_default(q.detach())
    monkeypatch.setenv(ga.COMPILE_ENV, "0")
    assert not ga.compile_by_default(q)
    monkeypatch.setenv(ga.COMPILE_ENV, "1")
    with torch.no_grad():
        assert ga.compile_by_default(q)


def test_a_failing_compile_warns_and_runs_the_eager_tiles(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")

        return fails

    monkeypatch.setattr(ga, "_COMPILED", {})  # this test's own compile state
    monkeypatch.setattr(torch, "compile", no_compiler)
    q, k, v = qkv(1, 2, 2, 9, 8)
    want = gated_attention(q, k, v, offset=0.0, mode="stochastic", seed=3, compile=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        got = gated_attention(q, k, v, offset=0.0, mode="stochastic", seed=3, compile=True)
    torch.testing.assert_close(got.out, want.out, atol=0, rtol=0)
    got.out.sum().backward()  # the backward, too, runs eagerly now
    assert isinstance(ga._COMPILED["failed"], RuntimeError)
