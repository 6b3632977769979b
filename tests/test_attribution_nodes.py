"""What the nodes of a graph hold: BOS positions without features (the error node carries the
MLP output there, as the CLT was trained), embedding nodes under our convention and
circuit-tracer's, a prompt on which no feature fires, and decoder vectors stored ragged.
Edges are checked against real interventions on the replacement model, vectors against the
model's own embedding tables, and graph JSON against its JSON Schema."""

from __future__ import annotations

import math

import jsonschema
import pytest
import torch

from sparse_circuits.attribution.attention import attention_attribution
from sparse_circuits.attribution.attribute import attribute
from sparse_circuits.attribution.frozen import FrozenGraph, Tap
from sparse_circuits.attribution.graph_json import graph_json, load_schema
from sparse_circuits.attribution.interventions import FeatureIntervention, intervene
from sparse_circuits.attribution.prune import graph_scores, prune
from sparse_circuits.attribution.replacement import ReplacementModel
from sparse_circuits.attribution.sources import SourceTable
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.clt.splice import CLTSplice, spliced_logits
from sparse_circuits.sparse_attention.hooks import capture
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer

T, VOCAB, BOS = 10, 24, 0


def make_model(family: str = "gpt2") -> Transformer:
    """A tiny model with peaked patterns; gpt2 is sparsified and has learned positions."""
    torch.manual_seed(0)
    kw = (
        dict(family="gpt2", n_heads=2, d_model=16, bias=True, gate=GateConfig(offset=0.0))
        if family == "gpt2"
        else dict(family="llama", n_heads=4, n_kv_heads=2, d_model=32, qkv_bias=True)
    )
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=2, d_mlp=2 * kw["d_model"], context_length=12,
        bos_token_id=BOS, **kw,
    )  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.mul_(15.0)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def make_clt(model: Transformer, fire_rate: float = 0.4, **kw) -> CrossLayerTranscoder:
    """Random weights, encoder biases set from the model's MLP inputs so that about
    `fire_rate` of the features fire on a token."""
    cfg, L = model.cfg, model.cfg.n_layers
    torch.manual_seed(100)
    clt = CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=cfg.d_model, d_features=kw.pop("d_features", 24), **kw)
    )
    tokens = torch.randint(1, cfg.vocab_size, (8, T))
    with torch.no_grad(), capture(model, [f"blocks.{li}.hook_mlp_in" for li in range(L)]) as got:
        model(tokens)
    inputs = torch.stack([got[f"blocks.{li}.hook_mlp_in"].flatten(0, 1) for li in range(L)], 1)
    with torch.no_grad():
        clt.W_enc.normal_(0, 1 / math.sqrt(cfg.d_model))
        if clt.cfg.activation == "jumprelu":
            clt.log_threshold.copy_(torch.empty(L, clt.cfg.d_features).uniform_(0.05, 0.5).log())
        clt.init_from_batch(inputs, inputs, fire_rate=fire_rate)
        for W in clt.W_dec:
            W.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.2)
    return clt


def bos_prompt() -> torch.Tensor:
    tokens = torch.randint(1, VOCAB, (T,), generator=torch.Generator().manual_seed(1))
    tokens[0] = BOS
    return tokens


def observed_change(g, base, result) -> torch.Tensor:
    """Change of every graph feature's pre-activation and every mean-centred target logit."""
    layer, pos, index = g.features.unbind(1)
    d_pre = (result.pre_acts - base.pre_acts)[pos, layer, index]
    centred = result.logits[-1] - result.logits[-1].mean()
    d_logit = centred - (base.logits[-1] - base.logits[-1].mean())
    return torch.cat([d_pre, d_logit[[t.plus for t in g.logit_targets]]])


def target_rows(g) -> torch.Tensor:
    return torch.cat([torch.arange(g.n_features), torch.arange(g.logit_offset, g.n_nodes)])


# ----------------------------------------------------------------------------- BOS


