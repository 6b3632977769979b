"""Attribution graphs on tiny random models of both families, each with a random CLT whose
features fire: edges against real interventions in the frozen model, complete freezing,
head loadings against pattern ablations, QK terms against the model's own scores, pruning
on a hand-computed graph, graph JSON against a JSON Schema, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch

from sparse_circuits.attribution import attribute as attribute_module
from sparse_circuits.attribution import frozen as frozen_module
from sparse_circuits.attribution.attention import QKContext, attention_attribution, head_loadings
from sparse_circuits.attribution.attribute import attribute
from sparse_circuits.attribution.frozen import FrozenGraph, Tap
from sparse_circuits.attribution.graph import Graph, cantor
from sparse_circuits.attribution.graph_json import graph_json, load_schema
from sparse_circuits.attribution.inputs import LogitTarget
from sparse_circuits.attribution.interventions import FeatureIntervention, ablate, intervene
from sparse_circuits.attribution.prune import graph_scores, prune
from sparse_circuits.attribution.replacement import ReplacementModel
from sparse_circuits.attribution.sources import SourceTable
from sparse_circuits.cli import main as cli_main
from sparse_circuits.clt.cltdir import save_clt
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder
from sparse_circuits.clt.splice import warn_if_other_model
from sparse_circuits.sparse_attention.hooks import capture, hooks
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer
from sparse_circuits.sparse_attention.modeldir import model_sha256, save_model
from sparse_circuits.sparse_attention.toy import addition_tokenizer

T, VOCAB = 10, 24
# gpt2: sparsified (hard gates, some edges closed), biases everywhere. llama: dense, RoPE, GQA.
FAMILIES = {
    "gpt2": dict(family="gpt2", n_heads=2, d_model=16, bias=True, gate=GateConfig(offset=0.0)),
    "llama": dict(family="llama", n_heads=4, n_kv_heads=2, d_model=32, qkv_bias=True),
}


def make_model(family: str, seed: int = 0, vocab: int = VOCAB) -> Transformer:
    torch.manual_seed(seed)
    kw = FAMILIES[family]
    cfg = ModelConfig(
        vocab_size=vocab, n_layers=2, d_mlp=2 * kw["d_model"], context_length=12, **kw
    )
    model = Transformer(cfg)
    with torch.no_grad():  # weights large enough for peaked patterns and closed gates
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.mul_(15.0)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def make_clt(model: Transformer, seed: int = 0, d_features: int = 24) -> CrossLayerTranscoder:
    """Random weights and JumpReLU thresholds, with encoder biases set from the model's own MLP
    inputs so that about 40 % of the features fire on a token."""
    cfg = model.cfg
    torch.manual_seed(seed + 100)
    clt = CrossLayerTranscoder(
        CLTConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, d_features=d_features)
    )
    tokens = torch.randint(0, cfg.vocab_size, (8, T))
    L = cfg.n_layers
    with torch.no_grad(), capture(model, [f"blocks.{li}.hook_mlp_in" for li in range(L)]) as got:
        model(tokens)
    inputs = torch.stack(
        [got[f"blocks.{li}.hook_mlp_in"].flatten(0, 1) for li in range(L)], dim=1
    )  # N,L,M
    with torch.no_grad():
        clt.W_enc.normal_(0, 1 / math.sqrt(cfg.d_model))
        clt.log_threshold.copy_(torch.empty(L, d_features).uniform_(0.05, 0.5).log())
        clt.init_from_batch(inputs, inputs, fire_rate=0.4)
        for W in clt.W_dec:
            W.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.2)
    return clt


def prompt_tokens(seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request):
    model = make_model(request.param)
    clt = make_clt(model)
    rm = ReplacementModel(model, clt)
    run = rm.run_prompt(prompt_tokens())
    return request.param, model, clt, rm, run


@pytest.fixture(scope="module")
def full_graph(setup):
    """Every active feature gets a row; every vocabulary token is a target."""
    _, model, clt, _, run = setup
    return attribute(
        model=model,
        clt=clt,
        prompt=run.tokens,
        targets=list(range(VOCAB)),
        max_feature_nodes=None,
        batch_size=32,
    )


# ----------------------------------------------------------------------------- replacement model


def test_replacement_model_reproduces_the_models_logits(setup):
    family, model, _, rm, run = setup
    with torch.no_grad():
        logits = model(run.tokens[None]).logits[0]
    for frozen in (True, False):
        got = intervene(rm, run, freeze_attention=frozen).logits
        torch.testing.assert_close(got, logits, atol=2e-5, rtol=1e-5)
    assert (run.features != 0).float().mean() > 0.1  # the CLT's features do fire
    if family == "gpt2":  # a sparsified model: its pattern is exactly zero on closed edges
        causal = torch.ones(T, T).tril().bool()
        closed = (torch.stack(run.patterns) == 0) & causal
        assert closed.any() and (torch.stack(run.patterns) > 0).any()


def test_interventions_set_scale_ablate(setup):
    _, _, _, rm, run = setup
    li, p, f = run.active_features()[0].tolist()
    a = float(run.features[p, li, f])
    same = intervene(rm, run, [FeatureIntervention(li, p, f, value=a)], freeze_attention=False)
    torch.testing.assert_close(same.logits, run.logits, atol=2e-5, rtol=1e-5)
    doubled = intervene(rm, run, [FeatureIntervention(li, p, f, scale=2.0)])
    assert doubled.features[p, li, f] == 2 * a
    ablated = intervene(rm, run, [ablate(li, p, f)])
    assert ablated.features[p, li, f] == 0
    assert not torch.allclose(ablated.logits, run.logits)
    with pytest.raises(ValueError, match="exactly one of value and scale"):
        intervene(rm, run, [FeatureIntervention(li, p, f)])


# ----------------------------------------------------------------------------- edges = interventions


def test_attribution_equals_intervention(setup, full_graph):
    """Each column of the graph is the direct effect of injecting that node's contribution into
    the frozen model (patterns, norm scales and every other feature held at their prompt
    values), on every active feature's pre-activation and every mean-centred logit."""
    _, model, clt, rm, run = setup
    g = full_graph
    assert g.n_features == g.n_active_features == run.active_features().shape[0] >= 50
    A = g.dense_adjacency()
    base = intervene(rm, run, freeze_features=True)
    layer, pos, index = g.features.unbind(1)

    def observed(result) -> torch.Tensor:
        """Change of every feature pre-activation and every mean-centred last-position logit."""
        d_pre = (result.pre_acts - base.pre_acts)[pos, layer, index]
        centred = result.logits[-1] - result.logits[-1].mean()
        d_logit = centred - (base.logits[-1] - base.logits[-1].mean())
        return torch.cat([d_pre, d_logit[[t.plus for t in g.logit_targets]]])

    rows = torch.cat([torch.arange(g.n_features), torch.arange(g.logit_offset, g.n_nodes)])
    feats = torch.randperm(g.n_features, generator=torch.Generator().manual_seed(0))[:50]
    checked = 0
    for node in feats.tolist():
        li, p, f = g.features[node].tolist()
        result = intervene(
            rm, run, [FeatureIntervention(li, p, f, scale=2.0)], freeze_features=True
        )
        torch.testing.assert_close(A[rows, node], observed(result), atol=1e-4, rtol=1e-4)
        checked += 1
    for li in range(g.n_layers):
        for p in range(T):
            delta = torch.zeros_like(run.errors[li])
            delta[p] = run.errors[li, p]
            result = intervene(
                rm, run, freeze_features=True, add={f"blocks.{li}.hook_mlp_out": delta}
            )
            torch.testing.assert_close(
                A[rows, g.error_offset + li * T + p], observed(result), atol=1e-4, rtol=1e-4
            )
            checked += 1
    for p in range(T):
        delta = torch.zeros_like(run.embeddings)
        delta[p] = run.embeddings[p]
        result = intervene(rm, run, freeze_features=True, add={"hook_embed": delta})
        torch.testing.assert_close(
            A[rows, g.embed_offset + p], observed(result), atol=1e-4, rtol=1e-4
        )
        checked += 1
    assert checked == 50 + 3 * T
    assert (A[rows][:, g.embed_offset : g.logit_offset].abs().sum(0) > 0).all()


