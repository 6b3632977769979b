"""Writes the records corpus (`sparse_circuits.sparse_attention.toy.records_corpus`): short
structured examples, one per line, for the pretrain → sparsify pipeline.

    python benchmarks/records_corpus.py --out corpus.txt --kilobytes 300
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_circuits.sparse_attention.toy import records_corpus

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kilobytes", type=float, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.write_text(records_corpus(args.kilobytes, args.seed))
