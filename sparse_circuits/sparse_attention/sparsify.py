"""Sparse attention post-training (arXiv 2512.05865): make a trained model's attention sparse
while keeping its loss.

    minimise   R(θ) = mean expected open fraction of causal edges
    subject to CE(θ) ≤ τ,   τ = max((1 + rel) · CE_dense, CE_dense + abs) on held-out data

    L = R + λ · (CE − τ)  [+ w · KL(dense ‖ model)]
    λ ← clamp(λ · exp(clamp(η · EMA(CE_hard − τ), ±max_log_step)), λ_min, λ_max)   (GECO-style)

CE in the loss is the noisy-gate CE that carries gradients; CE_hard, which drives λ, is the
same batch's CE with deterministic gates, the model inference will run.

The gate offset b starts high (gates open) and is annealed to 0. The schedules are pure
functions of the step, and λ with its EMA is checkpointed, so a killed run resumes exactly.

λ can overshoot in either direction, so after annealing, every `select_every` steps the
weights are checked on validation sequences (held out, and apart from the reported ones);
the sparsest weights whose deterministic-gate CE keeps to τ there (and, on tasks, whose
accuracy stays within `accuracy_tolerance` of dense) are the ones saved.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..config import resolve_device
from ..errors import StageError
from ..io import claim_run_dir, load_tensors, save_tensors, write_json
from .connectivity import evaluate
from .data import DataSpec, TokenData, load_token_data, save_data_spec
from .hooks import capture
from .model import GateConfig, ModelOutput, Transformer, causal_pair_count
from .modeldir import load_model, save_model
from .plots import plot_attention_patterns
from .training import OptimConfig, autocast, run_training

log = logging.getLogger(__name__)


class SparsifyConfig(OptimConfig):
    """`sparsify`: gated sparse attention post-training of a trained model."""

    model: Path = Field(description="Model directory (ours or a Hugging Face checkpoint).")
    out: Path = Field(description="Sparsified model directory to write.")
    data: list[str] | None = Field(
        None,
        description="Corpus to train on (files, folders, 'stdlib', a hub name); default: the model's own data.",
    )
    context_length: int | None = Field(
        None, gt=1, description="Context length; default: the model's data's."
    )
    steps: int = Field(1500, gt=0, description="Optimiser steps.")
    batch_size: int = Field(128, gt=0, description="Sequences per step.")
    lr: float = Field(
        3e-4, gt=0, description="The biggest lever: too high and the noisy-gate CE spikes."
    )
    warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up.")
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: constant after warm-up.")
    gate_offset_start: float = Field(3.0, description="Gate offset b at step 0 (gates start open).")
    gate_offset_anneal: float = Field(
        0.5, gt=0, le=1, description="Fraction of steps over which b goes to 0."
    )
    lambda_init: float = Field(1.0, gt=0, description="Initial Lagrange multiplier on CE − τ.")
    lambda_lr: float = Field(1.0, gt=0, description="η: multiplicative λ update rate.")
    lambda_ema: float = Field(0.99, ge=0, lt=1, description="EMA decay of the constraint CE − τ.")
    lambda_min: float = Field(1e-3, gt=0, description="Lower clamp of λ.")
    lambda_max: float = Field(1e4, gt=0, description="Upper clamp of λ.")
    lambda_max_log_step: float = Field(
        0.05, gt=0, description="Largest change of log λ in one step."
    )
    tolerance_rel: float = Field(0.02, ge=0, description="τ = max((1+rel)·CE_dense, CE_dense+abs).")
    tolerance_abs: float = Field(
        0.005, ge=0, description="Absolute floor of the tolerance, in nats."
    )
    accuracy_tolerance: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Tasks: chosen weights keep validation accuracy within this of dense.",
    )
    distill_weight: float = Field(
        0.0, ge=0, description="Weight of KL(dense ‖ sparse) distillation; 0 disables."
    )
    lora_rank: int = Field(
        0, ge=0, description="LoRA rank (peft) for models too big to fine-tune whole; 0 = full."
    )
    eval_sequences: int = Field(
        512, gt=0, description="Held-out sequences for τ and the final metrics."
    )
    eval_batch_size: int = Field(64, gt=0, description="Sequences per evaluation forward pass.")
    select_sequences: int = Field(
        128,
        ge=0,
        description="Held-out sequences, apart from the reported ones, for choosing the final weights.",
    )
    select_every: int = Field(
        50, gt=0, description="Steps between checks of a candidate for the final weights."
    )
    figure_index: int = Field(
        0, ge=0, description="Held-out sequence drawn in attention_patterns.png."
    )

    @model_validator(mode="after")
    def _check(self) -> SparsifyConfig:
        if self.lambda_min > self.lambda_max:
            raise StageError("lambda_min is larger than lambda_max")
        return self


# ----------------------------------------------------------------------------- schedules


def gate_offset_at(step: int, *, start: float, anneal_steps: int) -> float:
    """Linear from `start` to 0 over `anneal_steps`, then 0."""
    return start * max(0.0, 1.0 - step / max(anneal_steps, 1))


def tolerance(dense_ce: float, rel: float, abs_: float) -> float:
    """τ: a relative tolerance with an absolute floor, since a near-zero CE has noise above 2 % of it."""
    return max((1 + rel) * dense_ce, dense_ce + abs_)


def update_lambda(
    lam: float, ema: float, violation: float, cfg: SparsifyConfig
) -> tuple[float, float]:
    """One GECO step: EMA of CE − τ, then a bounded multiplicative change of λ."""
    ema = cfg.lambda_ema * ema + (1 - cfg.lambda_ema) * violation
    log_step = max(-cfg.lambda_max_log_step, min(cfg.lambda_max_log_step, cfg.lambda_lr * ema))
    lam = min(cfg.lambda_max, max(cfg.lambda_min, lam * math.exp(log_step)))
    return lam, ema


# ----------------------------------------------------------------------------- the run


def wrap_lora(model: Transformer, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415  (optional dependency)

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
    return get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    )


def dense_reference(
    model: Transformer, trainee: torch.nn.Module, lora: bool
) -> Callable[[torch.Tensor, torch.Tensor], ModelOutput]:
    """The dense model's output on a batch, without gradients. Each batch's constraint is
    measured against the dense CE on that same batch (a held-out τ would compare a memorised
    training stream with unseen text, and the noise of a few sequences exceeds a 2 % tolerance);
    the same output teaches KL. Under LoRA the base weights are the dense model; otherwise a
    frozen copy stays beside the trainee."""
    if lora:

        def forward(x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
            model.set_gate("off")
            with torch.no_grad(), trainee.disable_adapter():
                return trainee(x, y)

        return forward
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def forward(x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        with torch.no_grad():
            return teacher(x, y)

    return forward


def sparsify(cfg: SparsifyConfig) -> Path:
    device = resolve_device(cfg.device)
    out = claim_run_dir(cfg.out, "sparsify", cfg.model_dump(mode="json", exclude={"device"}))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device)
    if model.cfg.gate is not None:
        raise StageError(
            f"{cfg.model} is already sparsified; post-train the dense model it came from"
        )
    data = _data_for(cfg)
    if data.context_length > model.cfg.context_length:
        raise StageError(
            f"context length {data.context_length} is longer than the model's {model.cfg.context_length}"
        )
    task = data.spec.task
    held_x, held_y = (
        data.heldout_inputs[: cfg.eval_sequences],
        data.heldout_targets[: cfg.eval_sequences],
    )

    model.set_gate("off")
    dense = evaluate(model, held_x, held_y, batch_size=cfg.eval_batch_size, task=task)
    tau = tolerance(dense["loss"], cfg.tolerance_rel, cfg.tolerance_abs)
    log.info("dense CE on the held-out set %.4f: τ_held-out = %.4f", dense["loss"], tau)
    sample = held_x[cfg.figure_index % held_x.shape[0]].unsqueeze(0)
    dense_patterns = _patterns(model, sample)

    trainee: torch.nn.Module = wrap_lora(model, cfg.lora_rank) if cfg.lora_rank else model
    dense_forward = dense_reference(model, trainee, lora=bool(cfg.lora_rank))
    state = {"lambda": cfg.lambda_init, "ema": 0.0, "best_step": -1, "best_connectivity": 2.0}
    anneal_steps = int(cfg.gate_offset_anneal * cfg.steps)
    n_eval = held_x.shape[0]
    val_x = data.heldout_inputs[n_eval : n_eval + cfg.select_sequences]
    val_y = data.heldout_targets[n_eval : n_eval + cfg.select_sequences]
    best_path = out / "best.safetensors"

    dense_val = (
        evaluate(model, val_x, val_y, batch_size=cfg.eval_batch_size, task=task)
        if len(val_x)
        else {}
    )
    tau_val = (
        tolerance(dense_val["loss"], cfg.tolerance_rel, cfg.tolerance_abs) if dense_val else tau
    )
    if dense_val:
        log.info(
            "dense CE on the validation set %.4f: τ_validation = %.4f (chooses the weights kept; "
            "λ follows each training batch against its own dense CE)",
            dense_val["loss"],
            tau_val,
        )

    def select(step: int) -> None:
        """Keep the sparsest weights that meet the constraint on the validation sequences."""
        if val_x.shape[0] == 0 or step < anneal_steps or (step + 1) % cfg.select_every:
            return
        model.set_gate("hard", 0.0)
        check = evaluate(model, val_x, val_y, batch_size=cfg.eval_batch_size, task=task)
        accurate = (
            task is None or check["accuracy"] >= dense_val["accuracy"] - cfg.accuracy_tolerance
        )
        if (
            check["loss"] <= tau_val
            and accurate
            and check["connectivity"] < state["best_connectivity"]
        ):
            save_tensors(
                best_path, {k: v.clone() for k, v in trainee.state_dict().items()}
            )  # clone: tied weights
            state["best_step"], state["best_connectivity"] = step + 1, check["connectivity"]

    def step_fn(step: int) -> dict[str, float]:
        offset = gate_offset_at(step, start=cfg.gate_offset_start, anneal_steps=anneal_steps)
        x, y = data.batch(step, cfg.batch_size, cfg.seed)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            dense_out = dense_forward(x, y)
            model.set_gate("stochastic", offset)
            o = trainee(x, y)
            expected = torch.stack([s.expected_open for s in o.gate_stats])  # L,B,H
            open_fraction = expected.mean()
            loss = open_fraction + state["lambda"] * o.loss
            kl = torch.zeros(())
            if cfg.distill_weight > 0:
                t_logits = dense_out.logits
                kl = (
                    F.kl_div(
                        o.logits.float().log_softmax(-1),
                        t_logits.float().log_softmax(-1),
                        log_target=True,
                        reduction="batchmean",
                    )
                    / x.shape[1]
                )
                loss = loss + cfg.distill_weight * kl
        loss.backward()
        # λ follows the deterministic-gate CE, the one inference has: the noisy-gate CE sits
        # above τ by the noise alone, which would ratchet λ to its clamp and stall sparsity.
        with torch.no_grad():
            model.set_gate("hard", offset)
            hard_ce = trainee(x, y).loss.item()
        lam_used = state["lambda"]
        batch_tau = tolerance(dense_out.loss.item(), cfg.tolerance_rel, cfg.tolerance_abs)
        state["lambda"], state["ema"] = update_lambda(
            state["lambda"], state["ema"], hard_ce - batch_tau, cfg
        )
        T = x.shape[1]
        hard_edges = torch.stack([s.open_edges for s in o.gate_stats]).double()  # L,B,H
        return {
            "ce": o.loss.item(),
            "hard_ce": hard_ce,
            "dense_ce": dense_out.loss.item(),
            "tau": batch_tau,
            "lambda": lam_used,
            "constraint_ema": state["ema"],
            "gate_offset": offset,
            "open": open_fraction.item(),
            "hard_connectivity": (hard_edges / causal_pair_count(T)).mean().item(),
            "keys_per_query": (hard_edges / T).mean().item(),
            "kl": kl.item(),
        }

    run_training(
        model=trainee,
        cfg=cfg,
        out=out,
        step_fn=step_fn,
        extra_state=state,
        after_step=select,
        desc=f"sparsify {out.name}",
    )
    if state["best_step"] >= 0:
        trainee.load_state_dict(load_tensors(best_path))
        log.info(
            "final weights: step %d (validation connectivity %.4f)",
            state["best_step"],
            state["best_connectivity"],
        )
    elif len(val_x):
        log.warning(
            "no checkpoint kept the validation CE within τ_validation = %.4f: the final weights are saved, "
            "but they miss the tolerance; rerun with more steps or a smaller --lambda-max-log-step",
            tau_val,
        )
    if cfg.lora_rank:
        model = trainee.merge_and_unload()

    model.cfg = model.cfg.model_copy(update={"gate": GateConfig(offset=0.0)})
    model.set_gate("hard", 0.0)
    sparse = evaluate(model, held_x, held_y, batch_size=cfg.eval_batch_size, task=task)
    metrics = {
        "dense_loss": dense["loss"],
        "tau": tau,
        **sparse,
        "lambda": state["lambda"],
        "steps": cfg.steps,
        "selected_step": state["best_step"] if state["best_step"] >= 0 else cfg.steps,
        "within_tolerance": sparse["loss"] <= tau,
    }
    if task is not None:
        metrics["dense_accuracy"] = dense["accuracy"]
    save_model(model, out, tokenizer or data.tokenizer)  # metrics.json last: it marks completion
    save_data_spec(out, data.spec)
    plot_attention_patterns(
        dense_patterns,
        _patterns(model, sample),
        out / "attention_patterns.png",
        tokens=[data.tokenizer.id_to_token(int(t)) for t in sample[0]],
    )
    write_json(out / "metrics.json", metrics)
    log.info(
        "sparse: held-out CE %.4f (dense %.4f, τ_held-out %.4f), connectivity %.4f, keys/query %.3f",
        sparse["loss"],
        dense["loss"],
        tau,
        sparse["connectivity"],
        sparse["keys_per_query"],
    )
    return out


def _data_for(cfg: SparsifyConfig) -> TokenData:
    spec = None
    if cfg.data is not None:
        spec = DataSpec(corpus=cfg.data, context_length=cfg.context_length, seed=cfg.seed)
    return load_token_data(cfg.model, spec, cfg.context_length)


@torch.no_grad()
def _patterns(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns of one sequence after the gate: [L, H, T, T]."""
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with capture(model, names) as store:
        model(tokens.to(next(model.parameters()).device))
    return torch.stack([store[n][0] for n in names]).cpu()
