"""Dense training from scratch: `train-toy` (a toy task) and `pretrain` (a small LM on a corpus)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import resolve_device
from ..io import claim_run_dir, write_json
from .connectivity import evaluate
from .data import DataSpec, TokenData, build_data, load_texts, save_data_spec, train_bpe_tokenizer
from .model import ModelConfig, Transformer
from .modeldir import save_model
from .training import OptimConfig, autocast, run_training, size_run, warmup_for

log = logging.getLogger(__name__)


class ArchitectureFields(OptimConfig):
    family: Literal["gpt2", "llama"] = Field("gpt2", description="Model family.")
    n_layers: int = Field(4, gt=0, description="Transformer blocks.")
    d_model: int = Field(128, gt=0, description="Residual stream width (a multiple of n_heads).")
    n_heads: int = Field(4, gt=0, description="Attention heads per layer.")
    n_kv_heads: int | None = Field(
        None, description="Key/value heads for llama (GQA); default n_heads."
    )
    d_mlp: int | None = Field(None, gt=0, description="MLP hidden width; default 4 * d_model.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchitectureFields:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}: "
                "each head gets d_model / n_heads dimensions"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {kv}")
        return self

    def model_config_for(self, vocab_size: int, context_length: int, **extra) -> ModelConfig:
        return ModelConfig(
            family=self.family,
            vocab_size=vocab_size,
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_mlp=self.d_mlp or 4 * self.d_model,
            context_length=context_length,
            bias=self.family == "gpt2",
            **extra,
        )


class ToyTrainConfig(ArchitectureFields):
    """`train-toy`: a dense model on a toy task. Defaults reach ≥ 99 % held-out exact match."""

    task: Literal["addition"] = Field("addition", description="The toy task.")
    out: Path = Field(description="Model directory to write.")
    heldout_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Problems held out: half reported, half for sparsify's choice of weights.",
    )
    steps: int = Field(1500, gt=0, description="Optimiser steps.")
    batch_size: int = Field(128, gt=0, description="Problems per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (warm-up, then cosine decay).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")


PRETRAIN_MAX_STEPS = 3000  # a large corpus: a bounded run by default, longer on request
# Held-out sequences a small corpus keeps at least (up to a fifth of it): sparsify splits them
# into the ones that choose its weights and the ones that judge them, and a handful of
# sequences cannot tell a 2 % tolerance from noise.
MIN_HELDOUT = 32


class PretrainConfig(ArchitectureFields):
    """`pretrain`: a small LM on a text corpus (default: the Python standard library's source)."""

    corpus: list[str] = Field(
        ["stdlib"], description="Text files, folders, globs, a hub dataset name, or 'stdlib'."
    )
    out: Path = Field(description="Model directory to write.")
    context_length: int = Field(256, gt=1, description="Tokens per training sequence.")
    vocab_size: int = Field(4096, gt=256, description="BPE vocabulary trained on the corpus.")
    max_tokens: int | None = Field(None, gt=0, description="Use at most this many corpus tokens.")
    text_field: str = Field("text", description="Column holding the text in JSON/parquet data.")
    steps: int | None = Field(
        None,
        gt=0,
        description="Optimiser steps; default: --passes over the training tokens, at most 3000.",
    )
    passes: float = Field(
        10, gt=0, description="Passes over the corpus when --steps is not given."
    )
    batch_tokens: int = Field(
        8192,
        gt=0,
        description="Tokens per step, as whole sequences of the context length (at least 20 "
        "steps per pass over a small corpus).",
    )
    batch_size: int | None = Field(
        None, gt=0, description="Sequences per step; overrides --batch-tokens."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear learning-rate warm-up; default: a twentieth of the steps."
    )
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (warm-up, then cosine decay).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    eval_sequences: int = Field(256, gt=0, description="Held-out sequences for the final loss.")


def _train_dense(
    cfg: OptimConfig,
    model: Transformer,
    data: TokenData,
    out: Path,
    task: str | None,
    eval_n: int | None = None,
) -> dict:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)

    def step_fn(step: int) -> dict[str, float]:
        x, y = data.batch(step, cfg.batch_size, cfg.seed)
        with autocast(device):
            loss = model(x.to(device), y.to(device)).loss
        loss.backward()
        return {"loss": loss.item()}

    run_training(model=model, cfg=cfg, out=out, step_fn=step_fn, desc=f"train {out.name}")
    n = eval_n or data.heldout_inputs.shape[0]
    metrics = evaluate(model, data.heldout_inputs[:n], data.heldout_targets[:n], task=task)
    save_model(model, out, data.tokenizer)
    save_data_spec(out, data.spec)
    write_json(out / "metrics.json", metrics)  # last: its presence marks the model dir complete
    log.info("held-out %s", {k: v for k, v in metrics.items() if not isinstance(v, list)})
    return metrics


