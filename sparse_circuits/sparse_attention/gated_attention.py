"""Gated sparse attention (arXiv 2512.05865) as one memory-efficient operation.

Shape letters as in model.py: B batch, T positions (queries and keys alike), H query heads,
K key/value heads (H is a multiple of K; G = H // K query heads share one), D head dim.
Inside, a tile's rows are the G query heads of one key/value head times the block's
positions (R = G * tq), so every product is a plain batched matmul over (B, K).

What it computes, for query i and causal key j <= i (DESIGN.md):

    s_ij = q_i . k_j / sqrt(D)
    p_ij = softmax_j(s_ij)               over ALL causal keys (the ordinary denominator)
    g_ij = s_ij + b                      the gate logit
    z_ij = 1[g_ij + l_ij > 0]            stochastic gates (training), l logistic noise,
                                         straight-through: z~ = z + sig(n) - stopgrad(sig(n)), n = g + l
    z_ij = 1[g_ij > 0]                   hard gates (inference)
    o_i  = sum_j p_ij z_ij v_j           NOT renormalised: a query with no open key outputs 0

How: tiled over query blocks and key blocks with an online softmax (running max and
denominator over every causal key, numerator over the open ones). Backward saves q, k, v,
the output and each row's log-sum-exp, O(T * D); no T x T tensor is kept. It recomputes
each tile's scores, pattern and gates; the noise is regenerated per tile from a
counter-based hash of (seed, batch, head, query, key) computed in torch, so forward,
backward and `logistic_noise` (the whole matrix, for the reference path) see the same noise
whatever the tile sizes.

Per (batch, head) gate statistics, accumulated tile by tile:
    expected_open = (1 / count) sum_{j <= i} sig(g_ij), count = T (T + 1) / 2   (differentiable)
    open_edges    = #{(i, j): g_ij > 0}, empty_queries = #{i: no j with g_ij > 0}
(the last two of the deterministic gate, in either mode, as the reference path counts them).

Backward, with G_ij = dO_i . v_j, A = p * z and Delta_i = dO_i . o_i = sum_j A_ij G_ij:
    dv_j  = sum_i A_ij dO_i
    ds_ij = p_ij (G_ij z_ij - Delta_i)                 the softmax
          + p_ij G_ij sig'(n_ij)                       the straight-through gate (stochastic)
          + dE_bh / count * sig(g_ij) (1 - sig(g_ij))  the expected-open statistic
    dq_i  = sum_j ds_ij k_j / sqrt(D),  dk_j = sum_i ds_ij q_i / sqrt(D)
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

GatedMode = Literal["stochastic", "hard"]

BLOCK_Q = 128  # query positions per tile (times G query heads per row block)
BLOCK_K = 256  # key positions per tile; at B*H = 4 a tile is 128K floats, 512 KiB: in L2


class GatedAttentionOutput(NamedTuple):
    out: torch.Tensor  # B,H,T,D
    expected_open: torch.Tensor  # B,H  mean sig(g) over causal pairs (differentiable)
    open_edges: torch.Tensor  # B,H  causal pairs with g > 0
    empty_queries: torch.Tensor  # B,H  queries with no key g > 0


# ----------------------------------------------------------------------------- the noise
#
# w_ij = (the top 23 bits of hash(seed, b, h, i, j) + 1/2) / 2^23: uniform on a grid
# symmetric about 1/2 inside (0, 1), so 1 - w is exact. The logistic noise is
# l = log((1 - w) / w), and no logarithm is ever taken in the operation:
#     gate    g + l > 0  <=>  w < sig(g)         (the sig(g) the statistic computes anyway)
#     slope   sig'(g + l) = ab / (a + b)^2,  a = sig(g) (1 - w),  b = sig(-g) w
# (the second accurate at both ends, where 1 - sig(n) would cancel). The hash runs on int32
# tensors: their products wrap modulo 2^32 on every torch backend (two's complement), and
# each right shift is masked, so a negative value shifts as an unsigned one would.

_COLUMN_SALT = 0x5BD1E995  # keys are hashed apart from queries, so row i and column i differ


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _xorshift_(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x ^= x >>> bits (logical shift), in place."""
    return x.bitwise_xor_(torch.bitwise_right_shift(x, bits).bitwise_and_((1 << 32 - bits) - 1))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash in place on int32 (Wellons' hash-prospector
    '16 21f0aaad 15 735a2d97 15', bias 0.108)."""
    _xorshift_(x, 16).mul_(0x21F0AAAD)
    _xorshift_(x, 15).mul_(0x735A2D97)
    return _xorshift_(x, 15)


def _head_keys(seed: int, batch: int, heads: int, device) -> torch.Tensor:
    """One hashed key per (batch, head): B,H int32."""
    base = _mix32(torch.tensor(_int32(seed), dtype=torch.int32, device=device))
    bh = torch.arange(batch * heads, dtype=torch.int32, device=device).view(batch, heads)
    return _mix32(bh.bitwise_xor_(base))


def _row_keys(head_keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """head_keys [..., 1] x query positions [n] -> int32 [..., n]."""
    return _mix32(head_keys ^ positions.to(torch.int32))


def _column_keys(positions: torch.Tensor) -> torch.Tensor:
    return _mix32(positions.to(torch.int32) ^ _int32(_COLUMN_SALT))


def _uniform(row_keys: torch.Tensor, column_keys: torch.Tensor) -> torch.Tensor:
    """w of the pairs: row keys [..., R, 1] x column keys [C] -> float32 [..., R, C]. The keys
    are hashed already, so a pair takes one multiply-xorshift-multiply round."""
    x = row_keys ^ column_keys
    _xorshift_(x.mul_(0x21F0AAAD), 15).mul_(0x735A2D97)
    # the top 23 bits as the mantissa of a float in [1, 2) (exponent bits 0x3F8), minus
    # 1 - 2^-24: exact (Sterbenz), and no integer-to-float conversion
    bits = torch.bitwise_right_shift(x, 9).bitwise_and_((1 << 23) - 1).bitwise_or_(0x3F800000)
    return bits.view(torch.float32).sub_(1.0 - 2.0**-24)


def logistic_noise(
    seed: int, batch: int, heads: int, T: int, S: int | None = None, device=None
) -> torch.Tensor:
    """The whole noise matrix l = log((1 - w) / w) the operation draws for `seed`: float32
    B,H,T,S. For the reference path (`model.gated_pattern(..., noise=...)`), which then sees
    the same gates (up to float rounding right at a gate's threshold)."""
    S = T if S is None else S
    rows = _row_keys(
        _head_keys(seed, batch, heads, device)[..., None], torch.arange(T, device=device)
    )  # B,H,T
    columns = _column_keys(torch.arange(S, device=device))  # S
    return torch.rsub(_uniform(rows[..., None], columns), 1.0).logit_()  # logit(1 - w)


def draw_seed() -> int:
    """A noise seed from torch's default generator, so `torch.manual_seed` fixes the gates."""
    return int(torch.randint(0, 2**31 - 1, (), device="cpu"))


# ----------------------------------------------------------------------------- the tiles


def _causal_bias(i0: int, i1: int, j0: int, j1: int, device, cache: dict) -> torch.Tensor:
    """tq,tk: -inf where key j lies after query i, else 0 (one per tile shape and diagonal)."""
    key = (i0 - j0, i1 - i0, j1 - j0)
    if key not in cache:
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(j0, j1, device=device)[None]
        cache[key] = torch.zeros(i1 - i0, j1 - j0, device=device).masked_fill_(j > i, -math.inf)
    return cache[key]


def _key_blocks(i0: int, i1: int, block_k: int):
    """Key blocks a query block [i0, i1) sees: (j0, j1, needs a causal mask)."""
    for j0 in range(0, i1, block_k):
        j1 = min(j0 + block_k, i1)
        yield j0, j1, j1 - 1 > i0


class _Layout(NamedTuple):
    B: int
    K: int
    G: int
    T: int
    D: int


def _rows(x: torch.Tensor, lay: _Layout, i0: int, i1: int) -> torch.Tensor:
    """x B,K,G,T,* -> B,K,R,* for positions [i0, i1): R = G * (i1 - i0) rows."""
    return x[:, :, :, i0:i1].reshape(lay.B, lay.K, lay.G * (i1 - i0), *x.shape[4:])


def _scores(qb, kb, lay: _Layout, i0, i1, j0, j1, masked, cache: dict) -> torch.Tensor:
    """Scaled scores of one tile, -inf after the diagonal: B,K,R,tk."""
    s = qb @ kb.transpose(-1, -2)  # B,K,R,tk
    if masked:  # adding 0 or -inf: the same values as a masked fill, in one cheap pass
        s.view(lay.B, lay.K, lay.G, i1 - i0, j1 - j0).add_(
            _causal_bias(i0, i1, j0, j1, s.device, cache)
        )
    return s


def _step(x: torch.Tensor) -> torch.Tensor:
    """1[x > 0] as float32, in place when it can: sign and relu are far cheaper than a
    comparison into bool and a conversion back."""
    return torch.sign(x).relu_()


def _forward(q, k, v, offset: float, stochastic: bool, seed: int, block_q: int, block_k: int):
    B, H, T, D = q.shape
    K = k.shape[1]
    lay = _Layout(B, K, H // K, T, D)
    f32 = torch.float32
    # q pre-scaled: exact for the usual power-of-4 head dims, where sqrt(D) is a power of 2
    qs = (q.to(f32) * (1.0 / math.sqrt(D))).view(B, K, lay.G, T, D)  # B,K,G,T,D
    kf, vf = k.to(f32), v.to(f32)  # B,K,T,D
    out = torch.empty(B, K, lay.G, T, D, dtype=f32, device=q.device)
    lse = torch.empty(B, K, lay.G, T, dtype=f32, device=q.device)
    sig_sum = torch.zeros(B, K, lay.G, dtype=f32, device=q.device)
    open_edges = torch.zeros(B, K, lay.G, dtype=torch.int64, device=q.device)
    empty = torch.zeros(B, K, lay.G, dtype=torch.int64, device=q.device)
    biases: dict = {}
    if stochastic:
        head_keys = _head_keys(seed, B, H, q.device).view(B, K, lay.G, 1, 1)
        column_keys = _column_keys(torch.arange(T, device=q.device))
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        tq = i1 - i0
        R = lay.G * tq
        qb = _rows(qs, lay, i0, i1)  # B,K,R,D
        m = torch.full((B, K, R, 1), float("-inf"), dtype=f32, device=q.device)
        denom = torch.zeros(B, K, R, 1, dtype=f32, device=q.device)
        acc = torch.zeros(B, K, R, D, dtype=f32, device=q.device)
        row_sig = torch.zeros(B, K, R, 1, dtype=f32, device=q.device)
        row_open = torch.zeros(B, K, R, 1, dtype=f32, device=q.device)  # counts, exact
        if stochastic:
            pos = torch.arange(i0, i1, device=q.device)
            row_keys = _row_keys(head_keys, pos[:, None]).view(B, K, R, 1)
        for j0, j1, masked in _key_blocks(i0, i1, block_k):
            s = _scores(qb, kf[:, :, j0:j1], lay, i0, i1, j0, j1, masked, biases)  # B,K,R,tk
            g = s + offset if offset else s  # the gate logit; used up before s changes below
            hard = _step(g)  # the deterministic gate 1[g > 0]
            row_open += hard.sum(-1, keepdim=True)
            sg = torch.sigmoid(g)
            row_sig += sg.sum(-1, keepdim=True)
            if stochastic:  # g + l > 0  <=>  w < sig(g)
                z = _step(sg.sub_(_uniform(row_keys, column_keys[j0:j1])))
            else:
                z = hard
            del g, sg, hard
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # finite: key 0 is in every row
            alpha = torch.exp(m - m_new)
            e = s.sub_(m_new).exp_()  # exp(s - m) in place: B,K,R,tk
            denom.mul_(alpha).add_(e.sum(-1, keepdim=True))  # over ALL causal keys
            acc.mul_(alpha).add_(e.mul_(z) @ vf[:, :, j0:j1])  # over OPEN keys only
            m = m_new
            del s, e, z
        acc.div_(denom)  # a row with no open key stays 0
        out[:, :, :, i0:i1] = acc.view(B, K, lay.G, tq, D)
        lse[:, :, :, i0:i1] = (m + denom.log()).view(B, K, lay.G, tq)
        sig_sum += row_sig.view(B, K, lay.G, tq).sum(-1)
        row_open = row_open.view(B, K, lay.G, tq).to(torch.int64)
        open_edges += row_open.sum(-1)
        empty += (row_open == 0).sum(-1)
    count = T * (T + 1) // 2
    return (
        out.view(B, H, T, D),
        lse,
        (sig_sum / count).view(B, H),
        open_edges.view(B, H),
        empty.view(B, H),
    )


def _backward(
    q, k, v, out, lse, d_out, d_expected, offset, stochastic, seed, block_q, block_k, needs
):
    B, H, T, D = q.shape
    K = k.shape[1]
    lay = _Layout(B, K, H // K, T, D)
    f32 = torch.float32
    scale = 1.0 / math.sqrt(D)
    qs = (q.to(f32) * scale).view(B, K, lay.G, T, D)
    kf, vf = k.to(f32), v.to(f32)
    dq = torch.zeros(B, K, lay.G, T, D, dtype=f32, device=q.device)
    dk = torch.zeros(B, K, T, D, dtype=f32, device=q.device)
    dv = torch.zeros(B, K, T, D, dtype=f32, device=q.device)
    if d_out is not None:
        d_out = d_out.to(f32).view(B, K, lay.G, T, D)
        delta = (d_out * out.to(f32).view(B, K, lay.G, T, D)).sum(-1)  # B,K,G,T: dO_i . o_i
    if d_expected is not None:  # dE/count per (b, h), broadcast over a block's positions
        d_sig = (d_expected.to(f32) / (T * (T + 1) // 2)).view(B, K, lay.G, 1)
    biases: dict = {}
    if stochastic:
        head_keys = _head_keys(seed, B, H, q.device).view(B, K, lay.G, 1, 1)
        column_keys = _column_keys(torch.arange(T, device=q.device))
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        tq = i1 - i0
        R = lay.G * tq
        qb = _rows(qs, lay, i0, i1)  # B,K,R,D
        lse_b = _rows(lse[..., None], lay, i0, i1)  # B,K,R,1
        dqb = torch.zeros(B, K, R, D, dtype=f32, device=q.device)
        if d_out is not None:
            dob = _rows(d_out, lay, i0, i1)  # B,K,R,D
            neg_delta_b = _rows(delta[..., None], lay, i0, i1).neg()  # B,K,R,1
        if d_expected is not None:
            d_sig_b = d_sig.expand(B, K, lay.G, tq).reshape(B, K, R, 1)
        if stochastic:
            pos = torch.arange(i0, i1, device=q.device)
            row_keys = _row_keys(head_keys, pos[:, None]).view(B, K, R, 1)
        for j0, j1, masked in _key_blocks(i0, i1, block_k):
            kb, vb = kf[:, :, j0:j1], vf[:, :, j0:j1]
            s = _scores(qb, kb, lay, i0, i1, j0, j1, masked, biases)  # B,K,R,tk
            g = s + offset if offset else s  # used up before s changes below
            sg = torch.sigmoid(g) if stochastic or d_expected is not None else None
            ds = None  # at least one of the two terms below is there
            if d_expected is not None:  # the statistic: dE/count * sig'(g)
                ds = torch.ops.aten.sigmoid_backward(d_sig_b.expand_as(sg), sg)
            if d_out is not None:
                if stochastic:
                    w = _uniform(row_keys, column_keys[j0:j1])
                    z = _step(sg - w)  # the forward's arithmetic, so the same gates
                    # z~'s value z plus its straight-through slope sig'(n) = ab / (a + b)^2
                    a = torch.rsub(w, 1.0).mul_(sg)  # sig(g) (1 - w)
                    b = torch.sigmoid(g.neg()).mul_(w)  # sig(-g) w
                    z_slope = (a * b).div_(a.add_(b).square_()).add_(z)
                    del w, a, b
                else:
                    z = _step(g)
                    z_slope = z
                p = s.sub_(lse_b).exp_()  # the softmax over all keys, recomputed in place
                dv[:, :, j0:j1] += (p * z).transpose(-1, -2) @ dob  # A^T dO
                grad = dob @ vb.transpose(-1, -2)  # G_ij = dO_i . v_j
                grad.mul_(z_slope).add_(neg_delta_b)  # G z~' - Delta, in place
                ds = grad.mul_(p) if ds is None else ds.addcmul_(grad, p)  # times p
                del p, z, z_slope, grad
            del s, g, sg
            if needs[0]:
                dqb += ds @ kb
            if needs[1]:
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qb
            del ds
        dq[:, :, :, i0:i1] = dqb.view(B, K, lay.G, tq, D)
    return dq.view(B, H, T, D).mul_(scale), dk, dv  # dk took the scale from qs


class _GatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offset, stochastic, seed, block_q, block_k):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, expected_open, open_edges, empty = _forward(
                q, k, v, offset, stochastic, seed, block_q, block_k
            )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (offset, stochastic, seed, block_q, block_k)
        ctx.mark_non_differentiable(open_edges, empty)
        ctx.set_materialize_grads(False)
        return out, expected_open.to(q.dtype), open_edges, empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_expected, _d_open, _d_empty):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None and d_expected is None:
            return None, None, None, None, None, None, None, None
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(
                q, k, v, out, lse, d_out, d_expected, *ctx.settings, ctx.needs_input_grad
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    offset: float,
    mode: GatedMode,
    seed: int | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> GatedAttentionOutput:
    """Causal gated attention of q [B,H,T,D] over k, v [B,K,T,D] (K divides H: grouped
    key/value heads are shared, never copied), with gate offset b = `offset`.

    mode "stochastic" draws logistic noise keyed by `seed` (drawn from torch's generator when
    None) and passes the straight-through gradient; "hard" gates are 1[s + b > 0]. Returns
    the output and the per-(batch, head) gate statistics; output and expected_open carry
    gradients to q, k and v. Tiles: `block_q` query positions by `block_k` keys (default
    BLOCK_Q, BLOCK_K); the results do not depend on them beyond float rounding."""
    if mode not in ("stochastic", "hard"):
        raise ValueError(f"gated_attention runs gates 'stochastic' or 'hard', not {mode!r}")
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"{H} query heads are not a multiple of {k.shape[1]} key/value heads")
    stochastic = mode == "stochastic"
    if stochastic and seed is None:
        seed = draw_seed()
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    result = _GatedAttention.apply(
        q, k, v, float(offset), stochastic, int(seed or 0), int(block_q), int(block_k)
    )
    return GatedAttentionOutput(*result)
