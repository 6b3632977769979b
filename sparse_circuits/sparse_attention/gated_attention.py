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
import os
import warnings
from typing import Literal, NamedTuple

import torch

GatedMode = Literal["stochastic", "hard"]

BLOCK_Q = 128  # query positions per tile (times G query heads per row block)
COMPILED_BLOCK_Q = 256  # fused tiles hold fewer temporaries, so they take taller ones
BLOCK_K = 256  # key positions per tile; at B*H = 4 a tile is 128K floats, 512 KiB: in L2
COMPILE_ENV = "SPARSE_CIRCUITS_COMPILE"  # 1: compile the tiles, 0: never (see compile_by_default)


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


def _causal_bias(i0: int, i1: int, j0: int, j1: int, G: int, device, cache: dict) -> torch.Tensor:
    """R,tk (R = G * tq): -inf where key j lies after query i, else 0 (one per tile shape and
    diagonal). Repeated over the G heads of a row block, so it broadcasts over B,K."""
    key = (i0 - j0, i1 - i0, j1 - j0, G)
    if key not in cache:
        i = torch.arange(i0, i1, device=device)[:, None]
        j = torch.arange(j0, j1, device=device)[None]
        mask = torch.zeros(i1 - i0, j1 - j0, device=device).masked_fill_(j > i, -math.inf)
        cache[key] = mask.repeat(G, 1)
    return cache[key]


class _Layout(NamedTuple):
    B: int
    K: int
    G: int
    T: int
    D: int


class _Tiles:
    """What a pass over the tiles needs besides q, k and v, forward and backward alike: the
    noise keys (None for hard gates) and the causal biases, one per tile shape and diagonal."""

    def __init__(self, lay: _Layout, stochastic: bool, seed: int, compiled: bool, device):
        self.lay, self.compiled, self.device = lay, compiled, device
        self.biases: dict = {}
        self.head_keys = self.column_keys = None
        if stochastic:
            head_keys = _head_keys(seed, lay.B, lay.K * lay.G, device)
            self.head_keys = head_keys.view(lay.B, lay.K, lay.G, 1, 1)
            self.column_keys = _column_keys(torch.arange(lay.T, device=device))

    def row_keys(self, i0: int, i1: int) -> torch.Tensor | None:
        """The noise keys of query block [i0, i1)'s rows: B,K,R,1 (None: hard gates)."""
        if self.head_keys is None:
            return None
        pos = torch.arange(i0, i1, device=self.device)
        return _row_keys(self.head_keys, pos[:, None]).view(self.lay.B, self.lay.K, -1, 1)

    def key_blocks(self, i0: int, i1: int, block_k: int):
        """Key blocks a query block [i0, i1) sees: (j0, j1, causal bias or None, the block's
        noise column keys or None). Compiled tiles get a bias on every block, zeros where no
        key lies after a query, so that one kernel serves them all."""
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            bias = None
            if j1 - 1 > i0 or self.compiled:
                bias = _causal_bias(i0, i1, j0, j1, self.lay.G, self.device, self.biases)
            yield j0, j1, bias, None if self.column_keys is None else self.column_keys[j0:j1]


def _rows(x: torch.Tensor, lay: _Layout, i0: int, i1: int) -> torch.Tensor:
    """x B,K,G,T,* -> B,K,R,* for positions [i0, i1): R = G * (i1 - i0) rows."""
    return x[:, :, :, i0:i1].reshape(lay.B, lay.K, lay.G * (i1 - i0), *x.shape[4:])


def _step(x: torch.Tensor) -> torch.Tensor:
    """1[x > 0] as float32, in place when it can: sign and relu are far cheaper than a
    comparison into bool and a conversion back."""
    return torch.sign(x).relu_()


# One key block of one query block, forward and backward. The caller loops over the tiles;
# these hold every elementwise step, so `torch.compile` can fuse a tile's dozen passes over
# its R x tk scores into a few loops (see `_tile_functions`). bias: the causal mask, or None
# where the whole tile is causal (see `_Tiles.key_blocks`). row_keys None: hard gates.


