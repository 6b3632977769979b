"""CLT evaluation, export and feature statistics on a tiny random model with a tiny CLT:
metrics against hand computation, the splice against a layer-by-layer forward written out
here, the circuit-tracer layout read back, top contexts against brute force, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
import zarr
from safetensors import safe_open

from sparse_circuits.cli import main
from sparse_circuits.clt.cltdir import load_clt, save_clt
from sparse_circuits.clt.evaluate import EvalCLTConfig, eval_clt, evaluate, evaluate_store
from sparse_circuits.clt.export import ExportConfig, export
from sparse_circuits.clt.features import FeatureStatsConfig, read_feature
from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.clt.splice import CLTSplice, spliced_logits, true_mlp
from sparse_circuits.sparse_attention.hooks import capture, freeze
from sparse_circuits.sparse_attention.modeldir import load_model

L, M, NF = 2, 16, 32  # the tiny model's layers and width; features per layer
BOS = 0  # the tiny model's BOS id (conftest), at position 0 of every token_file sequence


def make_clt(seed=0, activation="jumprelu", n_layers=L, d_model=M, **kw) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(
        CLTConfig(
            n_layers=n_layers,
            d_model=d_model,
            d_features=NF,
            activation=activation,
            initial_threshold=0.2,
            **kw,
        )
    )
    with torch.no_grad():
        for W in clt.W_dec:
            W.mul_(20.0)  # the tiny model's MLP outputs are large
        clt.b_enc.normal_(0, 0.2)
        clt.b_enc[:, :3] = -100.0  # dead
        clt.b_enc[:, 3:5] = 100.0  # dense: active everywhere
        clt.b_dec.normal_()
    return clt.eval()


@pytest.fixture
def clt_dir(tmp_path) -> Path:
    return save_clt(make_clt(), tmp_path / "clt")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, token_file):
    model, _ = load_model(tiny_model_dir)
    seqs = torch.from_numpy(np.load(token_file)).long()
    return model.eval(), seqs


def mlp_acts(model, seqs):
    """MLP inputs and outputs of every layer: N,T,L,M each."""
    names = [f"blocks.{li}.hook_mlp_{k}" for li in range(L) for k in ("in", "out")]
    with torch.no_grad(), capture(model, names) as acts:
        model(seqs)
    stack = lambda k: torch.stack([acts[f"blocks.{li}.hook_mlp_{k}"] for li in range(L)], dim=2)  # noqa: E731
    return stack("in"), stack("out")


@torch.no_grad()
def layer_by_layer_logits(model, clt, tokens, keep):
    """The spliced forward written out block by block, with the CLT's own batch API."""
    B, T = tokens.shape
    x = model.embed(tokens)
    if model.pos_embed is not None:
        x = x + model.pos_embed(torch.arange(T))
    rope = model.rope(T, tokens.device)
    features = torch.zeros(B * T, L, NF)
    for li, block in enumerate(model.blocks):
        x = x + block.attn(block.attn_norm(x), rope)
        h = block.mlp_norm(x)  # the spliced model's own MLP input
        slot = torch.zeros(B * T, L, M)
        slot[:, li] = h.reshape(B * T, M)
        features[:, li] = clt.activate(clt.encode(slot))[:, li]
        recon = clt.decode(features)[:, li].view(B, T, M)
        x = x + torch.where(keep[..., None], recon, block.mlp(h))
    return model.lm_head(model.final_norm(x))


# ----------------------------------------------------------------------------- eval-clt