def test_bos_positions_hold_no_features_and_their_error_carries_the_mlp_output():
    model = make_model()
    clt = make_clt(model)
    tokens = bos_prompt()
    g = attribute(model=model, clt=clt, prompt=tokens, targets=list(range(VOCAB)),
                  max_feature_nodes=None, batch_size=32)  # fmt: skip
    assert g.featureless_positions == [0] and g.n_features > 30
    assert (g.features[:, 1] != 0).all()  # no feature at BOS

    rm = ReplacementModel(model, clt)
    run = rm.run_prompt(tokens)
    assert not run.features[0].any() and run.features[1:].any()
    torch.testing.assert_close(run.errors[:, 0], run.mlp_out[:, 0])  # the whole MLP output
    # The replacement model is the splice the CLT was evaluated with (BOS keeps its real MLP
    # output), and both reproduce the model's logits with the errors added back.
    keep = tokens[None] != BOS
    spliced = spliced_logits(model, CLTSplice(clt), tokens[None], keep=keep)[0]
    free = intervene(rm, run, freeze_attention=False, add={
        f"blocks.{li}.hook_mlp_out": -run.errors[li] * keep[0, :, None] for li in range(2)
    }).logits  # fmt: skip
    torch.testing.assert_close(free, spliced, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            intervene(rm, run).logits, model(tokens[None]).logits[0], atol=2e-5, rtol=1e-5
        )

    # The BOS error node's edges are the effect of adding that MLP output there.
    A, base = g.dense_adjacency(), intervene(rm, run, freeze_features=True)
    for li in range(2):
        delta = torch.zeros_like(run.errors[li])
        delta[0] = run.mlp_out[li, 0]
        result = intervene(rm, run, freeze_features=True, add={f"blocks.{li}.hook_mlp_out": delta})
        torch.testing.assert_close(A[target_rows(g), g.error_offset + li * T],
                                   observed_change(g, base, result), atol=1e-4, rtol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="holds no features"):
        intervene(rm, run, [FeatureIntervention(0, 0, 0, value=1.0)])

    doc = graph_json(g, prune(g, 0.9, 0.99))
    jsonschema.validate(doc, load_schema())
    assert doc["metadata"]["featureless_positions"]["positions"] == [0]
    assert not any(
        n["ctx_idx"] == 0 for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"
    )


def test_a_clt_trained_with_bos_rows_gets_features_there():
    model = make_model()
    clt = make_clt(model)
    info = {"activations": {"attrs": {"include_bos": True}}}
    g = attribute(model=model, clt=clt, prompt=bos_prompt(), clt_info=info, max_feature_nodes=None)
    assert g.featureless_positions == [] and (g.features[:, 1] == 0).any()


