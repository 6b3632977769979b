"""A user's first text run: `pretrain --corpus FILE` then `sparsify`, every other flag at its
default, on a generated corpus of short structured examples. The defaults must size both runs
from the corpus and the model's context (not from the addition toy), print their plan, and
reach sparsify's own tolerance."""

from __future__ import annotations

import json
import logging

import torch

from sparse_circuits.cli import main
from sparse_circuits.sparse_attention.sparsify import SparsifyConfig, plan_run
from sparse_circuits.sparse_attention.toy import records_corpus
from sparse_circuits.sparse_attention.training import size_run


def test_run_sizes_follow_the_context_and_the_data():
    cpu = torch.device("cpu")
    cfg = SparsifyConfig(model="m", out="o")
    toy = plan_run(cfg, n_train=9000, context_length=9, device=cpu)
    lm = plan_run(cfg, n_train=100_000, context_length=256, device=cpu)
    lm1k = plan_run(cfg, n_train=100_000, context_length=1024, device=torch.device("meta"))
    assert toy.batch_size == 2048 // 9 and lm.batch_size == 8 and lm1k.batch_size == 16
    assert lm.steps == 1000 == toy.steps  # 30 passes, at most 1000 steps
    assert toy.warmup_steps == toy.steps // 20 and toy.select_every == toy.steps // 30
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


def test_pretrain_then_sparsify_with_defaults_on_a_text_corpus(tmp_path, caplog):
    corpus, dense, sparse = tmp_path / "records.txt", tmp_path / "dense", tmp_path / "sparse"
    corpus.write_text(records_corpus(kilobytes=100))
    caplog.set_level(logging.INFO)
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(dense)]) == 0
    assert main(["sparsify", "--model", str(dense), "--out", str(sparse)]) == 0
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan:")]
    assert len(plans) == 2 and "tokens per step" in plans[1]
    assert any("s per step: about" in r.getMessage() for r in caplog.records)  # the estimate
    m = json.loads((sparse / "metrics.json").read_text())
    assert m["context_length"] == 256 and m["batch_size"] * 256 <= 2048
    assert m["within_tolerance"], m
    assert m["connectivity"] < 0.25, m  # the sparsity pressure did its work
    print(f"connectivity {m['connectivity']:.4f}, keys per query {m['keys_per_query']:.3f}, "
          f"CE {m['loss']:.4f} against dense {m['dense_loss']:.4f} (τ {m['tau']:.4f})")
