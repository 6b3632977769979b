"""Pieces several stages share, each in one place: the early stop of a forward pass (harvest,
feature statistics, the frozen replacement model), the writer of circuit-tracer's CLT
layout (save_clt and export); and the parts `sparsify` is split into."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from sparse_circuits.clt.cltdir import load_clt, save_clt, write_layer_files
from sparse_circuits.clt.export import ExportConfig, export
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.sparse_attention.hooks import capture, hooks, stop_after
from sparse_circuits.sparse_attention.sparsify import constraint_loss, is_better_candidate


def test_stop_after_ends_the_forward_pass_there(make_tiny_model):
    model = make_tiny_model()
    tokens = torch.randint(
        1, model.cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0)
    )
    names = ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"]
    with torch.no_grad(), capture(model, names) as full:
        model(tokens)
    later: list[str] = []
    with (
        torch.no_grad(),
        capture(model, names) as got,
        hooks(model, {"blocks.1.hook_mlp_out": lambda x: later.append("mlp_out")}),
        stop_after(model, names[-1]),
    ):
        model(tokens)
        later.append("after the call")  # never reached: the forward call ends the block
    assert later == [] and got.keys() == full.keys()
    for n in names:
        torch.testing.assert_close(got[n], full[n])
    seen = []
    with torch.no_grad(), stop_after(model, "final_norm", seen.append):
        model(tokens)
    assert len(seen) == 1 and seen[0].shape == (3, 8, model.cfg.d_model)
    with torch.no_grad():  # the hook is gone after the block
        assert model(tokens).logits.shape == (3, 8, model.cfg.vocab_size)


def test_save_clt_and_export_write_the_layout_with_one_writer(tmp_path):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_model=8, d_features=16, cross_layer=False))
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_()
    save_clt(clt, tmp_path / "clt")
    for dtype in ("float32", "bfloat16"):
        out = export(
            ExportConfig(clt=tmp_path / "clt", out=tmp_path / dtype, dtype=dtype, model_name="m")
        )
        for i in range(3):
            for kind in ("enc", "dec"):
                name = f"W_{kind}_{i}.safetensors"
                ours, theirs = load_file(tmp_path / "clt" / name), load_file(out / name)
                assert ours.keys() == theirs.keys()
                for k in ours:
                    assert theirs[k].dtype == getattr(torch, dtype)
                    torch.testing.assert_close(theirs[k], ours[k].to(theirs[k].dtype), msg=k)
                if dtype == "float32":  # the same writer: the same bytes
                    assert (tmp_path / "clt" / name).read_bytes() == (out / name).read_bytes()
        assert load_file(out / "W_dec_0.safetensors")["W_dec_0"][:, 1:].count_nonzero() == 0
        direct = tmp_path / f"direct-{dtype}"  # the writer itself, called as export calls it
        direct.mkdir()
        write_layer_files(load_clt(tmp_path / "clt"), direct, getattr(torch, dtype))
        for i in range(3):
            for kind in ("enc", "dec"):
                name = f"W_{kind}_{i}.safetensors"
                assert (direct / name).read_bytes() == (out / name).read_bytes()


# ----------------------------------------------------------------------------- sparsify's parts


def test_constraint_loss_is_open_fraction_plus_lambda_ce_plus_distillation(make_tiny_model):
    model = make_tiny_model(gate_offset=None)
    teacher = make_tiny_model(seed=1, gate_offset=None)
    x = torch.randint(1, model.cfg.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        dense = teacher(x, y)
    model.set_gate("stochastic", 0.5)
    torch.manual_seed(0)
    o = model(x, y)
    loss, open_fraction, kl = constraint_loss(o, dense, lam=3.0, distill_weight=0.5)
    # R from the gate statistics' definition: mean over layers, sequences and heads
    R = sum(s.expected_open.mean() for s in o.gate_stats) / len(o.gate_stats)
    p, q = dense.logits.softmax(-1), o.logits.softmax(-1)
    kl_per_token = (p * (p.log() - q.log())).sum(-1).mean()  # KL(dense ‖ model), by hand
    torch.testing.assert_close(open_fraction, R)
    torch.testing.assert_close(kl, kl_per_token, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, R + 3.0 * o.loss + 0.5 * kl_per_token, atol=1e-5, rtol=1e-5)
    plain, _, zero = constraint_loss(o, dense, lam=3.0, distill_weight=0.0)
    assert zero == 0 and torch.allclose(plain, R + 3.0 * o.loss)


def test_selection_keeps_sparser_weights_within_tau_and_accuracy():
    kw = dict(tau=1.0, best_connectivity=0.2)
    assert is_better_candidate({"loss": 0.99, "connectivity": 0.1}, **kw)
    assert not is_better_candidate({"loss": 1.01, "connectivity": 0.1}, **kw)  # misses τ
    assert not is_better_candidate({"loss": 0.9, "connectivity": 0.2}, **kw)  # not sparser
    task = dict(dense_accuracy=0.99, accuracy_tolerance=0.005)
    assert is_better_candidate({"loss": 0.9, "connectivity": 0.1, "accuracy": 0.986}, **kw, **task)
    assert not is_better_candidate(
        {"loss": 0.9, "connectivity": 0.1, "accuracy": 0.98}, **kw, **task
    )
