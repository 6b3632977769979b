"""sparsify's controller over steps for several runs in one figure (λ, the constraint in units
of its slack, connectivity), e.g. the same dense model before and after a change:

    python benchmarks/plot_sparsify_curves.py --run before=runs/a --run after=runs/b --out docs/sparsify_controller.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_circuits.io import read_jsonl
from sparse_circuits.sparse_attention.plots import plot_training_curves

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="LABEL=SPARSIFIED_MODEL_DIR")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, _, path = item.partition("=")
        runs[label] = read_jsonl(Path(path) / "metrics.jsonl")
        final = json.loads((Path(path) / "metrics.json").read_text())
        print(f"{label}: {len(runs[label])} records; held-out connectivity {final['connectivity']:.4f}, "
              f"CE {final['loss']:.4g} against dense {final['dense_loss']:.4g}")  # fmt: skip
    plot_training_curves(runs, args.out)
