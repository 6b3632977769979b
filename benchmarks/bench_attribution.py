"""Attribution graph time and peak memory against prompt length, dense model against
sparsified model, measured in one run.

What is compared, each with its own CLT, on prompts of the same lengths:
  dense   - a model with ordinary causal attention
  sparse  - the sparsified model (hard gates: its patterns are exactly zero on closed edges)
Without model dirs, both are built here at the stdlib LM's shape (GPT-2 family, 4 layers,
d_model 128, 4 heads, vocab 2048; context 512 or the longest length asked for) with random weights: the sparse one is the
dense one with hard gates at the offset that leaves `--connectivity` of the causal pairs
open, and each gets a random JumpReLU CLT (`--d-features` per layer) whose encoder biases
make each feature fire on `--fire-rate` of that model's own tokens. With `--model/--clt`
(dense) and `--sparse-model/--sparse-clt`, trained ones are used instead (for the variants
in `--variants` only).

Each measurement runs in a fresh subprocess, so that its peak resident memory (ru_maxrss)
is its own; "added" is that peak minus the process's peak before the graph (model, CLT and
torch loaded). Lengths are interleaved dense/sparse so a neighbour's load on a shared
machine hits both alike. Per measurement: the graph (`attribute`, max_feature_nodes rows),
pruning (0.8 / 0.98) with scores, and attention attribution (head loadings of the pruned
graph's cross-position edges, QK for the sparse model's top open edges). Each row records the
replacement and completeness scores of the full and the pruned graph, and the share of the
rows' influence that falls on active features left without rows (what the feature budget
drops). Several `--max-feature-nodes` values (0: every active feature) and prompt `--offsets`
into the source text measure how the scores depend on the budget and on the prompt.
`--memory-limit-gib` caps each measurement's address space: one over it is recorded as failed
instead of crowding a shared machine.

Run from the repository root:
    python benchmarks/bench_attribution.py                        # CPU, random models
    python benchmarks/bench_attribution.py --model M --clt C --sparse-model S --sparse-clt SC
    python benchmarks/bench_attribution.py --variants sparse --sparse-model S --sparse-clt SC \
        --lengths 512 --offsets 0 512 1024 --max-feature-nodes 7500 0    # scores against budget
With --dense-matmuls, the sparsified model runs a second time with its frozen patterns applied
as dense matrices: the ratio is what sparse pattern matmuls save.
Writes benchmarks/results/attribution.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.attribution import frozen  # noqa: E402
from sparse_circuits.attribution.attention import attention_attribution  # noqa: E402
from sparse_circuits.attribution.attribute import attribute  # noqa: E402
from sparse_circuits.attribution.prune import count_for_coverage, graph_scores, prune  # noqa: E402
from sparse_circuits.clt.cltdir import load_clt, save_clt  # noqa: E402
from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder  # noqa: E402
from sparse_circuits.io import read_json, write_json  # noqa: E402
from sparse_circuits.sparse_attention.hooks import capture  # noqa: E402
from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer  # noqa: E402
from sparse_circuits.sparse_attention.modeldir import load_model, save_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "attribution.json"


# ----------------------------------------------------------------------------- random stand-ins


def random_models(out: Path, args) -> dict[str, tuple[Path, Path]]:
    """A dense random model of the stdlib LM's shape, its sparsified twin, a CLT for each."""
    torch.manual_seed(args.seed)
    cfg = ModelConfig(family="gpt2", vocab_size=2048, n_layers=4, d_model=128, n_heads=4, d_mlp=512,
                      context_length=max(512, max(args.lengths)), bias=True)  # fmt: skip
    dense = Transformer(cfg).eval()
    with torch.no_grad():  # spread the attention scores, as training does, so gates can select
        for name, p in dense.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    sample = torch.randint(
        0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(args.seed)
    )
    offset = gate_offset_for(dense, sample, args.connectivity)
    sparse = Transformer(cfg.model_copy(update={"gate": GateConfig(offset=offset)})).eval()
    sparse.load_state_dict(dense.state_dict())
    dirs = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        model_dir = save_model(model, out / f"{name}_model")
        clt = random_clt(model, sample, args.d_features, args.fire_rate, args.seed)
        info = {
            "feature_input_hook": "blocks.{layer}.hook_mlp_in",
            "feature_output_hook": "blocks.{layer}.hook_mlp_out",
        }
        dirs[name] = (model_dir, save_clt(clt, out / f"{name}_clt", info=info))
    return dirs


@torch.no_grad()
def gate_offset_for(model: Transformer, tokens: torch.Tensor, connectivity: float) -> float:
    """The gate offset b that leaves `connectivity` of the causal (query, key) pairs open."""
    names = [f"blocks.{i}.attn.hook_{x}" for i in range(model.cfg.n_layers) for x in "qk"]
    with capture(model, names) as got:
        model(tokens)
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = []
    for i in range(model.cfg.n_layers):
        q, k = got[f"blocks.{i}.attn.hook_q"], got[f"blocks.{i}.attn.hook_k"]
        scores.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5)[..., causal].flatten())
    return float(-torch.cat(scores).quantile(1 - connectivity))


