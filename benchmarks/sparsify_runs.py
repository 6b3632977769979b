"""The post-training runs behind the reported figures, end to end through the CLI, over seeds.

    python benchmarks/sparsify_runs.py toy     --work runs/ --seeds 0 1 2  # train-toy + sparsify, defaults
    python benchmarks/sparsify_runs.py records --work runs/   # pretrain on a generated corpus + sparsify, defaults
    python benchmarks/sparsify_runs.py stdlib  --work runs/   # pretrain on the stdlib source + sparsify
    python benchmarks/sparsify_runs.py stdlib512 --work runs/  # the same at context 512

Each seed trains its own dense model and sparsifies it with that seed (`--dense-seed N` shares
one dense model instead). Every stage is resumable, so rerunning continues a killed run. Prints
a markdown table per seed and the mean and spread (standard deviation, min, max) over seeds,
and writes both as JSON to benchmarks/results/sparsify_<setting>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sparse_circuits.cli import main as cli
from sparse_circuits.sparse_attention.toy import records_corpus

# Sparsify runs with its defaults everywhere; the stdlib dense models are sized by hand for a
# 2-core CPU (4 layers, d_model 128, vocabulary 2048, context 256 or 512).
SETTINGS = {
    "toy": {"dense": ["train-toy", "--task", "addition"], "sparse": ["sparsify"]},
    "records": {"dense": ["pretrain", "--corpus", "{work}/records300.txt"], "sparse": ["sparsify"]},
    "stdlib": {
        "dense": ["pretrain", "--corpus", "stdlib", "--vocab-size", "2048", "--batch-size", "8", "--steps", "1500",
                  "--lr", "2e-3", "--context-length", "256"],
        "sparse": ["sparsify"],
    },
    "stdlib512": {
        "dense": ["pretrain", "--corpus", "stdlib", "--vocab-size", "2048", "--batch-size", "4", "--steps", "1500",
                  "--lr", "2e-3", "--context-length", "512"],
        "sparse": ["sparsify"],
    },
}  # fmt: skip

FIGURES = ("loss_ratio", "ce_gap", "sparse_accuracy", "dense_accuracy", "connectivity",
           "keys_per_query", "dense_seconds", "sparsify_seconds")  # fmt: skip


def run(setting: str, work: Path, seed: int, dense_seed: int | None) -> dict:
    """One seed: its dense model (or the shared one) and its sparsified twin."""
    work.mkdir(parents=True, exist_ok=True)
    if setting == "records" and not (work / "records300.txt").exists():
        (work / "records300.txt").write_text(records_corpus(300))
    d_seed = seed if dense_seed is None else dense_seed
    dense, sparse = work / f"{setting}-dense-s{d_seed}", work / f"{setting}-sparse-s{seed}"
    spec = SETTINGS[setting]
    timings_path = work / "timings.json"  # wall seconds of each finished stage, kept across reruns
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for out, args in (
        (dense, [*(a.format(work=work) for a in spec["dense"]), "--seed", str(d_seed)]),
        (sparse, [*spec["sparse"], "--seed", str(seed), "--model", str(dense)]),
    ):
        if not (out / "metrics.json").exists():
            t0 = time.perf_counter()
            assert cli([*args, "--out", str(out)]) == 0
            timings[out.name] = time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=1))
    sm = json.loads((sparse / "metrics.json").read_text())
    return {
        "seed": seed,
        "dense_seed": d_seed,
        "dense_loss": sm["dense_loss"],
        "sparse_loss": sm["loss"],
        "loss_ratio": sm["loss"] / sm["dense_loss"],
        "ce_gap": sm["loss"] - sm["dense_loss"],
        "within_tolerance": sm["within_tolerance"],
        "dense_accuracy": sm.get("dense_accuracy"),
        "sparse_accuracy": sm.get("accuracy"),
        "connectivity": sm["connectivity"],
        "keys_per_query": sm["keys_per_query"],
        "empty_query_fraction": sm["empty_query_fraction"],
        "context_length": sm["context_length"],
        "steps": sm["steps"],
        "batch_size": sm.get("batch_size"),
        "selected_step": sm["selected_step"],
        "dense_seconds": timings.get(dense.name),  # None: run before timings were kept
        "sparsify_seconds": timings.get(sparse.name),
    }


def spread(runs: list[dict]) -> dict:
    out = {}
    for key in FIGURES:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("runs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-seed", type=int, help="share this seed's dense model")
    args = parser.parse_args()
    runs = [run(args.setting, args.work, s, args.dense_seed) for s in args.seeds]
    result = {"setting": args.setting, "runs": runs, "over_seeds": spread(runs)}
    out = Path(__file__).parent / "results" / f"sparsify_{args.setting}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| seed | CE dense | CE sparse | accuracy | connectivity | keys/query | sparsify s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        acc = "–" if r["sparse_accuracy"] is None else f"{r['sparse_accuracy']:.4f}"
        print(f"| {r['seed']} | {r['dense_loss']:.4g} | {r['sparse_loss']:.4g} | {acc} | "
              f"{r['connectivity']:.4%} | {r['keys_per_query']:.3f} | {r['sparsify_seconds'] or 0:.0f} |")  # fmt: skip
    print("\n| figure | mean | std | min | max |\n|---|---|---|---|---|")
    for k, v in result["over_seeds"].items():
        print(f"| {k} | {v['mean']:.4g} | {v['std']:.2g} | {v['min']:.4g} | {v['max']:.4g} |")