def test_edges_and_bias_add_up_to_each_target(setup, full_graph):
    """Every target is the sum of its incoming edges plus what no node explains (the frozen
    model run on biases alone): no source is missing from the graph."""
    _, model, _, rm, run = setup
    g = full_graph
    key = g.edge_targets * g.n_nodes + g.edge_sources
    assert (key[1:] > key[:-1]).all()  # sorted by (target, source), no duplicates
    bias = FrozenGraph(rm, run, 1, sources="bias")
    with torch.no_grad():
        A = g.dense_adjacency()
        layer, pos, index = g.features.unbind(1)
        W_enc, b_enc = rm.clt.W_enc, rm.clt.b_enc
        bias_pre = torch.stack([
            bias.taps[Tap("mlp_in", li)][0, p] @ W_enc[li, f] + b_enc[li, f] for li, p, f in g.features.tolist()
        ])  # fmt: skip
        torch.testing.assert_close(
            A[: g.n_features].sum(1) + bias_pre,
            run.pre_acts[pos, layer, index],
            atol=1e-4,
            rtol=1e-4,
        )
        final = bias.taps[Tap("final")][0, -1]
        W_U = model.lm_head.weight
        for k, t in enumerate(g.logit_targets):
            direction = t.direction(W_U)
            want = run.logits[-1, t.plus] - run.logits[-1].mean()
            torch.testing.assert_close(
                A[g.logit_offset + k].sum() + final @ direction, want, atol=1e-4, rtol=1e-4
            )