def test_metrics_equal_hand_computation(tiny, tiny_model_dir, token_file, clt_dir):
    model, seqs = tiny
    (clt_dir / "metrics.json").write_text(json.dumps({"steps": 7, "fvu": -1.0}))
    eval_clt(EvalCLTConfig(clt=clt_dir, model=tiny_model_dir, tokens_file=token_file, batch_size=7))
    got = json.loads((clt_dir / "metrics.json").read_text())

    clt = load_clt(clt_dir)
    keep = seqs != BOS
    x, y = mlp_acts(model, seqs)
    with torch.no_grad():
        out = clt(x[keep])
    y = y[keep].double()
    err = (out.reconstruction.double() - y).pow(2).sum((0, 2))
    var = (y - y.mean(0)).pow(2).sum((0, 2))
    active = out.features != 0  # R,L,F
    freq = active.double().mean(0)
    assert got["steps"] == 7  # keys already there are kept, ours replaced
    assert got["eval_rows"] == int(keep.sum()) == 600
    np.testing.assert_allclose(got["fvu_per_layer"], (err / var).numpy(), rtol=1e-6)
    assert got["fvu"] == pytest.approx(float(err.sum() / var.sum()), rel=1e-6)
    np.testing.assert_allclose(
        got["l0_per_layer"], active.sum(-1).double().mean(0).numpy(), rtol=1e-9
    )
    assert got["l0"] == pytest.approx(float(active.sum(-1).double().mean()))
    assert got["dead_fraction"] == pytest.approx(float((freq == 0).double().mean()))
    assert got["dense_fraction"] == pytest.approx(float((freq > 0.1).double().mean()))
    assert got["dead_per_layer"] == [3, 3] and min(got["dense_per_layer"]) >= 2  # as built
    assert got["dead_per_layer"] == (freq == 0).sum(-1).tolist()

    # Splice figures against the layer-by-layer forward: next-token targets, last position unscored.
    spliced = layer_by_layer_logits(model, clt, seqs, keep)[:, :-1].flatten(0, 1)
    with torch.no_grad():
        original = model(seqs).logits[:, :-1].flatten(0, 1)
    t = seqs[:, 1:].flatten()
    lp_o, lp_s = original.double().log_softmax(-1), spliced.double().log_softmax(-1)
    assert got["spliced_positions"] == t.numel()
    assert got["spliced_ce_delta"] == pytest.approx(
        float(F.nll_loss(lp_s, t) - F.nll_loss(lp_o, t)), rel=1e-5
    )
    assert got["spliced_kl"] == pytest.approx(
        float((lp_o.exp() * (lp_o - lp_s)).sum(-1).mean()), rel=1e-5
    )
    agree = float((lp_o.argmax(-1) == lp_s.argmax(-1)).double().mean())
    assert got["spliced_top1_agreement"] == pytest.approx(agree)
    assert agree < 1  # a random CLT: the figures are not trivially 0 and 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_splice_reads_the_spliced_models_own_mlp_inputs(family, make_tiny_model):
    model = make_tiny_model(seed=3, family=family)
    clt = make_clt(seed=4)
    tokens = torch.randint(1, 50, (3, 16))
    tokens[:, 0] = BOS
    keep = tokens != BOS
    with torch.no_grad():
        got = spliced_logits(model, CLTSplice(clt), tokens, keep)
    torch.testing.assert_close(
        got, layer_by_layer_logits(model, clt, tokens, keep), rtol=1e-4, atol=1e-4
    )


def test_perfect_replacement_changes_nothing(tiny):
    model, seqs = tiny
    with torch.no_grad():
        assert torch.equal(spliced_logits(model, true_mlp(model), seqs[:5]), model(seqs[:5]).logits)
    targets = torch.cat([seqs[:, 1:], torch.full_like(seqs[:, :1], -100)], dim=1)
    m = evaluate(
        model,
        make_clt(),
        seqs,
        targets,
        batch_size=16,
        reconstruction=False,
        replacement=true_mlp(model),
    )
    assert m["spliced_ce_delta"] == 0 and m["spliced_kl"] == 0 and m["spliced_top1_agreement"] == 1
    # and the CLT itself, a random one, does change the model
    m = evaluate(model, make_clt(), seqs, targets, batch_size=16, reconstruction=False)
    assert m["spliced_kl"] > 0 and m["spliced_top1_agreement"] < 1


def test_store_rows_give_the_models_figures(tmp_path, tiny_model_dir, token_file, clt_dir):
    store = str(tmp_path / "acts.zarr")
    harvest(
        HarvestConfig(
            model=tiny_model_dir, out=store, tokens_file=token_file, dtype="float16", shard_rows=128
        )
    )
    eval_clt(EvalCLTConfig(clt=clt_dir, model=tiny_model_dir, tokens_file=token_file))
    from_model = json.loads((clt_dir / "metrics.json").read_text())
    eval_clt(
        EvalCLTConfig(clt=clt_dir, model=tiny_model_dir, tokens_file=token_file, activations=store)
    )
    from_store = json.loads((clt_dir / "metrics.json").read_text())
    assert from_store["eval"]["rows_from"] == store and from_store["eval_rows"] == 600
    np.testing.assert_allclose(from_store["fvu_per_layer"], from_model["fvu_per_layer"], rtol=2e-3)
    np.testing.assert_allclose(from_store["l0_per_layer"], from_model["l0_per_layer"], rtol=2e-2)
    assert from_store["spliced_ce_delta"] == from_model["spliced_ce_delta"]
    with pytest.raises(ValueError, match="2 layers of d_model 16.*2 layers of d_model 8"):
        evaluate_store(make_clt(d_model=8), store)
    zarr.open_group(store, mode="r+").attrs["complete"] = False  # as while a harvest writes it
    with pytest.raises(ValueError, match="incomplete"):
        eval_clt(
            EvalCLTConfig(
                clt=clt_dir, model=tiny_model_dir, tokens_file=token_file, activations=store
            )
        )