@torch.no_grad()
def random_clt(
    model: Transformer, tokens: torch.Tensor, d_features: int, fire_rate: float, seed: int
):
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_mlp_{x}" for i in range(L) for x in ("in", "out")]
    with capture(model, names) as got:
        model(tokens)
    x = torch.stack([got[f"blocks.{i}.hook_mlp_in"].flatten(0, 1) for i in range(L)], dim=1)
    y = torch.stack([got[f"blocks.{i}.hook_mlp_out"].flatten(0, 1) for i in range(L)], dim=1)
    torch.manual_seed(seed + 1)
    clt = CrossLayerTranscoder(
        CLTConfig(n_layers=L, d_model=model.cfg.d_model, d_features=d_features)
    )
    clt.init_from_batch(x, y, fire_rate=fire_rate)
    return clt


def prompt_ids(tokenizer, vocab_size: int, T: int, seed: int, offset: int = 0) -> list[int]:
    """T tokens of Python standard library source from token `offset` on (with a tokenizer),
    else random ids (the offset then seeds them)."""
    if tokenizer is not None:
        import json as json_module  # noqa: PLC0415  (only their source text is used)

        text = "".join(inspect.getsource(m) for m in (json_module.decoder, json_module.encoder))
        ids = tokenizer.encode(text).ids
        if len(ids) >= offset + T:
            return ids[offset : offset + T]
    return torch.randint(
        0, vocab_size, (T,), generator=torch.Generator().manual_seed(seed + offset)
    ).tolist()


# ----------------------------------------------------------------------------- one measurement


