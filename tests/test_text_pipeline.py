"""A user's first text run, `pretrain --corpus FILE` then `sparsify` with the defaults: both
runs are sized from the corpus and the model's context, not from the addition toy."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_circuits.cli import main
from sparse_circuits.sparse_attention.sparsify import (
    SparsifyConfig,
    plan_run,
    split_heldout_sequences,
)
from sparse_circuits.sparse_attention.toy import records_corpus
from sparse_circuits.sparse_attention.training import size_run


def test_run_sizes_follow_the_context_and_the_data():
    cpu = torch.device("cpu")
    cfg = SparsifyConfig(model="m", out="o")
    toy = plan_run(cfg, n_train=9000, context_length=9, device=cpu)
    lm = plan_run(cfg, n_train=100_000, context_length=256, device=cpu)
    lm1k = plan_run(cfg, n_train=100_000, context_length=1024, device=torch.device("meta"))
    assert lm.batch_size == 8 and lm1k.batch_size == 16
    assert lm.steps == 1000  # 30 passes, at most 1000 steps
    # a short context: at most 64 sequences a step, and the cap on steps grows to match
    assert toy.batch_size == 64 and toy.steps == int(1000 * 2048 / (64 * 9))
    assert lm.lr == 4e-4 == lm1k.lr and toy.lr == pytest.approx(4e-4 * (64 * 9 / 2048) ** 0.5)
    assert toy.warmup_steps == toy.steps // 20 and lm.select_every == lm.steps // 30
    assert toy.select_every == 1000 // 30  # checks as many steps apart as at 1000 steps
    # the weights kept are chosen on what the reported sequences leave, up to 32,768 tokens
    assert split_heldout_sequences(1000, 9, cfg) == (512, 488)  # the toy's held-out tenth
    assert split_heldout_sequences(5000, 256, cfg) == (512, 128)
    assert split_heldout_sequences(200, 256, cfg) == (100, 100)  # a small set: half and half
    small = plan_run(cfg, n_train=60, context_length=256, device=cpu)
    assert small.batch_size == 3 and small.steps == 600  # ≥ 20 steps a pass; 30 passes
    mine = plan_run(cfg.model_copy(update={"batch_size": 5, "steps": 7, "warmup_steps": 0}),
                    n_train=60, context_length=256, device=cpu)  # fmt: skip
    assert (mine.batch_size, mine.steps, mine.warmup_steps) == (5, 7, 0)
    # pretrain: a small corpus gets ~10 passes of at least 20 steps; a large one is capped
    assert size_run(n_train=259, context_length=256, batch_tokens=8192, batch_size=None,
                    steps=None, passes=10, min_steps=1, max_steps=3000) == (12, 216)  # fmt: skip
    assert size_run(n_train=10**6, context_length=256, batch_tokens=8192, batch_size=None,
                    steps=None, passes=10, min_steps=1, max_steps=3000) == (32, 3000)  # fmt: skip


def test_pretrain_then_sparsify_with_defaults_meets_its_tolerance(tmp_path):
    """A user's corpus of short examples, pretrain then sparsify through the CLI: sparsify with
    every flag at its default reaches its own tolerance on held-out text with a small fraction of
    the causal pairs open. The corpus is small enough to be memorised (30 passes), the case where
    λ must answer the validation checks and not only the training batches. The model is small
    (2 layers, width 64, context 128) to keep the test short; the default-sized model on a
    300 kB corpus is `benchmarks/sparsify_runs.py records`."""
    corpus = tmp_path / "records.txt"
    corpus.write_text(records_corpus(100, seed=0))
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(dense), "--n-layers", "2",
                 "--d-model", "64", "--context-length", "128", "--vocab-size", "512"]) == 0  # fmt: skip
    assert main(["sparsify", "--model", str(dense), "--out", str(sparse)]) == 0
    m = json.loads((sparse / "metrics.json").read_text())
    run = json.loads((sparse / "run.json").read_text())["config"]
    assert run["steps"] is None and run["batch_size"] is None  # sized by the stage
    assert m["batch_size"] * 128 <= 2048 and m["steps"] >= 300
    assert m["within_tolerance"] and m["loss"] <= m["tau"]
    assert m["connectivity"] < 0.02, m["connectivity"]
    assert m["selected_step"] > m["steps"] // 2  # kept after the anneal, not the first candidate
