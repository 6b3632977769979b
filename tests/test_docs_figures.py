"""Docs that state what the code does: connectivity figures in the READMEs are recorded
results (benchmarks/results/), and the sparsify module docstring's τ and λ are what a run
logs and reports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from sparse_circuits.cli import main
from sparse_circuits.sparse_attention import sparsify as sparsify_module
from sparse_circuits.sparse_attention.sparsify import (
    SparsifyConfig,
    constraint_error,
    tolerance,
    update_lambda,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--batch-size", "32"]


def _recorded(obj, key: str) -> list[float]:
    """Every number stored under `key` anywhere in a results document."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key and isinstance(v, int | float)] + [
            x for v in obj.values() for x in _recorded(v, key)
        ]
    if isinstance(obj, list):
        return [x for v in obj for x in _recorded(v, key)]
    return []


def test_connectivity_figures_in_the_readmes_are_recorded_results():
    results = [json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "results").glob("*.json")]
    recorded = [c for doc in results for c in _recorded(doc, "connectivity")]
    assert recorded
    pattern = re.compile(
        r"(\d+(?:\.\d+)?) ?% (?:connectivity|of causal)|connectivity (\d+(?:\.\d+)?) ?%"
    )
    quoted = 0
    for readme in (ROOT / "README.md", ROOT / "benchmarks" / "README.md"):
        for m in pattern.finditer(readme.read_text()):
            text = m.group(1) or m.group(2)
            places = len(text.split(".")[1]) if "." in text else 0
            assert any(round(100 * c, places) == float(text) for c in recorded), (
                f"{readme.name}: '{m.group(0)}' is no connectivity in benchmarks/results/"
            )
            quoted += 1
    assert quoted >= 3


def test_the_sparsify_docstring_states_the_taus_and_lambda_a_run_uses(tmp_path):
    """τ_batch (each batch's dense CE) drives λ through the PI step on the constraint in units
    of its slack; τ_held-out is the `tau` metrics.json reports beside the held-out loss."""
    doc = sparsify_module.__doc__
    for name in (
        "τ_batch",
        "τ_validation",
        "τ_held-out",
        "(CE_hard − τ'_batch) / (τ'_batch − CE_dense,batch)",
    ):
        assert name in doc, name
    dense, out = tmp_path / "dense", tmp_path / "sparse"
    assert main(["train-toy", "--out", str(dense), "--steps", "30", "--lr", "3e-3", *TINY]) == 0
    args = ["--steps", "8", "--batch-size", "16", "--eval-sequences", "64", "--select-every", "4",
            "--log-every", "1", "--lambda-ki", "0.5"]  # fmt: skip
    assert main(["sparsify", "--model", str(dense), "--out", str(out), *args]) == 0
    cfg = SparsifyConfig(model=dense, out=out, steps=8, lambda_ki=0.5)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(8))
    lam, integral, ema = cfg.lambda_init, math.log(cfg.lambda_init), 0.0
    for r in lines:
        assert r["tau"] == pytest.approx(
            tolerance(r["dense_ce"], cfg.tolerance_rel, cfg.tolerance_abs)
        )
        error = constraint_error(r["hard_ce"], r["dense_ce"], r["tau"], cfg.tolerance_margin)
        assert r["lambda"] == pytest.approx(lam) and r["constraint_error"] == pytest.approx(error)
        lam, integral, ema = update_lambda(integral, ema, error, cfg)
    assert lam != cfg.lambda_init  # λ moved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tau"] == pytest.approx(
        tolerance(metrics["dense_loss"], cfg.tolerance_rel, cfg.tolerance_abs)
    )
    assert metrics["within_tolerance"] == (metrics["loss"] <= metrics["tau"])