# ----------------------------------------------------------------------------- embedding nodes


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_embedding_conventions_against_interventions(family):
    """Ours: an embedding node holds the token plus the learned position embedding; circuit-
    tracer's: the token embedding alone (the model's own tables are the oracle). Each node's
    edges equal the effect of adding its vector at the embedding; the difference of the two
    conventions is the position embedding's effect, which "token" leaves with the biases."""
    model = make_model(family)
    clt = make_clt(model)
    tokens = torch.randint(1, VOCAB, (T,), generator=torch.Generator().manual_seed(4))
    kw = dict(
        model=model, clt=clt, prompt=tokens, targets=list(range(VOCAB)), max_feature_nodes=None
    )
    graphs = {e: attribute(**kw, embedding=e) for e in ("token+position", "token")}
    W_E = model.embed.weight.detach()
    P = (
        model.pos_embed.weight[:T].detach()
        if model.pos_embed is not None
        else torch.zeros(T, W_E.shape[1])
    )
    vectors = {"token+position": W_E[tokens] + P, "token": W_E[tokens]}
    for convention, g in graphs.items():
        want = convention if model.pos_embed is not None else "token"
        assert (
            g.embedding == want
            and graph_json(g, prune(g))["metadata"]["embedding_nodes"]["convention"] == want
        )
        rm = ReplacementModel(model, clt, embedding=convention)
        run = rm.run_prompt(tokens)
        torch.testing.assert_close(run.embeddings, vectors[convention])
        A, base = g.dense_adjacency(), intervene(rm, run, freeze_features=True)
        for p in range(T):
            delta = torch.zeros(T, W_E.shape[1])
            delta[p] = vectors[convention][p]
            result = intervene(rm, run, freeze_features=True, add={"hook_embed": delta})
            torch.testing.assert_close(A[target_rows(g), g.embed_offset + p],
                                       observed_change(g, base, result), atol=1e-4, rtol=1e-4)  # fmt: skip
        # edges plus what no node explains (now the position embedding too) give each logit
        bias = FrozenGraph(rm, run, 1, sources="bias").taps[Tap("final")][0, -1]
        for k, t in enumerate(g.logit_targets):
            got = A[g.logit_offset + k].sum() + bias @ t.direction(model.lm_head.weight)
            want_logit = run.logits[-1, t.plus] - run.logits[-1].mean()
            torch.testing.assert_close(got, want_logit, atol=1e-4, rtol=1e-4)
    ours, theirs = (graphs[e].dense_adjacency() for e in ("token+position", "token"))
    g = graphs["token"]
    torch.testing.assert_close(
        ours[:, : g.embed_offset], theirs[:, : g.embed_offset]
    )  # same elsewhere
    if model.pos_embed is not None:
        rm = ReplacementModel(model, clt)
        run = rm.run_prompt(tokens)
        base = intervene(rm, run, freeze_features=True)
        p = 3
        delta = torch.zeros(T, W_E.shape[1])
        delta[p] = P[p]
        result = intervene(rm, run, freeze_features=True, add={"hook_embed": delta})
        rows = target_rows(g)
        diff = ours[rows, g.embed_offset + p] - theirs[rows, g.embed_offset + p]
        torch.testing.assert_close(diff, observed_change(g, base, result), atol=1e-4, rtol=1e-4)
        assert diff.abs().max() > 1e-3


# ----------------------------------------------------------------------------- no active feature


def test_a_prompt_without_active_features_gives_a_graph_of_errors_and_embeddings():
    model = make_model()
    clt = make_clt(model)
    with torch.no_grad():
        clt.log_threshold.fill_(math.log(1e6))  # nothing fires
    tokens = torch.randint(1, VOCAB, (T,), generator=torch.Generator().manual_seed(2))
    g = attribute(model=model, clt=clt, prompt=tokens, targets=[3, 5], max_feature_nodes=100)
    assert g.n_features == g.n_active_features == 0 and g.n_edges > 0
    assert g.n_nodes == 2 * T + T + 2
    rm = ReplacementModel(model, clt)
    run = rm.run_prompt(tokens)
    A, base = g.dense_adjacency(), intervene(rm, run, freeze_features=True)
    for li, p in ((0, 2), (1, T - 1)):
        delta = torch.zeros_like(run.errors[li])
        delta[p] = run.errors[li, p]
        result = intervene(rm, run, freeze_features=True, add={f"blocks.{li}.hook_mlp_out": delta})
        torch.testing.assert_close(A[target_rows(g), g.error_offset + li * T + p],
                                   observed_change(g, base, result), atol=1e-4, rtol=1e-4)  # fmt: skip
    pruned = prune(g, 0.8, 0.98)
    scores = {"full": graph_scores(g), "pruned": graph_scores(g, pruned.edge_mask)}
    att = attention_attribution(model=model, clt=clt, graph=g, pruned=pruned, qk_edges=2)
    doc = graph_json(g, pruned, scores=scores, attention=att)
    jsonschema.validate(doc, load_schema())
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert "cross layer transcoder" not in kinds and "logit" in kinds