def _forward_tile(qb, kb, vb, bias, offset: float, row_keys, column_keys, state):
    """Advance a query block's online softmax over one key block. state: the running max m,
    the denominator over ALL causal keys, the numerator acc over OPEN keys, and the gate
    statistics row_sig (sum of sig(g)) and row_open (count of g > 0); B,K,R,1 (acc B,K,R,D).
    Returns the new state."""
    m, denom, acc, row_sig, row_open = state
    s = qb @ kb.transpose(-1, -2)  # B,K,R,tk, scaled: q comes pre-scaled
    if bias is not None:  # adding 0 or -inf: a masked fill in one cheap pass
        s.add_(bias)
    g = s + offset  # the gate logit (a new tensor: s changes below)
    hard = _step(g)  # the deterministic gate 1[g > 0]
    row_open = row_open + hard.sum(-1, keepdim=True)
    sg = torch.sigmoid(g)
    row_sig = row_sig + sg.sum(-1, keepdim=True)
    if row_keys is not None:  # g + l > 0  <=>  w < sig(g)
        z = _step(sg.sub_(_uniform(row_keys, column_keys)))
    else:
        z = hard
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # finite: key 0 is in every row
    alpha = torch.exp(m - m_new)
    e = s.sub_(m_new).exp_()  # exp(s - m) in place
    denom = denom * alpha + e.sum(-1, keepdim=True)
    acc = acc * alpha + e.mul_(z) @ vb
    return m_new, denom, acc, row_sig, row_open


def _backward_tile(
    qb, kb, vb, bias, offset: float, row_keys, column_keys, lse_b, dob, neg_delta_b, d_sig_b
):
    """One tile's ds (B,K,R,tk, the gradient of the scaled scores) and its dv contribution
    A^T dO (B,K,tk,D; None without an output gradient), from recomputed scores and gates."""
    s = qb @ kb.transpose(-1, -2)
    if bias is not None:
        s.add_(bias)
    g = s + offset  # a new tensor: s changes below
    stochastic = row_keys is not None
    sg = torch.sigmoid(g) if stochastic or d_sig_b is not None else None
    ds = dv = None  # at least one of the two terms below is there
    if d_sig_b is not None:  # the statistic: dE/count * sig'(g)
        ds = torch.ops.aten.sigmoid_backward(d_sig_b.expand_as(sg), sg)
    if dob is not None:
        if stochastic:
            w = _uniform(row_keys, column_keys)
            z = _step(sg - w)  # the forward's arithmetic, so the same gates
            # z~'s value z plus its straight-through slope sig'(n) = ab / (a + b)^2
            a = torch.rsub(w, 1.0).mul_(sg)  # sig(g) (1 - w)
            b = torch.sigmoid(g.neg()).mul_(w)  # sig(-g) w
            z_slope = (a * b).div_(a.add_(b).square_()).add_(z)
        else:
            z = _step(g)
            z_slope = z
        p = s.sub_(lse_b).exp_()  # the softmax over all keys, recomputed in place
        dv = (p * z).transpose(-1, -2) @ dob  # A^T dO
        grad = dob @ vb.transpose(-1, -2)  # G_ij = dO_i . v_j
        grad.mul_(z_slope).add_(neg_delta_b)  # G z~' - Delta, in place
        ds = grad.mul_(p) if ds is None else ds.addcmul_(grad, p)  # times p
    return ds, dv


_COMPILED: dict = {}  # "forward"/"backward" -> compiled tile function; "failed" -> the error


def _tile_functions(compiled: bool):
    """(forward tile, backward tile), eager or through `torch.compile` (inductor: C++/OpenMP
    loops on CPU, Triton on CUDA). Shapes are compiled dynamic, so every tile size, batch and
    length shares one kernel per gate mode; inductor caches them on disk across processes."""
    if not compiled or "failed" in _COMPILED:
        return _forward_tile, _backward_tile
    if not _COMPILED:
        _COMPILED["forward"] = torch.compile(_forward_tile, dynamic=True)
        _COMPILED["backward"] = torch.compile(_backward_tile, dynamic=True)
    return _COMPILED["forward"], _COMPILED["backward"]


