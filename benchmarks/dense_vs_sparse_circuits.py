"""Dense versus sparse circuits: edges and heads needed for 80 % of a graph's influence.

For each prompt of a set, the attribution graph of the dense model (with its CLT) and of the
sparsified model (with its own CLT), each pruned at the defaults (0.8 / 0.98), and:
  edges for 80 %   the fewest edges of the full graph whose edge influence (normalised
                   |weight| x its target's influence on the logits) holds 80 % of the total
  cross-position   the same among the edges between positions only (those attention
  edges for 80 %   carries), against their own total
  heads for 80 %   the fewest heads whose share of the pruned graph's attention-mediated
                   attribution (cross-position edges' influence, split by head loadings)
                   holds 80 %
The paper (arXiv 2512.05865) reports 5.4-97x fewer edges for task circuits, and about 5 heads
against 40+ for 80 % of attention attribution; the table prints ours beside them.

Prompt sets (the target is the token to predict):
  addition    `<bos>a+b=` followed by 0-2 sum digits, the next sum digit (addition toy models)
  induction   Python snippets where an identifier defined earlier must be repeated (a
              tokenizer with byte-level BPE, e.g. the stdlib LM's)
  repeat      random tokens repeated: `x1..xk y.. x1..x(k-1)` -> xk (any model, ids only)

Run from the repository root:
    python benchmarks/dense_vs_sparse_circuits.py --dense-model M --dense-clt C \\
        --sparse-model S --sparse-clt SC --prompts addition
Writes benchmarks/results/dense_vs_sparse_<prompts>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_circuits.attribution.attention import attention_attribution  # noqa: E402
from sparse_circuits.attribution.attribute import attribute  # noqa: E402
from sparse_circuits.attribution.prune import count_for_coverage, prune  # noqa: E402
from sparse_circuits.clt.cltdir import load_clt  # noqa: E402
from sparse_circuits.io import read_json, write_json  # noqa: E402
from sparse_circuits.sparse_attention.modeldir import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {
    "edges": "5.4-97x fewer edges",
    "heads": "~5 vs 40+ heads for 80 % of attention attribution",
}
IDENTIFIERS = ["total_count", "encoded_bytes", "max_line_length", "default_factory", "stack_level",
               "_pending_items", "tmp_buffer", "first_match", "nested_scope", "field_names"]  # fmt: skip


def addition_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        digits = f"{a + b:03d}"
        k = rng.randrange(3)
        out.append((f"<bos>{a:02d}+{b:02d}={digits[:k]}", digits[k]))
    return out


def induction_texts(n: int) -> list[str]:
    templates = [
        "def load(path):\n    {x} = read(path)\n    if not {x}:\n        return None\n    return {x}",
        "{x} = []\nfor item in items:\n    {x}.append(item)\nprint(len({x}",
        "class Config:\n    def __init__(self, {x}):\n        self.{x} = {x}",
    ]
    return [
        templates[i % len(templates)].format(x=IDENTIFIERS[i % len(IDENTIFIERS)]) for i in range(n)
    ]


def build_prompts(
    kind: str, n: int, tokenizer, vocab_size: int, seed: int
) -> list[tuple[list[int], int, str]]:
    """(prompt ids, target id, text) per prompt."""
    if kind == "addition":
        if tokenizer is None:
            raise SystemExit(
                "addition prompts need the model's tokenizer (an addition toy model dir)"
            )
        out = []
        for text, digit in addition_prompts(n, seed):
            ids = tokenizer.encode(text).ids
            target = tokenizer.token_to_id(digit)
            if target is None or tokenizer.decode(ids) != text:
                raise SystemExit(
                    f"the model's tokenizer does not read the addition prompt {text!r}"
                )
            out.append((ids, target, text + "|" + digit))
        return out
    if kind == "induction":
        if tokenizer is None:
            raise SystemExit(
                "induction prompts are text: the model needs a tokenizer (use 'repeat' otherwise)"
            )
        out = []
        for text in induction_texts(n):
            ids = tokenizer.encode(text).ids
            out.append((ids[:-1], ids[-1], text))  # the repeated identifier's last token
        return out
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(3, 6)
        seq = [rng.randrange(vocab_size) for _ in range(k)]
        filler = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 4))]
        ids = seq + filler + seq[:-1]
        out.append((ids, seq[-1], " ".join(map(str, ids)) + " -> " + str(seq[-1])))
    return out


def circuit_size(model, clt, clt_info, tokenizer, ids: list[int], target: int, args) -> dict:
    graph = attribute(model=model, clt=clt, prompt=ids, tokenizer=tokenizer, targets=[target], clt_info=clt_info,
                      max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)  # fmt: skip
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    att = attention_attribution(
        model=model, clt=clt, graph=graph, pruned=pruned, batch_size=args.batch_size
    )
    probs = graph.logit_targets[0].prob
    pos = graph.node_positions()
    cross = pos[graph.edge_sources] < pos[graph.edge_targets]
    return {
        "edges": graph.n_edges,
        "edges_for_80pct": count_for_coverage(pruned.edge_scores, args.coverage),
        "cross_edges": int(cross.sum()),
        "cross_edges_for_80pct": count_for_coverage(pruned.edge_scores[cross], args.coverage),
        "pruned_edges": int(pruned.edge_mask.sum()),
        "pruned_nodes": int(pruned.node_mask.sum()),
        "heads_for_80pct": att.summary.n_heads,
        "total_heads": att.summary.total_heads,
        "target_prob": round(probs, 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dense-model", type=Path, required=True)
    p.add_argument("--dense-clt", type=Path, required=True)
    p.add_argument("--sparse-model", type=Path, required=True)
    p.add_argument("--sparse-clt", type=Path, required=True)
    p.add_argument("--prompts", choices=["addition", "induction", "repeat"], default="addition")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--coverage", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, help="default: benchmarks/results/dense_vs_sparse_<prompts>.json"
    )
    args = p.parse_args(argv)

    variants = {}
    for name, model_dir, clt_dir in (
        ("dense", args.dense_model, args.dense_clt),
        ("sparse", args.sparse_model, args.sparse_clt),
    ):
        model, tokenizer = load_model(model_dir)
        variants[name] = (
            model,
            load_clt(clt_dir),
            read_json(Path(clt_dir) / "config.json"),
            tokenizer,
        )
    if variants["sparse"][0].cfg.gate is None:
        print(
            "warning: the 'sparse' model has no gate settings (not a sparsified model dir)",
            file=sys.stderr,
        )
    tokenizer = variants["dense"][3]
    prompts = build_prompts(
        args.prompts, args.n_prompts, tokenizer, variants["dense"][0].cfg.vocab_size, args.seed
    )

    rows = []
    for ids, target, text in prompts:
        row = {"prompt": text, "tokens": len(ids)}
        for name, (model, clt, clt_info, tok) in variants.items():
            row[name] = circuit_size(model, clt, clt_info, tok, ids, target, args)
        rows.append(row)
        print(f"{text!r}: edges80 {row['dense']['edges_for_80pct']} vs {row['sparse']['edges_for_80pct']}, "
              f"heads80 {row['dense']['heads_for_80pct']} vs {row['sparse']['heads_for_80pct']}", file=sys.stderr)  # fmt: skip

    def med(key: str, name: str) -> float:
        return statistics.median(r[name][key] for r in rows)

    def ratios(key: str) -> list[float]:
        return [r["dense"][key] / max(r["sparse"][key], 1) for r in rows]

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    keys = ("edges_for_80pct", "cross_edges_for_80pct", "heads_for_80pct")
    summary = {
        f"median_{k}": {v: statistics.median(r[v][k] for r in rows) for v in variants} for k in keys
    }
    summary["edge_ratio_dense_over_sparse"] = spread(ratios("edges_for_80pct"))
    summary["cross_edge_ratio_dense_over_sparse"] = spread(ratios("cross_edges_for_80pct"))
    summary["paper"] = PAPER
    result = {"prompts": args.prompts, "models": {"dense": str(args.dense_model), "sparse": str(args.sparse_model)},
              "settings": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))},
              "summary": summary, "rows": rows}  # fmt: skip
    out = args.out or RESULTS / f"dense_vs_sparse_{args.prompts}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)

    print("| prompt | edges for 80 %: dense | sparse | cross-position edges for 80 %: dense | sparse "
          "| heads for 80 %: dense | sparse |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d, s = r["dense"], r["sparse"]
        print(f"| {r['prompt']!r} | {d['edges_for_80pct']} | {s['edges_for_80pct']} | {d['cross_edges_for_80pct']} | "
              f"{s['cross_edges_for_80pct']} | {d['heads_for_80pct']}/{d['total_heads']} | "
              f"{s['heads_for_80pct']}/{s['total_heads']} |")  # fmt: skip
    e, c = summary["edge_ratio_dense_over_sparse"], summary["cross_edge_ratio_dense_over_sparse"]
    h = summary["median_heads_for_80pct"]
    print(f"\nmedian dense/sparse ratio, edges for 80 %: {e['median']:.1f}x (range {e['min']:.1f}-{e['max']:.1f}x); "
          f"cross-position edges: {c['median']:.1f}x (range {c['min']:.1f}-{c['max']:.1f}x). Paper: {PAPER['edges']}")  # fmt: skip
    print(
        f"median heads for 80 %: dense {h['dense']}, sparse {h['sparse']}. Paper: {PAPER['heads']}"
    )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