def test_a_feature_budget_gives_the_full_graphs_edges_among_the_chosen_nodes(setup, full_graph):
    _, model, clt, _, run = setup
    g = attribute(model=model, clt=clt, prompt=run.tokens, targets=list(range(VOCAB)), max_feature_nodes=40,
                  batch_size=16, update_interval=1)  # fmt: skip
    assert g.n_features == 40 and g.n_active_features == full_graph.n_features
    # graph nodes -> full-graph nodes: features by identity, the rest shifted
    keys = [tuple(f) for f in full_graph.features.tolist()]
    to_full = torch.tensor([keys.index(tuple(f)) for f in g.features.tolist()] +
                           list(range(full_graph.error_offset, full_graph.n_nodes)))  # fmt: skip
    A, F = g.dense_adjacency(), full_graph.dense_adjacency()
    rows = torch.cat([torch.arange(g.n_features), torch.arange(g.logit_offset, g.n_nodes)])
    torch.testing.assert_close(A[rows][:, :], F[to_full[rows]][:, to_full], atol=1e-6, rtol=1e-5)


def test_rows_kept_dense_or_sparse_give_the_same_graph(setup, full_graph, monkeypatch):
    """A block of rows is kept dense or in CSR form by its share of nonzeros: either way the
    features chosen, the edges and the share of influence left on features without rows agree."""
    _, model, clt, _, run = setup
    assert full_graph.settings["unvisited_feature_share"] == 0
    graphs = []
    for density in (0.0, 2.0):  # every block dense, then every block CSR
        monkeypatch.setattr(attribute_module, "DENSE_ROW_DENSITY", density)
        graphs.append(attribute(model=model, clt=clt, prompt=run.tokens, targets=list(range(VOCAB)),
                                max_feature_nodes=40, batch_size=16, update_interval=1))  # fmt: skip
    dense, sparse = graphs
    assert torch.equal(dense.features, sparse.features)
    for name in ("edge_targets", "edge_sources", "edge_weights"):
        assert torch.equal(getattr(dense, name), getattr(sparse, name))
    share = dense.settings["unvisited_feature_share"]
    assert 0 < share < 1
    assert sparse.settings["unvisited_feature_share"] == pytest.approx(share, rel=1e-4)


