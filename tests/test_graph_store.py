"""The compact graph store: the graph JSON of any pruning built from it equals what the
attribution package writes directly (run_attribute's file, graph_json on a fresh attribution),
validates against the v1 schema, head loadings cover the links of every pruning up to the
store's node threshold, and a store is written whole or not at all."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch

from sparse_circuits.attribution.attention import attention_attribution
from sparse_circuits.attribution.attribute import AttributeConfig, attribute, run_attribute
from sparse_circuits.attribution.graph_json import graph_json, load_schema
from sparse_circuits.attribution.graph_store import (
    GraphStoreError,
    graph_json_at,
    head_report,
    link_loadings,
    load_graph,
    load_qk,
    load_subgraph,
    save_graph,
    save_qk,
    save_subgraph,
    subgraph_errors,
)
from sparse_circuits.attribution.prune import graph_scores, prune
from sparse_circuits.clt.cltdir import load_clt
from sparse_circuits.io import read_json
from sparse_circuits.sparse_attention.modeldir import load_model

PROMPT = "<bos>12+34="
QK_AT = ["1,1,6,3"]


def without_time(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    del doc["metadata"]["info"]["create_time_ms"]
    return doc


def assert_same(a, b, where="doc"):
    """Equal field by field; floats to 1e-4 relative (loadings computed in other batches)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys() ^ b.keys()}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def made(graph_artifacts, tmp_path_factory):
    """run_attribute writing a graph JSON and a store at once."""
    root = tmp_path_factory.mktemp("store")
    config = AttributeConfig(
        model=graph_artifacts.model, clt=graph_artifacts.clt, prompt=PROMPT, out=root / "g.json",
        store_dir=root / "g", batch_size=16, qk_edges=3, qk_at=QK_AT, device="cpu",
    )  # fmt: skip
    assert run_attribute(config) == root / "g"
    return config, root


@pytest.fixture(scope="module")
def direct(graph_artifacts):
    """The same graph from attribute(), with the model and CLT for fresh attention attributions."""
    model, tok = load_model(graph_artifacts.model)
    clt = load_clt(graph_artifacts.clt)
    clt_info = read_json(graph_artifacts.clt / "config.json")
    g = attribute(
        model=model, clt=clt, prompt=PROMPT, tokenizer=tok, clt_info=clt_info, batch_size=16
    )
    return model, clt, g


def test_stored_json_equals_what_run_attribute_wrote(made):
    config, root = made
    written = json.loads((root / "g.json").read_text())
    stored = load_graph(root / "g")
    doc = graph_json_at(stored, config.node_threshold, config.edge_threshold)
    jsonschema.validate(doc, load_schema())
    assert without_time(doc) == without_time(written)  # exactly, QK attributions included
    assert len(doc["attention"]["qk"]) >= 2 and any(
        "head_loadings" in link for link in doc["links"]
    )


def test_stored_json_of_other_prunings_equals_a_fresh_attribution(made, direct):
    """At other thresholds, against graph_json of prune() + attention_attribution() computed
    afresh on the same graph; the QK list is the one stored with the graph (by design)."""
    _, root = made
    model, clt, g = direct
    stored = load_graph(root / "g")
    for name in (
        "edge_targets",
        "edge_sources",
        "edge_weights",
        "features",
        "activations",
        "tokens",
    ):
        assert torch.equal(getattr(stored.graph, name), getattr(g, name)), name
    full = graph_scores(g)
    for nt, et in ((0.5, 0.9), (0.8, 0.99), (0.7, 1.0)):
        pruned = prune(g, nt, et)
        att = attention_attribution(model=model, clt=clt, graph=g, pruned=pruned, batch_size=16)
        want = graph_json(
            g, pruned, scores={"full": full, "pruned": graph_scores(g, pruned.edge_mask)},
            attention=att, slug="g", scan="addition-tiny", node_threshold=nt, edge_threshold=et,
        )  # fmt: skip
        got = graph_json_at(stored, nt, et)
        jsonschema.validate(got, load_schema())
        want, got = without_time(want), without_time(got)
        want["attention"].pop("qk"), got["attention"].pop("qk")
        assert_same(want, got)
        n_cross = sum("head_loadings" in link for link in got["links"])
        assert got["attention"]["summary"]["cross_position_links"] == n_cross


def test_loadings_cover_prunings_up_to_the_store_threshold(made):
    _, root = made
    stored = load_graph(root / "g")
    t_env = stored.loadings.node_threshold
    assert t_env == 0.8  # the default
    pos = stored.graph.node_positions()
    for nt in (0.1, 0.5, 0.7, 0.8):
        for et in (0.5, 0.98, 1.0):
            doc = graph_json_at(stored, nt, et)
            assert "links_without_loadings" not in doc["attention"]["summary"]
            for link in doc["links"]:
                s, t = stored.node_index(link["source"]), stored.node_index(link["target"])
                assert ("head_loadings" in link) == bool(pos[s] < pos[t])
                if "head_loadings" in link:
                    total = sum(v for _, _, v in link["head_loadings"])
                    assert total == pytest.approx(link["weight"], rel=1e-3, abs=1e-5)
    doc = graph_json_at(stored, 1.0, 1.0)  # beyond the envelope: said, not hidden
    jsonschema.validate(doc, load_schema())
    summary = doc["attention"]["summary"]
    assert summary["links_without_loadings"] > 0 and summary["loadings_node_threshold"] == t_env


