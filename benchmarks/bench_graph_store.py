"""The compact graph store on a ~10M-edge graph: its size, save and load time, and the time to
build the graph JSON of a pruning from it; head loadings for loading envelopes (node thresholds
0.8, 0.85, 0.9) side by side with those of the one pruning a graph JSON file holds.

    python benchmarks/bench_graph_store.py [--out DIR]

A random 4-layer model (d_model 64) with a CLT whose features fire on ~40 % of tokens, on a
32-token prompt, gives a graph of 7,500 feature rows and ~9.6M edges (the size of a 512-token
graph of a real model). Writes benchmarks/results/graph_store.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import firing_clt  # noqa: E402  (the tests' CLT whose features fire)

from sparse_circuits.attribution.attention import attention_attribution  # noqa: E402
from sparse_circuits.attribution.attribute import attribute  # noqa: E402
from sparse_circuits.attribution.graph_store import (  # noqa: E402
    cross_links,
    graph_json_at,
    head_report,
    load_graph,
    loading_envelope,
    save_graph,
    stored_attention,
)
from sparse_circuits.attribution.prune import prune  # noqa: E402
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer  # noqa: E402

PRUNINGS = ((0.5, 0.9), (0.8, 0.98), (0.9, 0.99))
ENVELOPES = (0.8, 0.85, 0.9)  # node thresholds of loading envelopes; the first is stored


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="Where to keep the store.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp()) / "graph"
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=512, n_layers=4, d_model=64, n_heads=4, d_mlp=256,
                      context_length=32, bias=True, gate=GateConfig(offset=0.0))  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    clt = firing_clt(model, d_features=256)
    prompt = torch.randint(0, cfg.vocab_size, (32,))
    g, graph_s = timed(lambda: attribute(model=model, clt=clt, prompt=prompt, batch_size=64))
    pruned, prune_s = timed(lambda: prune(g, 0.8, 0.98))
    kw = dict(model=model, clt=clt, graph=g, pruned=pruned, batch_size=64, qk_edges=8)
    _, pruned_only_s = timed(lambda: attention_attribution(**kw))
    envelopes = {}
    for t_env in ENVELOPES:  # the first is stored
        env = loading_envelope(g, pruned.node_influence, t_env)
        made, seconds = timed(lambda env=env: attention_attribution(**kw, loading_edges=env))
        envelopes[t_env] = {"edges": int(env.numel()), "loadings_s": seconds}
        if t_env == ENVELOPES[0]:
            att = made
    _, save_s = timed(lambda: save_graph(
        out, g, att, pruned=pruned, slug="bench", scan="random", node_threshold=0.8,
        edge_threshold=0.98, loadings_node_threshold=ENVELOPES[0], n_heads=cfg.n_heads,
    ))  # fmt: skip
    stored, load_s = timed(lambda: load_graph(out))
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    res = {
        "what": "graph store: size, save/load, graph JSON of a pruning built from it; head "
        "loadings of envelopes (node thresholds 0.8, 0.85, 0.9) vs of one pruning (0.8/0.98)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "edges": g.n_edges, "nodes": g.n_nodes, "feature_rows": g.n_features, "graph_s": graph_s,
        "prune_s": prune_s, "loadings_pruning_only_s": pruned_only_s,
        "pruning_cross_links": int(cross_links(g, pruned).numel()), "envelopes": envelopes,
        "stored_envelope": ENVELOPES[0], "save_s": save_s, "load_s": load_s, "sizes": sizes,
        "graph_bytes_per_edge": round(sizes["graph.safetensors"] / g.n_edges, 2), "prunings": [],
    }  # fmt: skip
    for nt, et in PRUNINGS:
        doc, build_s = timed(lambda nt=nt, et=et: graph_json_at(stored, nt, et))
        raw = json.dumps(doc, separators=(",", ":")).encode()
        gz, gzip_s = timed(lambda raw=raw: gzip.compress(raw, 5))
        res["prunings"].append({
            "node_threshold": nt, "edge_threshold": et, "build_s": build_s, "nodes": len(doc["nodes"]),
            "links": len(doc["links"]), "bytes": len(raw), "gzip_bytes": len(gz), "gzip_s": gzip_s,
        })  # fmt: skip
    view, view_s = timed(lambda: stored_attention(stored, prune(stored.graph, 0.8, 0.98)))
    _, head_s = timed(lambda: head_report(stored, 0, 0, view))
    res["head_report"] = {"prune_and_view_s": view_s, "from_cached_view_s": head_s}
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    text = json.dumps(res, indent=1)
    print(text)
    results = Path(__file__).parent / "results" / "graph_store.json"
    results.write_text(text + "\n")


if __name__ == "__main__":
    main()