def test_freezing_is_complete(setup):
    """In the frozen model the gradients at the leaves do not depend on the input tokens, and
    second derivatives vanish: nothing nonlinear was left unfrozen. The same gradients in the
    unfrozen model do depend on the tokens (the check can fail)."""
    _, model, _, rm, run = setup
    other = prompt_tokens(seed=7)
    assert not torch.equal(other, run.tokens)
    gen = torch.Generator().manual_seed(3)
    B, L, M = 2, model.cfg.n_layers, model.cfg.d_model

    def grads(tokens, create_graph=False):
        fg = FrozenGraph(rm, run, B, tokens=tokens)
        inject = {Tap("mlp_in", li): torch.randn(B, T, M, generator=gen) for li in range(L)}
        inject[Tap("final")] = torch.randn(B, T, M, generator=gen)
        return fg, fg.backward(inject, create_graph=create_graph)

    gen.manual_seed(3)
    fg, a = grads(run.tokens, create_graph=True)
    gen.manual_seed(3)
    _, b = grads(other)
    torch.testing.assert_close(a.embed, b.embed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.mlp_out, b.mlp_out, atol=1e-6, rtol=1e-6)
    assert a.embed.abs().sum() > 0 and a.mlp_out.abs().sum() > 0

    s = (a.embed * torch.randn_like(a.embed)).sum() + (
        a.mlp_out * torch.randn_like(a.mlp_out)
    ).sum()
    if s.requires_grad:  # otherwise the gradients are constants of the leaves outright
        second = torch.autograd.grad(s, [fg.embed_leaf, *fg.mlp_out_leaves], allow_unused=True)
        assert all(g is None or not g.any() for g in second)

    def unfrozen_grad(tokens):
        leaf = {}

        def make_leaf(x):
            leaf["x"] = x.detach().requires_grad_()
            return leaf["x"]

        with hooks(model, {"hook_embed": make_leaf}):
            logits = model(tokens[None]).logits
        return torch.autograd.grad(logits[0, -1, 0], leaf["x"])[0]

    assert not torch.allclose(unfrozen_grad(run.tokens), unfrozen_grad(other), atol=1e-4)


# ----------------------------------------------------------------------------- attention attribution


def _with_pattern(run, layer: int, head: int, query: int, keep_diagonal: bool = True):
    """The prompt run with head `head` of `layer` reading nothing but (optionally) itself at `query`."""
    patterns = [p.clone() for p in run.patterns]
    row = patterns[layer][head, query]
    diag = row[query].clone()
    row.zero_()
    if keep_diagonal:
        row[query] = diag
    return dataclasses.replace(run, patterns=patterns)


def test_head_loadings_sum_to_edges_and_match_pattern_ablations(setup, full_graph):
    """Loadings sum to each cross-position edge's weight; and the loading of head h in layer j
    equals the part of the edge lost when that head's off-diagonal pattern at the target's
    position is zeroed (a path enters a position once, so that removes exactly its paths)."""
    family, model, clt, rm, run = setup
    g = full_graph
    pos = g.node_positions()
    cross = pos[g.edge_sources] < pos[g.edge_targets]
    feat_to_feat = cross & (g.edge_sources < g.n_features) & (g.edge_targets < g.n_features)
    top = g.edge_weights.abs() * cross
    oracle = (g.edge_weights.abs() * feat_to_feat).argsort(descending=True)[:3]
    edges = torch.cat([oracle, top.argsort(descending=True)[:30]]).unique()
    assert feat_to_feat[oracle].all()
    loads = head_loadings(rm, run, SourceTable(rm, run), g, edges, batch_size=32)
    torch.testing.assert_close(
        loads.loadings.sum((1, 2)), g.edge_weights[edges], atol=1e-5, rtol=1e-4
    )
    assert (loads.loadings != 0).any()

    # Oracle for a few feature -> feature edges: the source's direct effect on the target with
    # the full patterns minus with one head's row cut (both in the frozen model).
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tested = 0
    for n, e in enumerate(edges.tolist()):
        t, s = int(g.edge_targets[e]), int(g.edge_sources[e])
        if e not in oracle:
            continue
        (lt, pt, ft), (ls, ps, fs) = g.features[t].tolist(), g.features[s].tolist()

        source = FeatureIntervention(ls, ps, fs, scale=2.0)

        def effect(r, source=source, target=(pt, lt, ft)):
            base = intervene(rm, r, freeze_features=True)
            moved = intervene(rm, r, [source], freeze_features=True)
            return moved.pre_acts[target] - base.pre_acts[target]

        full = effect(run)
        torch.testing.assert_close(full, g.edge_weights[e], atol=1e-4, rtol=1e-4)
        for j in range(L):
            for h in range(H):
                cut = effect(_with_pattern(run, j, h, pt))
                torch.testing.assert_close(
                    full - cut, loads.loadings[n, j, h], atol=1e-4, rtol=1e-4
                )
        tested += 1
    assert tested == 3

    if family == "gpt2":  # a head whose gates are closed to every earlier key carries nothing there
        for n, e in enumerate(edges.tolist()):
            i = int(pos[g.edge_targets[e]])
            for j in range(L):
                closed = run.patterns[j][:, i, :i].abs().sum(-1) == 0  # H
                assert (loads.loadings[n, j][closed] == 0).all()