def measure(job: dict) -> dict:
    """One graph in this process: times, sizes and peak memory."""
    torch.set_num_threads(job["threads"])
    if job.get("memory_limit_gib"):  # fail with MemoryError rather than crowd a shared machine
        limit = int(job["memory_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if job.get("dense_matmuls"):  # the frozen model's patterns as dense tensors, however sparse
        frozen.SPARSE_PATTERN_DENSITY = 0.0
    model, tokenizer = load_model(job["model"])
    clt = load_clt(job["clt"])
    clt_info = read_json(Path(job["clt"]) / "config.json")
    prompt = prompt_ids(tokenizer, model.cfg.vocab_size, job["length"], job["seed"], job["offset"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    graph = attribute(model=model, clt=clt, prompt=prompt, tokenizer=tokenizer, clt_info=clt_info,
                      max_feature_nodes=job["max_feature_nodes"], batch_size=job["batch_size"])  # fmt: skip
    t1 = time.perf_counter()
    graph_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pruned = prune(graph)
    scores = graph_scores(graph, pruned.edge_mask)
    full_scores = graph_scores(graph)
    t2 = time.perf_counter()
    qk = job["qk_edges"] if model.cfg.gate is not None else 0
    att = attention_attribution(
        model=model, clt=clt, graph=graph, pruned=pruned, batch_size=job["batch_size"], qk_edges=qk
    )
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": job["variant"], "length": job["length"], "offset": job["offset"],
        "max_feature_nodes": job["max_feature_nodes"],
        "graph_s": round(t1 - t0, 2), "prune_s": round(t2 - t1, 2), "attention_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
        "peak_rss_gib": round(peak / 2**30, 3), "added_gib": round((peak - before) / 2**30, 3),
        "graph_peak_rss_gib": round(graph_peak / 2**30, 3),
        "active_features": graph.n_active_features, "feature_nodes": graph.n_features, "edges": graph.n_edges,
        "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": int(pruned.edge_mask.sum()),
        "edges_for_80pct": count_for_coverage(pruned.edge_scores, 0.8),
        "heads_for_80pct": att.summary.n_heads, "qk": len(att.qk),
        "pruned_replacement": round(scores.replacement, 4), "pruned_completeness": round(scores.completeness, 4),
        "full_replacement": round(full_scores.replacement, 4), "full_completeness": round(full_scores.completeness, 4),
        "unvisited_feature_share": round(graph.settings["unvisited_feature_share"], 4),
    }  # fmt: skip


def run_child(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        out_of_memory = "MemoryError" in proc.stderr or "can't allocate memory" in proc.stderr
        if job.get("memory_limit_gib") and out_of_memory:
            return {"variant": job["variant"], "length": job["length"], "offset": job["offset"],
                    "max_feature_nodes": job["max_feature_nodes"],
                    "failed": f"over the memory limit of {job['memory_limit_gib']} GiB"}  # fmt: skip
        raise RuntimeError(
            f"measurement {job['variant']} T={job['length']} failed:\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="dense model dir (default: a random stand-in)")
    p.add_argument("--clt", type=Path, help="the dense model's CLT dir")
    p.add_argument("--sparse-model", type=Path, help="sparsified model dir")
    p.add_argument("--sparse-clt", type=Path, help="the sparsified model's CLT dir")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512, 1024, 2048])
    p.add_argument(
        "--variants", nargs="+", choices=["dense", "sparse"], default=["dense", "sparse"]
    )
    p.add_argument(
        "--max-feature-nodes",
        type=int,
        nargs="+",
        default=[7500],
        help="feature rows per graph; several values measure each (0: every active feature)",
    )
    p.add_argument(
        "--offsets",
        type=int,
        nargs="+",
        default=[0],
        help="prompts: each starts this many tokens into the source text (random ids: seeds them)",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="address-space limit of each measurement: over it, the row records the failure",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--qk-edges", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--d-features", type=int, default=1024, help="random CLTs: features per layer")
    p.add_argument(
        "--fire-rate",
        type=float,
        default=0.02,
        help="random CLTs: share of tokens each feature fires on",
    )
    p.add_argument(
        "--connectivity",
        type=float,
        default=0.03,
        help="random sparse model: open share of causal pairs",
    )
    p.add_argument(
        "--dense-matmuls",
        action="store_true",
        help="also the sparsified model with its frozen patterns applied as dense matrices "
        "(variant sparse/dense-matmuls), to measure what sparse pattern matmuls save",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    pairs = {"dense": (args.model, args.clt), "sparse": (args.sparse_model, args.sparse_clt)}
    given = any(x is not None for pair in pairs.values() for x in pair)
    missing = [v for v in args.variants if None in pairs[v]]
    if given and missing:
        p.error(
            "with trained models, give a model and its CLT for each variant measured "
            "(--model/--clt for dense, --sparse-model/--sparse-clt for sparse); none: random stand-ins"
        )
    rows = []
    result = {
        "what": "attribution graph (max_feature_nodes rows) + pruning + attention attribution, per prompt length",
        "models": {
            k: str(pairs[k][0]) if given else "random stdlib-LM-shaped stand-in"
            for k in args.variants
        },
        "settings": {
            k: v
            for k, v in vars(args).items()
            if k not in ("child", "out", "model", "clt", "sparse_model", "sparse_clt")
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": args.threads,
        },  # fmt: skip
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = pairs if given else random_models(Path(tmp), args)
        variants = list(args.variants)
        if args.dense_matmuls and "sparse" in variants:
            variants.append("sparse/dense-matmuls")
        for length, offset, budget, variant in itertools.product(
            args.lengths, args.offsets, args.max_feature_nodes, variants
        ):
            model_dir, clt_dir = dirs[variant.split("/")[0]]
            job = {"variant": variant, "length": length, "offset": offset, "model": str(model_dir),
                   "clt": str(clt_dir), "max_feature_nodes": budget or None, "batch_size": args.batch_size,
                   "qk_edges": args.qk_edges, "threads": args.threads, "seed": args.seed,
                   "memory_limit_gib": args.memory_limit_gib,
                   "dense_matmuls": variant.endswith("dense-matmuls")}  # fmt: skip
            rows.append(run_child(job))
            print(json.dumps(rows[-1]), file=sys.stderr)
            write_json(
                args.out, result
            )  # after every measurement: a stopped run keeps the finished ones
    print(
        "| T | offset | model | rows budget | active features | rows | edges | graph s | total s | peak RSS GiB "
        "| added GiB | replacement full / pruned | share on features without rows | heads for 80 % |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(
                f"| {r['length']} | {r['offset']} | {r['variant']} | {r['max_feature_nodes']} | {r['failed']} |"
            )
            continue
        print(f"| {r['length']} | {r['offset']} | {r['variant']} | {r['max_feature_nodes']} | {r['active_features']} | "
              f"{r['feature_nodes']} | {r['edges']:,} | {r['graph_s']} | {r['total_s']} | {r['peak_rss_gib']} | "
              f"{r['added_gib']} | {r['full_replacement']} / {r['pruned_replacement']} | "
              f"{r['unvisited_feature_share']} | {r['heads_for_80pct']} |")  # fmt: skip
    by = {
        (r["variant"], r["length"], r["offset"], r["max_feature_nodes"]): r
        for r in rows
        if "failed" not in r
    }
    for (variant, length, offset, budget), s in by.items():
        d = by.get(("dense", length, offset, budget))
        if variant == "sparse" and d is not None:
            print(f"T={length}: dense/sparse graph time {d['graph_s'] / s['graph_s']:.2f}x, "
                  f"edges {d['edges'] / max(s['edges'], 1):.1f}x")  # fmt: skip
        m = by.get(("sparse/dense-matmuls", length, offset, budget))
        if variant == "sparse" and m is not None:
            print(f"T={length}: sparse model, dense/sparse pattern matmuls: graph time "
                  f"{m['graph_s'] / s['graph_s']:.2f}x, total {m['total_s'] / s['total_s']:.2f}x")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