# ----------------------------------------------------------------------------- ragged decoder vectors


def test_decoder_vectors_are_stored_ragged_and_give_the_same_values():
    """One contribution vector per active feature, whatever the spread over positions: a
    position where every feature fires costs its own features, not T times as many."""
    model = make_model()
    clt = make_clt(model, d_features=64, fire_rate=0.1)
    tokens = torch.randint(1, VOCAB, (T,), generator=torch.Generator().manual_seed(1))
    rm = ReplacementModel(model, clt)
    with torch.no_grad():  # every feature of layer 0 reads position 5's MLP input, and only it
        x = rm.run_prompt(tokens).mlp_in[0, 5]
        gen = torch.Generator().manual_seed(5)
        noise = 0.01 * x.norm() * torch.randn(64, x.numel(), generator=gen)
        clt.W_enc[0] = x / x.norm() + noise / x.norm()
        clt.b_enc[0] = -0.97 * x.norm() + clt.log_threshold[0].exp()
    run = rm.run_prompt(tokens)
    sources = SourceTable(rm, run)
    M, counts = model.cfg.d_model, (run.features != 0).sum(-1)  # T,L
    assert counts[5, 0] == 64 and counts[:, 0].sum() < 64 + 2 * T
    stored = sum(blk.vectors.numel() for blk in sources.blocks)
    want = sum(int(counts[:, i].sum()) * (2 - i) * M for i in range(2))  # K_i = L - i
    assert stored == want
    assert stored * 3 < T * int(counts[:, 0].max()) * 2 * M  # padding would cost over 3x more

    fg = FrozenGraph(rm, run, 4)
    gen = torch.Generator().manual_seed(0)
    inject = {Tap("final"): torch.randn(4, T, M, generator=gen)}
    grads = fg.backward(inject)
    rows_all = sources.row_values(grads)  # B,n_cols
    r = torch.randint(0, 4, (300,), generator=gen)
    c = torch.randint(0, sources.n_cols, (300,), generator=gen)
    torch.testing.assert_close(sources.pair_values(grads, r, c), rows_all[r, c])
    # a feature's value is its decoder output dotted with the gradient at its output layers
    layer, pos, index = sources.features[0].tolist()
    a = run.features[pos, layer, index]
    want_value = sum(
        a * clt.W_dec[layer][index, k] @ grads.mlp_out[0, pos, layer + k] for k in range(2 - layer)
    )
    torch.testing.assert_close(rows_all[0, 0], want_value, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- one CLT, layer by layer


@pytest.mark.parametrize(
    "kw",
    [
        dict(activation="relu"),
        dict(activation="jumprelu"),
        dict(activation="topk", k=3),
        dict(activation="jumprelu", cross_layer=False),
    ],  # fmt: skip
)
def test_the_per_layer_clt_is_the_batched_clt(kw):
    """The splice, attribution and feature statistics run the CLT one layer at a time through
    the model's own methods; those equal the batched forward the CLT was trained with."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=3, d_model=8, d_features=16, **kw))
    with torch.no_grad():
        for W in clt.W_dec:
            W.normal_(0, 0.5)
        clt.b_dec.normal_()
    x = torch.randn(5, 3, 8)
    out = clt(x)
    feats = [clt.activate_layer(clt.encode_layer(x[:, i], i), i) for i in range(3)]
    torch.testing.assert_close(torch.stack(feats, 1), out.features)
    for i in range(3):
        torch.testing.assert_close(clt.decode_layer(feats, i), out.reconstruction[:, i])
        torch.testing.assert_close(clt.decode_layer(out.features, i), out.reconstruction[:, i])
    batch = CrossLayerTranscoder(
        CLTConfig(n_layers=3, d_model=8, d_features=16, activation="batchtopk", k=2)
    )
    with pytest.raises(ValueError, match="to_jumprelu"):
        batch.activate_layer(x[:, 0], 0)
