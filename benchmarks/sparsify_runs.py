"""The post-training runs behind the reported figures, end to end through the CLI.

    python benchmarks/sparsify_runs.py toy    --work runs/   # train-toy + sparsify, defaults
    python benchmarks/sparsify_runs.py stdlib --work runs/   # pretrain on the stdlib source + sparsify
    python benchmarks/sparsify_runs.py stdlib512 --work runs/  # the same at context 512

Every stage is resumable, so rerunning continues a killed run. Prints a markdown table of the
figures (dense vs sparse CE, accuracy, connectivity, keys per query, wall time) and writes it as
JSON to benchmarks/results/sparsify_<setting>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparse_circuits.cli import main as cli

# The stdlib settings are sized for a 2-core CPU: 4 layers, d_model 128, context 256 or 512.
SETTINGS = {
    "toy": {
        "dense": ["train-toy", "--task", "addition"],
        "sparse": ["sparsify"],
    },
    "stdlib": {
        "dense": ["pretrain", "--corpus", "stdlib", "--vocab-size", "2048", "--batch-size", "8", "--steps", "1500",
                  "--lr", "2e-3", "--context-length", "256"],
        "sparse": ["sparsify", "--batch-size", "8", "--steps", "1000", "--lr", "5e-4", "--eval-sequences", "128",
                   "--eval-batch-size", "8", "--lambda-max-log-step", "0.02"],
    },
    # The same model and token budget at context 512, for 512-token attribution graphs.
    "stdlib512": {
        "dense": ["pretrain", "--corpus", "stdlib", "--vocab-size", "2048", "--batch-size", "4", "--steps", "1500",
                  "--lr", "2e-3", "--context-length", "512"],
        "sparse": ["sparsify", "--batch-size", "4", "--steps", "1000", "--lr", "5e-4", "--eval-sequences", "64",
                   "--eval-batch-size", "4", "--lambda-max-log-step", "0.02"],
    },
}  # fmt: skip


def run(setting: str, work: Path) -> dict:
    dense, sparse = work / f"{setting}-dense", work / f"{setting}-sparse"
    spec = SETTINGS[setting]
    t0 = time.perf_counter()
    if not (dense / "metrics.json").exists():
        assert cli([*spec["dense"], "--out", str(dense)]) == 0
    t1 = time.perf_counter()
    if not (sparse / "metrics.json").exists():
        assert cli([*spec["sparse"], "--model", str(dense), "--out", str(sparse)]) == 0
    t2 = time.perf_counter()
    dm, sm = (
        json.loads((dense / "metrics.json").read_text()),
        json.loads((sparse / "metrics.json").read_text()),
    )
    result = {
        "setting": setting,
        "dense_loss": sm["dense_loss"],
        "sparse_loss": sm["loss"],
        "loss_ratio": sm["loss"] / sm["dense_loss"],
        "dense_accuracy": sm.get("dense_accuracy"),
        "sparse_accuracy": sm.get("accuracy"),
        "connectivity": sm["connectivity"],
        "keys_per_query": sm["keys_per_query"],
        "empty_query_fraction": sm["empty_query_fraction"],
        "context_length": sm["context_length"],
        "dense_seconds_this_run": t1 - t0,
        "sparsify_seconds_this_run": t2 - t1,
        "dense_training_loss": dm["loss"],
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("runs"))
    args = parser.parse_args()
    result = run(args.setting, args.work)
    out = Path(__file__).parent / "results" / f"sparsify_{args.setting}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| figure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
