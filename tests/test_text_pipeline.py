"""A user's first text run, `pretrain --corpus FILE` then `sparsify` with the defaults: both
runs are sized from the corpus and the model's context, not from the addition toy."""

from __future__ import annotations

import torch

from sparse_circuits.sparse_attention.sparsify import SparsifyConfig, plan_run
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