# ----------------------------------------------------------------------------- export


def circuit_tracer_read(path: Path):
    """Read an export the way circuit-tracer's loader does: layers counted by W_enc_* files,
    sizes from shapes, JumpReLU (a > θ) when threshold_0 exists; config.json never opened."""
    n = len(list(path.glob("W_enc_*.safetensors")))
    enc, dec = [], []
    for i in range(n):
        with safe_open(str(path / f"W_enc_{i}.safetensors"), "pt") as f:
            enc.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        with safe_open(str(path / f"W_dec_{i}.safetensors"), "pt") as f:
            dec.append(f.get_tensor(f"W_dec_{i}"))

    def reconstruct(x):  # x: B,L,M
        acts = []
        for i in range(n):
            pre = x[:, i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
            acts.append(
                pre * (pre > enc[i][f"threshold_{i}"]) if f"threshold_{i}" in enc[i] else pre.relu()
            )
        return torch.stack(
            [
                sum(acts[i] @ dec[i][:, k - i] for i in range(k + 1)) + enc[k][f"b_dec_{k}"]
                for k in range(n)
            ],
            dim=1,
        )

    return enc, dec, reconstruct


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_export_is_circuit_tracers_layout_and_reads_back_identically(tmp_path, activation):
    clt = make_clt(activation=activation)
    src = save_clt(clt, tmp_path / "clt")
    out = export(ExportConfig(clt=src, out=tmp_path / "export", model_name="tiny-model"))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["config.json", "config.yaml"]
        + [f"W_{k}_{i}.safetensors" for i in range(L) for k in ("enc", "dec")]
    )
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg == {
        "model_name": "tiny-model", "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out", "scan": "clt",
    }  # fmt: skip
    enc, dec, reconstruct = circuit_tracer_read(out)
    for i in range(L):
        want = {f"W_enc_{i}": (NF, M), f"b_enc_{i}": (NF,), f"b_dec_{i}": (M,)}
        if activation == "jumprelu":
            want[f"threshold_{i}"] = (NF,)
        assert {k: tuple(v.shape) for k, v in enc[i].items()} == want
        assert tuple(dec[i].shape) == (NF, L - i, M)
    x = torch.randn(64, L, M)
    with torch.no_grad():
        expected = clt(x)
        back = load_clt(out)(x)
    assert torch.equal(back.reconstruction, expected.reconstruction)
    assert torch.equal(back.features, expected.features)
    torch.testing.assert_close(reconstruct(x), expected.reconstruction, rtol=1e-5, atol=1e-4)

    # a second export replaces the first; a folder of something else is refused
    export(ExportConfig(clt=src, out=out, model_name="tiny-model", scan="s"))
    assert yaml.safe_load((out / "config.yaml").read_text())["scan"] == "s"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other than a CLT export"):
        export(ExportConfig(clt=src, out=tmp_path / "other", model_name="m"))


def test_export_refuses_weights_that_expect_normalised_inputs(tmp_path):
    src = save_clt(
        make_clt(),
        tmp_path / "clt",
        info={"activations": {"url": "acts.zarr", "attrs": {"model": "M"}}},
    )
    with pytest.raises(ValueError, match="normalisation is not folded"):
        export(ExportConfig(clt=src, out=tmp_path / "e"))
    stats = {"inputs_mean": torch.zeros(L, M), "inputs_scale": torch.ones(L), "targets_mean": torch.zeros(L, M),
             "targets_scale": torch.ones(L)}  # fmt: skip
    src = save_clt(
        make_clt(),
        tmp_path / "folded",
        stats=stats,
        info={"activations": {"url": "a", "attrs": {"model": "M"}}},
    )
    out = export(ExportConfig(clt=src, out=tmp_path / "e"))
    assert (
        yaml.safe_load((out / "config.yaml").read_text())["model_name"] == "M"
    )  # recorded with the store