def _forward(
    q, k, v, offset: float, stochastic: bool, seed: int, block_q: int, block_k: int, compiled: bool
):
    B, H, T, D = q.shape
    K = k.shape[1]
    lay = _Layout(B, K, H // K, T, D)
    f32 = torch.float32
    tile, _ = _tile_functions(compiled)
    # q pre-scaled: exact for the usual power-of-4 head dims, where sqrt(D) is a power of 2
    qs = (q.to(f32) * (1.0 / math.sqrt(D))).view(B, K, lay.G, T, D)  # B,K,G,T,D
    kf, vf = k.to(f32), v.to(f32)  # B,K,T,D
    out = torch.empty(B, K, lay.G, T, D, dtype=f32, device=q.device)
    lse = torch.empty(B, K, lay.G, T, dtype=f32, device=q.device)
    sig_sum = torch.zeros(B, K, lay.G, dtype=f32, device=q.device)
    open_edges = torch.zeros(B, K, lay.G, dtype=torch.int64, device=q.device)
    empty = torch.zeros(B, K, lay.G, dtype=torch.int64, device=q.device)
    tiles = _Tiles(lay, stochastic, seed, compiled, q.device)
    for i0 in range(0, T, block_q):
        i1 = min(i0 + block_q, T)
        tq = i1 - i0
        R = lay.G * tq
        qb = _rows(qs, lay, i0, i1)  # B,K,R,D
        zeros = torch.zeros(B, K, R, 1, dtype=f32, device=q.device)
        m = torch.full((B, K, R, 1), float("-inf"), dtype=f32, device=q.device)
        state = (m, zeros, torch.zeros(B, K, R, D, dtype=f32, device=q.device), zeros, zeros)
        row_keys = tiles.row_keys(i0, i1)
        for j0, j1, bias, cols in tiles.key_blocks(i0, i1, block_k):
            state = tile(qb, kf[:, :, j0:j1], vf[:, :, j0:j1], bias, offset, row_keys, cols, state)
        m, denom, acc, row_sig, row_open = state
        out[:, :, :, i0:i1] = (acc / denom).view(B, K, lay.G, tq, D)  # no open key: stays 0
        lse[:, :, :, i0:i1] = (m + denom.log()).view(B, K, lay.G, tq)
        sig_sum += row_sig.view(B, K, lay.G, tq).sum(-1)
        row_open = row_open.view(B, K, lay.G, tq).to(torch.int64)  # counts, exact in float32
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
    q,
    k,
    v,
    out,
    lse,
    d_out,
    d_expected,
    offset,
    stochastic,
    seed,
    block_q,
    block_k,
    needs,
    compiled,
):
    B, H, T, D = q.shape
    K = k.shape[1]
    lay = _Layout(B, K, H // K, T, D)
    f32 = torch.float32
    _, tile = _tile_functions(compiled)
    scale = 1.0 / math.sqrt(D)
    qs = (q.to(f32) * scale).view(B, K, lay.G, T, D)
    kf, vf = k.to(f32), v.to(f32)
    dq = torch.zeros(B, K, lay.G, T, D, dtype=f32, device=q.device)
    dk = torch.zeros(B, K, T, D, dtype=f32, device=q.device)
    dv = torch.zeros(B, K, T, D, dtype=f32, device=q.device)
    dob = neg_delta_b = d_sig_b = None
    if d_out is not None:
        d_out = d_out.to(f32).view(B, K, lay.G, T, D)
        delta = (d_out * out.to(f32).view(B, K, lay.G, T, D)).sum(-1)  # B,K,G,T: dO_i . o_i
    if d_expected is not None:  # dE/count per (b, h), broadcast over a block's positions
        d_sig = (d_expected.to(f32) / (T * (T + 1) // 2)).view(B, K, lay.G, 1)
    tiles = _Tiles(lay, stochastic, seed, compiled, q.device)
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
        row_keys = tiles.row_keys(i0, i1)
        for j0, j1, bias, cols in tiles.key_blocks(i0, i1, block_k):
            kb, vb = kf[:, :, j0:j1], vf[:, :, j0:j1]
            ds, dvb = tile(
                qb, kb, vb, bias, offset, row_keys, cols, lse_b, dob, neg_delta_b, d_sig_b
            )
            if dvb is not None:
                dv[:, :, j0:j1] += dvb
            if needs[0]:
                dqb += ds @ kb
            if needs[1]:
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ qb
            del ds, dvb
        dq[:, :, :, i0:i1] = dqb.view(B, K, lay.G, tq, D)
    return dq.view(B, H, T, D).mul_(scale), dk, dv  # dk took the scale from qs


def _eager_if_compile_fails(fn, *args, compiled: bool):
    """fn(*args, compiled) and, should `torch.compile` fail (no C++ compiler, an unsupported
    backend), a warning and the eager tiles from then on: the results are the same."""
    if compiled and "failed" not in _COMPILED:
        try:
            return fn(*args, compiled=True)
        except Exception as exc:  # noqa: BLE001 - any compiler failure; eager re-raises real errors
            _COMPILED["failed"] = exc
            warnings.warn(
                f"gated attention runs its eager tiles: torch.compile failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); set {COMPILE_ENV}=0 to skip it",
                RuntimeWarning,
                stacklevel=3,
            )
    return fn(*args, compiled=False)


class _GatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offset, stochastic, seed, block_q, block_k, compiled):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, expected_open, open_edges, empty = _eager_if_compile_fails(
                _forward, q, k, v, offset, stochastic, seed, block_q, block_k, compiled=compiled
            )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (offset, stochastic, seed, block_q, block_k)
        ctx.compiled = compiled
        ctx.mark_non_differentiable(open_edges, empty)
        ctx.set_materialize_grads(False)
        return out, expected_open.to(q.dtype), open_edges, empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_expected, _d_open, _d_empty):
        q, k, v, out, lse = ctx.saved_tensors
        if d_out is None and d_expected is None:
            return (None,) * 9
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _eager_if_compile_fails(
                _backward, q, k, v, out, lse, d_out, d_expected, *ctx.settings,
                ctx.needs_input_grad, compiled=ctx.compiled,
            )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *(None,) * 6


def compile_by_default(q: torch.Tensor) -> bool:
    """Whether `gated_attention` compiles its tiles when not told: {COMPILE_ENV}=1 or 0 decides;
    unset, it compiles for training (gradients on), where fused tiles beat eager ones at every
    size measured (half the time at T = 20-256, 0.75-0.9 of it at 1024-4096; bench_attention.py).
    The compile costs tens of seconds once per machine (inductor keeps its kernels on disk), a
    few seconds per process after that. Forward-only use stays eager: there, hard gates run
    about as fast either way."""
    setting = os.environ.get(COMPILE_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return torch.is_grad_enabled() and q.requires_grad


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
    compile: bool | None = None,
) -> GatedAttentionOutput:
    """Causal gated attention of q [B,H,T,D] over k, v [B,K,T,D] (K divides H: grouped
    key/value heads are shared, never copied), with gate offset b = `offset`.

    mode "stochastic" draws logistic noise keyed by `seed` (drawn from torch's generator when
    None) and passes the straight-through gradient; "hard" gates are 1[s + b > 0]. Returns
    the output and the per-(batch, head) gate statistics; output and expected_open carry
    gradients to q, k and v.

    `compile`: fuse each tile's elementwise work with `torch.compile` (default:
    `compile_by_default`); the same results up to float rounding, and eager tiles should
    compiling fail. Tiles: `block_q` query positions by `block_k` keys (default BLOCK_Q, or
    COMPILED_BLOCK_Q compiled, by BLOCK_K); the results do not depend on them beyond float
    rounding."""
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
    compiled = compile_by_default(q) if compile is None else bool(compile)
    block_q = block_q or (COMPILED_BLOCK_Q if compiled else BLOCK_Q)
    block_k = block_k or BLOCK_K
    result = _GatedAttention.apply(
        q, k, v, float(offset), stochastic, int(seed or 0), int(block_q), int(block_k), compiled
    )
    return GatedAttentionOutput(*result)