def test_qk_terms_sum_to_the_models_scores(setup):
    family, model, _, rm, run = setup
    ctx = QKContext(rm, run, SourceTable(rm, run), batch_size=64)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        layer = int(torch.randint(cfg.n_layers, (1,), generator=gen))
        head = int(torch.randint(cfg.n_heads, (1,), generator=gen))
        i = int(torch.randint(1, T, (1,), generator=gen))
        j = int(torch.randint(0, i + 1, (1,), generator=gen))
        qk = ctx.attribute(layer, head, i, j)
        # the model's own score, recomputed from its q and k hooks
        with (
            torch.no_grad(),
            capture(model, [f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]) as got,
        ):
            model(run.tokens[None])
        q = got[f"blocks.{layer}.attn.hook_q"][0, head, i]
        k = got[f"blocks.{layer}.attn.hook_k"][0, head // (cfg.n_heads // cfg.n_kv_heads), j]
        score = float(q @ k) / math.sqrt(cfg.d_head)
        assert qk.terms.sum().item() == pytest.approx(score, abs=1e-4, rel=1e-4)
        assert qk.terms.shape == (len(qk.query_nodes), len(qk.key_nodes))
        assert "bias" in qk.query_nodes or "bias" in qk.key_nodes
        if layer == 0:  # only embeddings (and biases) reach layer 0's queries
            assert all(n.startswith("E_") or n == "bias" for n in qk.query_nodes)
        if family == "gpt2":  # the hard gate is open exactly where score + offset > 0
            assert (qk.pattern > 0) == (qk.score + cfg.gate.offset > 0)


def test_head_summary_and_default_qk_in_a_sparsified_model():
    model = make_model("gpt2")
    clt = make_clt(model)
    g = attribute(model=model, clt=clt, prompt=prompt_tokens(), max_feature_nodes=60, batch_size=32)
    assert g.n_features == 60 < g.n_active_features
    pruned = prune(g, 0.9, 0.99)
    att = attention_attribution(
        model=model, clt=clt, graph=g, pruned=pruned, batch_size=32, qk_edges=5
    )
    s = att.summary
    assert 1 <= s.n_heads <= s.total_heads == 4
    assert s.shares.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 1 <= len(att.qk) <= 5
    for qk in att.qk:  # default QK edges are open edges that carry attribution
        assert qk.pattern > 0 and qk.score + att.gate_offset > 0
        assert qk.terms.sum().item() == pytest.approx(qk.score, abs=1e-4, rel=1e-4)


def test_sparse_frozen_patterns_give_the_dense_ones_results(setup, monkeypatch):
    """The frozen model keeps patterns with few nonzeros as sparse tensors; edges, head loadings
    and QK terms are those of the dense patterns (which the interventions above check)."""
    _, model, clt, _, run = setup

    def everything(density: float):
        monkeypatch.setattr(frozen_module, "SPARSE_PATTERN_DENSITY", density)
        g = attribute(model=model, clt=clt, prompt=run.tokens, max_feature_nodes=40, batch_size=16)
        att = attention_attribution(
            model=model, clt=clt, graph=g, pruned=prune(g, 1.0, 1.0), batch_size=16, qk_edges=0,
            qk_at=[(1, 1, T - 1, 2)],
        )  # fmt: skip
        return g, att

    monkeypatch.setattr(frozen_module, "SPARSE_PATTERN_DENSITY", 1.0)
    assert frozen_module.frozen_pattern(run.patterns[0][None]).is_sparse
    (gs, atts), (gd, attd) = everything(1.0), everything(0.0)
    assert torch.equal(gs.features, gd.features) and torch.equal(gs.edge_sources, gd.edge_sources)
    torch.testing.assert_close(gs.edge_weights, gd.edge_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(atts.loadings.loadings, attd.loadings.loadings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(atts.qk[0].terms, attd.qk[0].terms, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- pruning


def test_pruning_and_scores_on_a_hand_computed_graph():
    """Embedding 0 -> feature a -> logit, embedding 1 -> logit, error -> feature a.
    Row-normalised |w|: logit <- a: 3/4, <- E1: 1/4; a <- E0: 1/2, <- err: 1/2.
    Influence: a 3/4, E1 1/4, E0 3/8, err 3/8, feature b (only an edge to nothing) 0."""
    g = Graph(
        prompt="", tokens=torch.tensor([5, 6]), token_strings=["a", "b"], n_layers=1, vocab_size=10,
        features=torch.tensor([[0, 1, 3], [0, 0, 4]]), activations=torch.tensor([1.0, 1.0]),
        logit_targets=[LogitTarget("x", 7, 7, None, 0.5)],
        # nodes: features 0, 1; errors 2 (pos 0), 3 (pos 1); embeddings 4, 5; logit 6
        edge_targets=torch.tensor([0, 0, 6, 6]), edge_sources=torch.tensor([4, 3, 0, 5]),
        edge_weights=torch.tensor([2.0, -2.0, 3.0, -1.0]), n_active_features=2,
    )  # fmt: skip
    pr = prune(g, node_threshold=1.0, edge_threshold=1.0)
    torch.testing.assert_close(pr.node_influence, torch.tensor([0.75, 0, 0, 0.375, 0.375, 0.25, 0]))
    assert pr.node_mask.tolist() == [
        True,
        False,
        False,
        True,
        True,
        True,
        True,
    ]  # b and error 2: none
    torch.testing.assert_close(pr.edge_scores, torch.tensor([0.375, 0.375, 0.75, 0.25]))
    # Node threshold 0.4 of the total 1.75: a alone (0.75) holds it; the error goes, its edge
    # with it; embeddings and logits always stay.
    pr = prune(g, node_threshold=0.4, edge_threshold=1.0)
    assert pr.node_mask.tolist() == [True, False, False, False, True, True, True]
    assert pr.edge_mask.tolist() == [True, False, True, True]
    # Edge threshold 0.6 of the edge influence 1.75: logit <- a (0.75) and the two 0.375 ties.
    pr = prune(g, node_threshold=1.0, edge_threshold=0.6)
    assert pr.edge_mask.tolist() == [True, True, True, False]
    scores = graph_scores(g)
    assert scores.replacement == pytest.approx((0.375 + 0.25) / (0.375 + 0.25 + 0.375))
    # completeness: output influence a 0.75, err .375, E0 .375, E1 .25, logit 1: a is half error
    assert scores.completeness == pytest.approx((0.75 * 0.5 + 0.375 + 0.375 + 0.25 + 1.0) / 2.75)


# ----------------------------------------------------------------------------- the CLI and graph JSON


@pytest.fixture(scope="module")
def addition_dirs(tmp_path_factory):
    """A tiny sparsified model over the addition toy's vocabulary, with tokenizer, and its CLT."""
    root = tmp_path_factory.mktemp("attr")
    tok = addition_tokenizer()
    model = make_model("gpt2", vocab=tok.get_vocab_size())
    clt = make_clt(model)
    model_dir = save_model(model, root / "model", tokenizer=tok)
    info = {
        "feature_input_hook": "blocks.{layer}.hook_mlp_in",
        "feature_output_hook": "blocks.{layer}.hook_mlp_out",
    }
    clt_dir = save_clt(clt, root / "clt", info=info)
    return root, model_dir, clt_dir


def test_cli_writes_graph_json_that_validates(addition_dirs):
    root, model_dir, clt_dir = addition_dirs
    out = root / "graph.json"
    args = ["attribute", "--model", str(model_dir), "--clt", str(clt_dir), "--prompt", "<bos>12+34=",
            "--out", str(out), "--targets", '"4"', '"4" - "6"', "--batch-size", "16", "--qk-edges", "3",
            "--qk-at", "1,1,6,3"]  # fmt: skip
    assert cli_main(args) == 0
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, load_schema())

    meta = doc["metadata"]
    assert meta["prompt_tokens"] == ["<bos>", "1", "2", "+", "3", "4", "="]
    assert meta["schema_version"] == 1 and meta["slug"] == "graph"
    assert (
        0 <= meta["scores"]["pruned"]["replacement"] <= 1
        and 0 <= meta["scores"]["full"]["completeness"] <= 1
    )
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert len(nodes) == len(doc["nodes"])  # ids unique
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit"} <= kinds
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    vocab = addition_tokenizer().get_vocab_size()
    four = addition_tokenizer().token_to_id("4")
    assert [n["feature"] for n in logits] == [four, vocab + 1]  # the difference: a virtual id
    assert all(n["ctx_idx"] == 6 and n["layer"] == "3" and "(p=" in n["clerp"] for n in logits)
    for n in doc["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, index, pos = map(int, n["node_id"].split("_"))
            assert (
                n["feature"] == cantor(layer, index)
                and n["ctx_idx"] == pos
                and n["layer"] == str(layer)
            )
        if n["feature_type"] == "mlp reconstruction error":
            assert n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}"
    for link in doc["links"]:
        assert link["source"] in nodes and link["target"] in nodes
        if "head_loadings" in link:
            assert sum(w for _, _, w in link["head_loadings"]) == pytest.approx(
                link["weight"], rel=1e-3, abs=1e-5
            )
    att = doc["attention"]
    assert att["summary"]["total_heads"] == 4 and att["gate_offset"] == 0.0
    for qk in att["qk"]:
        total = sum(v for _, _, v in qk["terms"]) + qk["other"]
        assert total == pytest.approx(qk["score"], rel=1e-3, abs=1e-4)
    asked = [
        qk
        for qk in att["qk"]
        if (qk["layer"], qk["head"], qk["query_pos"], qk["key_pos"]) == (1, 1, 6, 3)
    ]
    assert len(asked) == 1  # the edge asked for by --qk-at, beside the default ones


def test_graph_json_node_ids_of_every_kind(setup, full_graph):
    g = full_graph
    pr = prune(g, 1.0, 1.0)
    doc = graph_json(g, pr, scores={"full": graph_scores(g)}, slug="s", scan="tiny")
    jsonschema.validate(doc, load_schema())
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(set(ids)) == len(ids) == int(pr.node_mask.sum())
    errors = [i for i in ids if "_-1_" in i]
    assert errors and all(i.count("_") == 2 for i in errors)
    bad = json.loads(json.dumps(doc))
    bad["nodes"][0]["layer"] = 3  # not a string: readers would break
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema())


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(setup, addition_dirs, tmp_path, capsys):
    _, model, clt, _, _ = setup
    too_long = torch.zeros(model.cfg.context_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="more than the model's context length"):
        attribute(model=model, clt=clt, prompt=too_long)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model=model, clt=clt, prompt=prompt_tokens(), targets=[VOCAB + 3])
    narrow = CrossLayerTranscoder(
        CLTConfig(n_layers=2, d_model=model.cfg.d_model * 2, d_features=8)
    )
    with pytest.raises(ValueError, match="width"):
        attribute(model=model, clt=narrow, prompt=prompt_tokens())
    shallow = CrossLayerTranscoder(CLTConfig(n_layers=1, d_model=model.cfg.d_model, d_features=8))
    with pytest.raises(ValueError, match="layers"):
        attribute(model=model, clt=shallow, prompt=prompt_tokens())
    with pytest.raises(ValueError, match="feature_input_hook"):
        attribute(
            model=model,
            clt=clt,
            prompt=prompt_tokens(),
            clt_info={"feature_input_hook": "blocks.{layer}.hook_resid_pre"},
        )

    _, model_dir, clt_dir = addition_dirs
    base = [
        "attribute",
        "--model",
        str(model_dir),
        "--clt",
        str(clt_dir),
        "--out",
        str(tmp_path / "g.json"),
    ]
    assert cli_main([*base, "--prompt", "<bos>12+34=", "--targets", '"x"']) == 2
    assert "not a single token of the vocabulary" in capsys.readouterr().err
    assert cli_main([*base, "--prompt", "<bos>12+34=" * 3]) == 2
    assert "context length" in capsys.readouterr().err
    assert cli_main([*base, "--prompt-ids", "1", "2", "--prompt", "12"]) == 2
    assert "exactly one of prompt and prompt_ids" in capsys.readouterr().err
    assert cli_main([*base, "--prompt", "<bos>12+34=", "--qk-at", "1,2,3"]) == 2
    assert "layer,head,query,key" in capsys.readouterr().err
    assert cli_main([*base, "--prompt", "<bos>12+34=", "--qk-at", "1,2,3,5"]) == 2
    assert "after the query position" in capsys.readouterr().err
    assert cli_main([*base, "--prompt", "<bos>12+34=", "--qk-at", "1,9,3,2"]) == 2
    assert "no head 9 in layer 1" in capsys.readouterr().err
    assert cli_main([*base, "--prompt", "<bos>12+34=", "--qk-at", "1,1,7,2"]) == 2
    assert "the prompt has 7 tokens" in capsys.readouterr().err


def test_a_clt_trained_on_other_weights_is_warned_of(setup, caplog):
    _, model, clt, _, _ = setup
    info = {"activations": {"attrs": {"model": "elsewhere", "model_sha256": model_sha256(model)}}}
    assert warn_if_other_model(model, info) and not caplog.records
    with torch.no_grad():
        other = copy.deepcopy(model)
        other.lm_head.weight.add_(1e-3)
    assert not warn_if_other_model(other, info)
    assert "another model (elsewhere" in caplog.text


# ----------------------------------------------------------------------------- dense vs sparse script


def test_dense_vs_sparse_circuits_script_runs(addition_dirs, tmp_path):
    """benchmarks/dense_vs_sparse_circuits.py on tiny random models: a dense model and its
    sparsified twin (same weights, hard gates), each with its own CLT."""
    root, sparse_dir, sparse_clt = addition_dirs
    tok = addition_tokenizer()
    sparse = make_model("gpt2", vocab=tok.get_vocab_size())
    dense = Transformer(sparse.cfg.model_copy(update={"gate": None}))
    dense.load_state_dict(sparse.state_dict())
    dense_dir = save_model(dense.eval(), tmp_path / "dense", tokenizer=tok)
    dense_clt = save_clt(make_clt(dense, seed=3), tmp_path / "dense_clt")

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_vs_sparse_circuits.py"
    spec = importlib.util.spec_from_file_location("dense_vs_sparse_circuits", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = ["--dense-model", str(dense_dir), "--dense-clt", str(dense_clt), "--sparse-model", str(sparse_dir),
            "--sparse-clt", str(sparse_clt), "--n-prompts", "2", "--max-feature-nodes", "40", "--batch-size", "32"]  # fmt: skip
    for prompts in ("addition", "repeat"):
        out = tmp_path / f"{prompts}.json"
        result = module.main([*base, "--prompts", prompts, "--out", str(out)])
        assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
        assert len(result["rows"]) == 2
        for row in result["rows"]:
            for variant in ("dense", "sparse"):
                r = row[variant]
                assert 0 < r["edges_for_80pct"] <= r["edges"]
                assert 0 <= r["heads_for_80pct"] <= r["total_heads"] == 4