# ----------------------------------------------------------------------------- feature statistics


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, tiny_model_dir, token_file):
    clt_dir = save_clt(make_clt(seed=5), tmp_path_factory.mktemp("feat") / "clt")
    rc = main(["feature-stats", "--clt", str(clt_dir), "--model", str(tiny_model_dir), "--tokens-file",
               str(token_file), "--batch-size", "3", "--top-k", "5", "--window", "3", "--histogram-bins", "8"])  # fmt: skip
    assert rc == 0
    return clt_dir


def test_feature_stats_match_brute_force(stats_run, tiny):
    model, seqs = tiny
    clt = load_clt(stats_run)
    keep = seqs != BOS
    x, _ = mlp_acts(model, seqs)
    with torch.no_grad():
        acts = (
            clt.activate(clt.encode(x.flatten(0, 1))).view(*seqs.shape, L, NF)
            * keep[..., None, None]
        )  # N,T,L,F
    N, T = seqs.shape
    checked = 0
    for li in range(L):
        for f in range(NF):
            got = read_feature(stats_run, li, f)
            a = acts[:, :, li, f]
            assert got["frequency"] == pytest.approx(float((a > 0).sum()) / 600)
            assert got["max_activation"] == pytest.approx(float(a.max()), rel=1e-5)
            values = a.flatten().sort(descending=True).values
            n_pos = min(5, int((values > 0).sum()))
            assert len(got["top_contexts"]) == n_pos
            # Ties (equal prefixes give equal activations) may pick other rows of the same value:
            # the values are the brute-force top, each at the row the context names.
            rows = {(c["doc"], c["pos"]) for c in got["top_contexts"]}
            assert len(rows) == n_pos
            for ctx, v in zip(got["top_contexts"], values[:n_pos], strict=True):
                doc, pos = ctx["doc"], ctx["pos"]
                assert ctx["activation"] == pytest.approx(float(v), rel=1e-5)
                assert ctx["activation"] == pytest.approx(float(a[doc, pos]), rel=1e-5)
                lo, hi = max(0, pos - 3), min(T, pos + 4)
                assert ctx["start_pos"] == lo and ctx["tokens"] == seqs[doc, lo:hi].tolist()
                np.testing.assert_allclose(
                    ctx["activations"], a[doc, lo:hi].numpy(), rtol=1e-5, atol=1e-6
                )
                assert ctx["activations"][ctx["center"]] == pytest.approx(float(v), rel=1e-5)
            nz = a[a > 0].double().numpy()
            edges, counts = (
                np.array(got["histogram"]["edges"]),
                np.array(got["histogram"]["counts"]),
            )
            assert counts.sum() == len(nz)
            if len(nz):
                width = edges[1]
                assert edges[-1] / 2 < nz.max() <= edges[-1]  # at least half the range in use
                np.testing.assert_array_equal(
                    counts, np.bincount(np.minimum(nz // width, 7).astype(int), minlength=8)
                )
            checked += n_pos > 0
    assert checked > L * NF // 2  # most features fired somewhere


def test_top_logits_are_the_decoders_direct_effect(stats_run, tiny):
    """Adding a feature's summed decoder to the final residual stream, the final norm's scale
    frozen, moves the logits in the order the stored top and bottom logits say."""
    model, seqs = tiny
    clt = load_clt(stats_run)
    tokens = seqs[:1]
    with torch.no_grad(), capture(model, ["final_norm.hook_scale"]) as acts:
        base = model(tokens).logits[0, -1]
    for li, f in ((0, 7), (1, 20)):
        d = clt.W_dec[li][f].sum(0)  # M
        add = lambda _m, _i, out, d=d: out + 1e-3 * d  # noqa: E731
        handle = model.blocks[-1].register_forward_hook(add)
        try:
            with torch.no_grad(), freeze(model, acts):
                moved = (model(tokens).logits[0, -1] - base).double()
        finally:
            handle.remove()
        got = read_feature(stats_run, li, f)
        assert [t["token_id"] for t in got["top_logits"]] == moved.topk(10).indices.tolist()
        assert [t["token_id"] for t in got["bottom_logits"]] == moved.topk(
            10, largest=False
        ).indices.tolist()


def shard_objects(features_dir: Path) -> list[Path]:
    return [
        p
        for p in features_dir.rglob("*")
        if p.is_file() and "c" in p.relative_to(features_dir).parts
    ]


def test_read_feature_reads_only_its_own_chunks(tmp_path, stats_run):
    """Zero every other feature's inner chunk (zarr v3 sharding: the index of (offset, nbytes)
    pairs and a crc32c at the shard's end): one feature still reads, another no longer does."""
    clt_dir = tmp_path / "clt"
    import shutil  # noqa: PLC0415

    shutil.copytree(stats_run, clt_dir)
    layer, index = 1, 6
    before = read_feature(clt_dir, layer, index)
    shards = shard_objects(clt_dir / "features")
    assert len(shards) == 14 * L  # one shard per array and layer
    for shard in shards:
        raw = bytearray(shard.read_bytes())
        table = np.frombuffer(bytes(raw[-(16 * NF + 4) : -4]), "<u8").reshape(NF, 2)
        shard_layer = int(shard.relative_to(clt_dir / "features").parts[2])
        for j, (offset, nbytes) in enumerate(table.tolist()):
            if (shard_layer, j) != (layer, index) and offset != 2**64 - 1:
                raw[offset : offset + nbytes] = bytes(nbytes)
        shard.write_bytes(bytes(raw))
    assert read_feature(clt_dir, layer, index) == before
    with pytest.raises(Exception):  # noqa: B017  (zstd or zarr, whichever notices first)
        read_feature(clt_dir, layer, index + 1)


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_commands(tmp_path, tiny_model_dir, token_file, clt_dir, capsys):
    assert (
        main(
            [
                "eval-clt",
                "--clt",
                str(clt_dir),
                "--model",
                str(tiny_model_dir),
                "--tokens-file",
                str(token_file),
            ]
        )
        == 0
    )
    metrics = json.loads((clt_dir / "metrics.json").read_text())
    for key in ("fvu", "fvu_per_layer", "l0_per_layer", "dead_fraction", "spliced_ce_delta", "spliced_top1_agreement",
                "spliced_kl", "dense_fraction", "l0"):  # fmt: skip
        assert key in metrics
    out = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--clt",
                str(clt_dir),
                "--format",
                "circuit-tracer",
                "--out",
                str(out),
                "--model-name",
                "m",
            ]
        )
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: --format has one choice
        main(["export", "--clt", str(clt_dir), "--format", "neuronpedia", "--out", str(out)])


