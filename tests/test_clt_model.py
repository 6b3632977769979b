"""The CLT module: straight-through gradients against the Jumping Ahead formulas, BatchTopK's
JumpReLU conversion on held-out data, the per-layer special case, the reconstruction
against circuit-tracer's formula evaluated by hand on the exported per-layer files, and the
fused training forward (dense and sparse decoders) against the stages and formulas, outputs
and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sparse_circuits.clt.cltdir import load_clt, save_clt
from sparse_circuits.clt.model import (
    SPARSE_DECODE_MAX_DENSITY,
    CLTConfig,
    CrossLayerTranscoder,
    jumprelu,
    l0,
    sparsity_coefficient,
    step,
)

L, M, F = 3, 8, 16


def make_clt(seed: int = 0, **kw) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=M, d_features=F, **kw))
    with torch.no_grad():  # biases and decoder rows of visible size, so every term matters
        clt.b_enc.normal_(0, 0.3)
        clt.b_dec.normal_()
        for W in clt.W_dec:
            W.normal_(0, 0.3)
    return clt


# ----------------------------------------------------------------------------- straight-through


def test_jumprelu_and_step_gradients_follow_the_rectangle_kernel():
    theta, eps = 0.5, 0.1
    # Offsets from θ in units of ε: inside the window |x-θ| < ε/2 or outside it.
    offsets = torch.tensor([-2.0, -0.6, -0.45, -0.2, 0.0, 0.2, 0.45, 0.6, 2.0], dtype=torch.float64)
    x = (theta + offsets * eps).requires_grad_()
    threshold = torch.full_like(x, theta).requires_grad_()
    upstream = torch.linspace(0.5, 1.5, len(x), dtype=torch.float64)
    inside = offsets.abs() < 0.5

    a = jumprelu(x, threshold, eps)
    assert torch.equal(a.detach(), torch.where(x > theta, x, 0).detach())
    gx, gt = torch.autograd.grad(a, (x, threshold), upstream)
    assert torch.equal(gx, upstream * (x > theta))
    expected = torch.where(inside, -(theta / eps) * upstream, 0.0)
    torch.testing.assert_close(gt, expected)
    assert (gt[inside] < 0).all() and (gt[~inside] == 0).all()

    h = step(x, threshold, eps)
    assert torch.equal(h.detach(), (x > theta).double())
    gx, gt = torch.autograd.grad(h, (x, threshold), upstream)
    assert (gx == 0).all()
    torch.testing.assert_close(gt, torch.where(inside, -(1 / eps) * upstream, 0.0))


def test_jumprelu_threshold_gradient_sums_over_the_batch_through_log_threshold():
    clt = make_clt(activation="jumprelu", bandwidth=0.2, initial_threshold=0.3)
    x = torch.randn(64, L, M)
    out = clt(x)
    out.features.sum().backward()
    pre, theta = out.pre_acts.detach(), clt.threshold.detach()
    window = ((pre - theta).abs() < 0.1).float()  # |pre - θ| < ε/2
    # d/dlogθ = θ · d/dθ, and d(Σa)/dθ = Σ_batch -(θ/ε)·K
    expected = theta * (-(theta / 0.2) * window).sum(0)
    torch.testing.assert_close(clt.log_threshold.grad, expected)
    assert (clt.log_threshold.grad <= 0).all() and (clt.log_threshold.grad < 0).any()


# ----------------------------------------------------------------------------- TopK family


@pytest.mark.parametrize(
    ("activation", "scope"), [("batchtopk", "layer"), ("batchtopk", "all"), ("topk", "layer")]
)
def test_topk_family_converts_to_jumprelu_with_the_same_l0_on_held_out_data(activation, scope):
    k = 3
    clt = make_clt(activation=activation, k=k, batchtopk_scope=scope)
    calibration, held_out = torch.randn(4000, L, M), torch.randn(4000, L, M)
    with torch.no_grad():
        per_layer = l0(clt(held_out).features)
        if activation == "topk":
            assert (clt(held_out).features != 0).sum(-1).max() <= k
        elif scope == "layer":
            assert torch.allclose(per_layer, torch.full((L,), float(k)))  # exactly B·k per layer
        else:
            assert per_layer.sum().item() == pytest.approx(L * k)
        jump = clt.to_jumprelu(calibration)
        assert jump.cfg.activation == "jumprelu"
        jump_l0 = l0(jump(held_out).features)
    assert jump_l0.sum().item() == pytest.approx(per_layer.sum().item(), rel=0.05)
    if scope == "layer":
        torch.testing.assert_close(jump_l0, per_layer, rtol=0.08, atol=0)
    # Same weights; where JumpReLU fires, it passes the same pre-activation.
    with torch.no_grad():
        a = jump(held_out).features
        assert torch.equal(a[a != 0], jump.encode(held_out)[a != 0])


def test_auxk_reconstructs_the_residual_with_dead_features_only():
    clt = make_clt(activation="topk", k=2, k_aux=4)
    x, y = torch.randn(32, L, M), torch.randn(32, L, M)
    assert clt(x, y, dead=torch.zeros(L, F, dtype=torch.bool)).auxk == 0
    dead = torch.zeros(L, F, dtype=torch.bool)
    dead[:, :5] = True
    out = clt(x, y, dead=dead)
    assert out.auxk > 0
    out.auxk.backward()
    enc_grad = clt.W_enc.grad.abs().sum(-1)  # L,F
    assert (enc_grad[:, 5:] == 0).all() and (enc_grad[:, :5] > 0).any()


# ----------------------------------------------------------------------------- structure


def test_per_layer_transcoder_writes_only_to_its_own_layer(tmp_path):
    plt = make_clt(activation="relu", cross_layer=False)
    clt = make_clt(activation="relu", cross_layer=True)
    assert [tuple(W.shape) for W in plt.W_dec] == [(F, 1, M)] * L
    assert [tuple(W.shape) for W in clt.W_dec] == [(F, L - i, M) for i in range(L)]
    x = torch.randn(16, L, M)
    bumped = x.clone()
    bumped[:, 0] += 1.0
    with torch.no_grad():
        d_plt = plt(bumped).reconstruction - plt(x).reconstruction
        d_clt = clt(bumped).reconstruction - clt(x).reconstruction
    assert d_plt[:, 0].abs().max() > 0 and d_plt[:, 1:].abs().max() == 0
    assert d_clt[:, 1:].abs().max() > 0
    # Exported as a CLT whose decoders to later layers are zero, and read back as a per-layer one.
    save_clt(plt, tmp_path)
    W0 = load_file(tmp_path / "W_dec_0.safetensors")["W_dec_0"]
    assert W0.shape == (F, L, M) and (W0[:, 1:] == 0).all()
    back = load_clt(tmp_path)
    assert back.cfg.cross_layer is False and back.W_dec[0].shape == (F, 1, M)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("cross_layer", [True, False])
def test_reconstruction_equals_circuit_tracer_formula_on_exported_files(
    tmp_path, activation, cross_layer
):
    clt = make_clt(activation=activation, cross_layer=cross_layer)
    x = torch.randn(10, L, M)
    with torch.no_grad():
        ours = clt(x).reconstruction
    save_clt(clt, tmp_path)
    enc = [load_file(tmp_path / f"W_enc_{i}.safetensors") for i in range(L)]
    dec = [load_file(tmp_path / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(L)]
    assert ("threshold_0" in enc[0]) == (activation == "jumprelu")
    a = []
    for i in range(L):  # pre_i = x_i W_enc_iᵀ + b_enc_i; JumpReLU fires where pre > threshold
        pre = x[:, i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        a.append(pre * (pre > enc[i][f"threshold_{i}"]) if activation == "jumprelu" else pre.relu())
    for k in range(L):  # y_k = Σ_{i≤k} a_i W_dec_i[:, k-i, :] + b_dec_k
        y_k = enc[k][f"b_dec_{k}"].clone()
        for i in range(k + 1):
            y_k = y_k + a[i] @ dec[i][:, k - i, :]
        torch.testing.assert_close(ours[:, k], y_k, rtol=1e-5, atol=1e-5)
    back = load_clt(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x).reconstruction, ours, rtol=1e-5, atol=1e-5)


def test_save_refuses_topk_until_converted(tmp_path):
    with pytest.raises(ValueError, match="to_jumprelu"):
        save_clt(make_clt(activation="topk", k=2), tmp_path)


# ----------------------------------------------------------------------------- losses and init


def test_loss_terms_match_their_formulas():
    clt = make_clt(activation="relu", sparsity_c=3.0)
    x, y = torch.randn(20, L, M), torch.randn(20, L, M) * 2 + 1
    with torch.no_grad():
        out = clt(x, y)
        dec_norm = torch.stack([clt.W_dec[i].reshape(F, -1).norm(dim=1) for i in range(L)])  # L,F
        fvu = [
            ((out.reconstruction[:, k] - y[:, k]) ** 2).sum()
            / ((y[:, k] - y[:, k].mean(0)) ** 2).sum()
            for k in range(L)
        ]
        assert out.nmse.item() == pytest.approx(sum(fvu).item() / L, rel=1e-5)
        sparsity = torch.tanh(3.0 * out.features * dec_norm).sum() / 20
        assert out.sparsity.item() == pytest.approx(sparsity.item(), rel=1e-5)
        preact = (torch.relu(-out.pre_acts) * dec_norm).sum() / 20
        assert out.preact.item() == pytest.approx(preact.item(), rel=1e-5)
        fixed = clt(x, y, target_variance=torch.full((L,), 4.0))
        assert fixed.nmse.item() == pytest.approx(
            ((out.reconstruction - y) ** 2).mean().item() / 4, rel=1e-5
        )


def test_sparsity_coefficient_warms_up_linearly():
    assert [sparsity_coefficient(s, final=2.0, warmup_steps=10) for s in (0, 5, 10, 50)] == [
        0.0,
        1.0,
        2.0,
        2.0,
    ]
    assert sparsity_coefficient(0, final=2.0, warmup_steps=0) == 2.0


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_encoder_bias_init_hits_the_target_fire_rate(activation):
    clt = make_clt(activation=activation)
    x, y = torch.randn(2000, L, M), torch.randn(2000, L, M) + 3
    clt.init_from_batch(x, y, fire_rate=0.05)
    with torch.no_grad():
        rate = (clt(x).features != 0).float().mean(0)  # L,F
    assert rate.min() >= 0.045 and rate.max() <= 0.055
    torch.testing.assert_close(clt.b_dec.detach(), y.mean(0))


def test_counts_and_config_errors():
    clt = make_clt(activation="relu")
    assert clt.num_features == L * F
    assert clt.flops_per_token(training=False) == 2 * L * F * M + 2 * F * M * (L * (L + 1) // 2)
    with pytest.raises(ValueError, match="needs k"):
        CLTConfig(n_layers=2, d_model=4, d_features=8, activation="batchtopk")
    with pytest.raises(ValueError, match="exceeds"):
        CLTConfig(n_layers=2, d_model=4, d_features=8, activation="topk", k=9)
    assert math.isclose(
        make_clt(activation="jumprelu", initial_threshold=0.2).threshold[0, 0].item(),
        0.2,
        rel_tol=1e-6,
    )


# ----------------------------------------------------------------------------- the training forward


def reference_forward(clt: CrossLayerTranscoder, x, y, dead):
    """The training forward spelled out from the stages and the module docstring's formulas,
    batch-major and unfused: what the fast path must equal."""
    cfg = clt.cfg
    n_layers = cfg.n_layers
    pre = torch.einsum("blm,lfm->blf", x, clt.W_enc) + clt.b_enc
    a = clt.activate(pre)

    def decode(features, bias):
        out = []
        for k in range(n_layers):
            y_k = clt.b_dec[k] if bias else torch.zeros(cfg.d_model)
            for i in range(k + 1):
                if k - i < clt.W_dec[i].shape[1]:
                    y_k = y_k + features[:, i] @ clt.W_dec[i][:, k - i]
            out.append(y_k.expand(features.shape[0], -1))
        return torch.stack(out, 1)

    recon = decode(a, True)
    var = (y - y.mean(0)).pow(2).mean((0, 2))
    nmse = ((recon - y).pow(2).mean((0, 2)) / var).mean()
    norms = torch.stack([W.flatten(1).norm(dim=1) for W in clt.W_dec])  # L,F
    sparsity = torch.tanh(cfg.sparsity_c * a * norms).sum((1, 2)).mean()
    preact = (torch.relu(-pre) * norms).sum((1, 2)).mean()
    auxk = torch.zeros(())
    if cfg.activation in ("topk", "batchtopk") and dead.any():
        k_aux = min(cfg.k_aux or cfg.d_model // 2, cfg.d_features)
        values, index = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        aux = torch.zeros_like(pre).scatter(-1, index, values.relu())
        residual = (y - recon).detach()
        scale = (dead.sum() / (k_aux * n_layers)).clamp(max=1.0)
        auxk = scale * ((decode(aux, False) - residual).pow(2).mean((0, 2)) / var).mean()
    return recon, a, pre, nmse, sparsity, preact, auxk


@pytest.mark.parametrize(
    "kw",
    [
        {"activation": "relu", "sparse_decode": "never"},
        {"activation": "relu", "sparse_decode": "always"},
        {"activation": "jumprelu", "bandwidth": 0.5, "sparse_decode": "never"},
        {"activation": "jumprelu", "bandwidth": 0.5, "sparse_decode": "always"},
        {
            "activation": "jumprelu",
            "bandwidth": 0.5,
            "cross_layer": False,
            "sparse_decode": "always",
        },
        {"activation": "topk", "k": 3, "sparse_decode": "always"},
        {"activation": "topk", "k": 3, "sparse_decode": "never"},
        {"activation": "topk", "k": 3, "sparse_decode": "always", "cross_layer": False},
        {"activation": "batchtopk", "k": 3, "sparse_decode": "always"},
        {"activation": "batchtopk", "k": 3, "sparse_decode": "never"},
        {"activation": "batchtopk", "k": 3, "batchtopk_scope": "all"},
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_training_forward_equals_the_stages_outputs_and_gradients(kw):
    kw = dict(kw)
    sparse_decode = kw.pop("sparse_decode", "auto")
    clt = make_clt(**kw, k_aux=5)
    clt.sparse_decode = sparse_decode
    B = 48
    x, y = torch.randn(B, L, M), torch.randn(B, L, M)
    dead = torch.rand(L, F) < 0.4
    weights = [torch.randn(()) for _ in range(4)]  # every loss term reaches the parameters
    feature_weight = torch.randn(B, L, F)  # and the features output its own gradient

    def loss_and_grads(outputs):
        recon, a, _, nmse, sparsity, preact, auxk = outputs
        loss = nmse + weights[0] * sparsity + weights[1] * preact + weights[2] * auxk
        loss = loss + weights[3] * (recon.sum() / B + (a * feature_weight).sum() / B)
        clt.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in clt.named_parameters()}

    fast = clt(x, y, dead=dead)
    fast_grads = loss_and_grads(fast)
    ref = reference_forward(clt, x, y, dead[:, None].expand(L, B, F).transpose(0, 1))
    ref_grads = loss_and_grads(ref)
    for name, got, want in zip(fast._fields, fast, ref, strict=True):
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    for name, want in ref_grads.items():
        assert want.abs().max() > 0, f"{name} got no gradient: the comparison would prove nothing"
        torch.testing.assert_close(
            fast_grads[name], want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"∂{n}: {m}"
        )
    if kw["activation"] in ("topk", "batchtopk") and kw.get("batchtopk_scope") != "all":
        assert fast.auxk > 0  # the dead features' decoder path was exercised
    with torch.no_grad():  # inference (no targets) takes the stages' activation
        plain = clt(x)
        torch.testing.assert_close(plain.reconstruction, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clt.decode(ref[1]), ref[0], rtol=1e-5, atol=1e-5)


def test_sparse_decoder_is_chosen_by_the_active_fraction():
    def clt(sparse_decode="auto", **kw):
        with torch.device("meta"):
            model = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_features=1024, **kw))
        model.sparse_decode = sparse_decode
        return model

    dense_k = int(SPARSE_DECODE_MAX_DENSITY * 1024) + 1
    assert clt(activation="topk", k=8).decodes_sparse
    assert not clt(activation="topk", k=dense_k).decodes_sparse
    assert clt("always", activation="batchtopk", k=dense_k).decodes_sparse
    assert not clt("never", activation="topk", k=8).decodes_sparse
    assert "sparse_decode" not in CLTConfig.model_fields  # not saved with a CLT