def test_link_loadings_and_head_report(made):
    _, root = made
    stored = load_graph(root / "g")
    doc = graph_json_at(stored, 0.8, 0.98)
    link = next(lk for lk in doc["links"] if lk.get("head_loadings"))
    got = link_loadings(stored, link["source"], link["target"])
    assert sum(v for _, _, v in got["loadings"]) == pytest.approx(got["weight"], rel=1e-4, abs=1e-6)
    assert [[j, h] for j, h, _ in got["loadings"]] == [[j, h] for j, h, _ in link["head_loadings"]]
    same_pos = next(lk for lk in doc["links"] if "head_loadings" not in lk)
    with pytest.raises(ValueError, match="no attention head carries it"):
        link_loadings(stored, same_pos["source"], same_pos["target"])
    with pytest.raises(KeyError, match="source"):
        link_loadings(stored, "9_9_9", link["target"])
    pruned = prune(stored.graph, 0.8, 0.98)
    heads = doc["attention"]["summary"]["heads"]
    top = heads[0]
    report = head_report(stored, top["layer"], top["head"], pruned)
    assert report["share"] == pytest.approx(top["share"], rel=1e-4) and report["rank"] == 1
    assert sum(h["share"] for h in heads) == pytest.approx(1.0, abs=1e-4)
    for e in report["top_links"]:
        assert any(
            lk["source"] == e["source"] and lk["target"] == e["target"] for lk in doc["links"]
        )


def test_qk_and_subgraphs_round_trip(made, tmp_path):
    _, root = made
    stored = load_graph(root / "g")
    qk = stored.qk()[0]
    save_qk(tmp_path, qk)
    back = load_qk(next((tmp_path / "qk").iterdir()))
    assert back[:8] == qk[:8] and torch.equal(back.terms, qk.terms)
    assert back.terms.sum().item() == pytest.approx(qk.score, rel=1e-4, abs=1e-4)

    node = stored.graph.node_id(0)
    doc = {"pinnedIds": [node], "supernodes": [["a group", node]]}
    assert subgraph_errors(stored, doc["pinnedIds"], doc["supernodes"]) == []
    save_subgraph(tmp_path, "mine", doc)
    assert load_subgraph(tmp_path, "mine") == doc and load_subgraph(tmp_path, "other") is None
    errors = subgraph_errors(stored, ["nope"], [["x", node, "also-nope"]])
    assert [e["loc"] for e in errors] == [["body", "pinnedIds", 0], ["body", "supernodes", 0, 2]]
    for bad in ("../x", ".hidden", "", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="subgraph name"):
            save_subgraph(tmp_path, bad, doc)


def test_a_store_is_written_whole_or_not_at_all(made, tmp_path):
    _, root = made
    stored = load_graph(root / "g")
    g = stored.graph
    pruned = prune(g, 0.8, 0.98)
    kw = dict(pruned=pruned, slug="x", scan="m", node_threshold=0.8, edge_threshold=0.98,
              loadings_node_threshold=0.9)  # fmt: skip
    out = save_graph(tmp_path / "g", g, None, **kw)
    before = sorted(p.name for p in out.iterdir())
    assert load_graph(out).loadings is None and "attention" not in graph_json_at(
        load_graph(out), 0.8, 0.98
    )
    g.settings = {**g.settings, "bad": object()}  # not JSON: fails after the tensors are written
    try:
        with pytest.raises(TypeError):
            save_graph(tmp_path / "g", g, None, **kw)
        with pytest.raises(TypeError):
            save_graph(tmp_path / "h", g, None, **kw)
    finally:
        g.settings = {k: v for k, v in g.settings.items() if k != "bad"}
    assert sorted(p.name for p in out.iterdir()) == before  # the old store, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no new one, no temporaries
    with pytest.raises(GraphStoreError):
        load_graph(tmp_path)


def test_stored_size_is_compact(made):
    """int32 node indices and float32 weights: ~12 bytes an edge, plus the small files."""
    _, root = made
    stored = load_graph(root / "g")
    size = (root / "g" / "graph.safetensors").stat().st_size
    assert size <= 12 * stored.graph.n_edges + 16 * stored.graph.n_features + 4096
    assert math.isclose(
        stored.scores_full.replacement, graph_scores(stored.graph).replacement, rel_tol=1e-6
    )


def test_the_cli_writes_a_store_alone(graph_artifacts, tmp_path):
    from sparse_circuits.cli import main as cli_main

    store = tmp_path / "graphs" / "cli"
    args = ["attribute", "--model", str(graph_artifacts.model), "--clt", str(graph_artifacts.clt),
            "--prompt", PROMPT, "--store-dir", str(store), "--batch-size", "16", "--device", "cpu",
            "--loadings-node-threshold", "1.0"]  # fmt: skip
    assert cli_main(args) == 0
    stored = load_graph(store)
    assert stored.meta["slug"] == "cli" and stored.loadings.node_threshold == 1.0
    doc = graph_json_at(stored, 1.0, 1.0)  # every link of the full graph has its loadings
    jsonschema.validate(doc, load_schema())
    assert "links_without_loadings" not in doc["attention"]["summary"]
    assert read_json(store / "run.json")["config"]["store_dir"] == str(store)
    with pytest.raises(ValueError, match="store_dir"):  # nothing to write: refused up front
        AttributeConfig(model=graph_artifacts.model, clt=graph_artifacts.clt, prompt=PROMPT)