def test_bad_input_is_named(tmp_path, tiny_model_dir, token_file, stats_run):
    def run(clt):
        eval_clt(
            EvalCLTConfig(
                clt=save_clt(clt, tmp_path / "bad"), model=tiny_model_dir, tokens_file=token_file
            )
        )

    with pytest.raises(ValueError, match="the CLT has 3 layers but the model has 2"):
        run(make_clt(n_layers=3))
    with pytest.raises(
        ValueError, match=r"the CLT has width \(d_model\) 8 but the model has d_model 16"
    ):
        run(make_clt(d_model=8, seed=1))
    good = save_clt(make_clt(), tmp_path / "good")
    (good / "W_dec_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="W_dec_1.safetensors"):
        eval_clt(EvalCLTConfig(clt=good, model=tiny_model_dir, tokens_file=token_file))
    with pytest.raises(FileNotFoundError, match="CLT directory"):
        export(ExportConfig(clt=tmp_path / "missing", out=tmp_path / "e", model_name="m"))
    with pytest.raises(FileNotFoundError, match="no feature statistics"):
        read_feature(tmp_path / "bad", 0, 0)
    with pytest.raises(ValueError, match="layer 2 is out of range: the CLT has 2 layers"):
        read_feature(stats_run, 2, 0)
    with pytest.raises(ValueError, match="feature 32 is out of range"):
        read_feature(stats_run, 0, 32)
    with pytest.raises(ValueError, match="power of two"):
        FeatureStatsConfig(clt=tmp_path, model=tmp_path, histogram_bins=10)
    with pytest.raises(ValueError, match="at most one data source"):
        EvalCLTConfig(clt=tmp_path, model=tmp_path, tokens_file=token_file, corpus=["x"])
    with pytest.raises(FileNotFoundError, match="records no training data"):
        eval_clt(EvalCLTConfig(clt=save_clt(make_clt(), tmp_path / "c2"), model=tiny_model_dir))