def _identity(cfg: ArchitectureFields) -> dict:
    """What makes two runs the same run: every field but where it runs."""
    return cfg.model_dump(mode="json", exclude={"device"})


def train_toy(cfg: ToyTrainConfig) -> Path:
    resolve_device(cfg.device)  # a device this machine lacks fails before the run dir is claimed
    out = claim_run_dir(cfg.out, "train-toy", _identity(cfg))
    data = build_data(DataSpec(task=cfg.task, seed=cfg.seed, heldout_fraction=cfg.heldout_fraction))
    torch.manual_seed(cfg.seed)  # the initialisation too: one seed, one model
    model = Transformer(
        cfg.model_config_for(data.tokenizer.get_vocab_size(), data.context_length, bos_token_id=0)
    )
    _train_dense(cfg, model, data, out, task=cfg.task)
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    resolve_device(cfg.device)
    out = claim_run_dir(cfg.out, "pretrain", _identity(cfg))
    spec = DataSpec(
        corpus=cfg.corpus,
        context_length=cfg.context_length,
        max_tokens=cfg.max_tokens,
        text_field=cfg.text_field,
        seed=cfg.seed,
    )
    tokenizer = train_bpe_tokenizer(load_texts(cfg.corpus, cfg.text_field), cfg.vocab_size)
    data = build_data(spec, tokenizer)
    n_all = data.train_inputs.shape[0] + data.heldout_inputs.shape[0]
    wanted = min(MIN_HELDOUT, n_all // 5)
    if data.heldout_inputs.shape[0] < wanted:  # a small corpus: 5 % is too few to judge by
        spec = spec.model_copy(update={"heldout_fraction": wanted / n_all})  # saved in data.json
        data = build_data(spec, tokenizer)
    n_train = data.train_inputs.shape[0]
    batch_size, steps = size_run(
        n_train=n_train, context_length=cfg.context_length, batch_tokens=cfg.batch_tokens,
        batch_size=cfg.batch_size, steps=cfg.steps, passes=cfg.passes, min_steps=1,
        max_steps=PRETRAIN_MAX_STEPS,
    )  # fmt: skip
    capped = cfg.steps is None and steps == PRETRAIN_MAX_STEPS
    cfg = cfg.model_copy(
        update={
            "batch_size": batch_size,
            "steps": steps,
            "warmup_steps": warmup_for(steps, cfg.warmup_steps),
        }
    )
    log.info(
        "plan: corpus of %d training sequences of %d tokens (%s tokens; %d held out); %d tokens "
        "per step (%d sequences), %d steps = %.1f passes%s",
        n_train, cfg.context_length, f"{n_train * cfg.context_length:,}",
        data.heldout_inputs.shape[0],
        batch_size * cfg.context_length, batch_size, steps, steps * batch_size / n_train,
        f" (capped at {PRETRAIN_MAX_STEPS} steps)" if capped else "",
    )  # fmt: skip
    eos = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(cfg.seed)  # the initialisation too: one seed, one model
    model = Transformer(
        cfg.model_config_for(tokenizer.get_vocab_size(), cfg.context_length, eos_token_id=eos)
    )
    _train_dense(cfg, model, data, out, task=None, eval_n=cfg.eval_sequences)
    return out
