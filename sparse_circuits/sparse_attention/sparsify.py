"""Sparse attention post-training (arXiv 2512.05865): make a trained model's attention sparse
while keeping its loss.

    minimise   R(θ) = mean expected open fraction of causal edges
    subject to CE(θ) ≤ τ,   τ = max((1 + rel) · CE_dense, CE_dense + abs)

    L = R + λ · CE  [+ w · KL(dense ‖ model)]     (the gradient of λ · (CE − τ): τ is a constant)

λ is set by a PI controller on log λ, driven by the constraint in units of its own slack,
aimed a margin m (`tolerance_margin`, default 0) of the slack inside τ,
    τ'_batch = τ_batch − m · (τ_batch − CE_dense,batch)
    e = clip((CE_hard − τ'_batch) / (τ'_batch − CE_dense,batch), −1, 1)
    I ← clamp(I + k_i · e),   log λ = clamp(I + k_p · EMA(e))
Measured in units of the slack, e is −1 when the sparse model matches the dense one and +1
at twice the allowed excess, whatever the CE's scale (a raw CE − τ of 0.005 nats barely moves
λ; the same slack on a CE of 3.5 is noise). The integral term finds the λ that holds CE at
τ; the proportional term, on a short EMA, damps the lag between λ and the CE it steers (a
pure integrator on a lagging signal oscillates); clipping e bounds any one step's change.

Three τ, each from the dense model's CE on the data it is compared on:
    τ_batch       each training batch's, from the dense CE on that same batch: drives λ (a
                  held-out τ would compare a memorised training stream with unseen text)
    τ_validation  on the validation sequences: chooses the weights kept (below); at each
                  check after the anneal, the error of the CE excess over dense less one
                  standard error over sequences (`excess_over_dense`) joins λ's input until
                  the next: e = max(e_batch, e_validation). A small training set is
                  memorised over many passes, and its batches then meet the constraint
                  while unseen text does not; a task's few wrong answers on a near-zero CE
                  stay noise
    τ_held-out    on the reported held-out sequences: `tau` and `within_tolerance` in
                  metrics.json, beside the held-out `loss` they judge

The gate offset b starts high (gates open) and is annealed to 0. The schedules are pure
functions of the step, and the controller's state is checkpointed, so a killed run resumes
exactly. The run is sized in tokens, not sequences: `batch_tokens` becomes sequences of the
model's context, steps follow the data's size, and warm-up, anneal and the checks of the
weights kept are fractions of the steps (`plan_run`), printed with a time estimate.

λ can overshoot in either direction, so after the anneal, every `select_every` steps the
weights are checked on the validation sequences (held out, and apart from the reported
ones), and the sparsest weights whose deterministic-gate CE keeps below τ_validation less
the same margin there (and, on tasks, whose accuracy stays within `accuracy_tolerance` of
dense) are the ones saved. Weights chosen at the very edge of a noisy validation set pass
the held-out check only by chance; a margin above 0 guards that, at a cost in sparsity
(keeping only weights one standard error inside τ left a 100 kB corpus's run at its first
candidate, 15 % of pairs open).

The run is split like `clt/train.py`: `sparsify` claims the output and drives the shared loop
(`training.run_training`) over a `_Sparsifier`, whose phases are `__init__` (model, data,
dense baselines), `step` (one update, from `constraint_loss` and `update_lambda`), `check`
(the validation check and the weights kept) and `finish` (final weights, metrics, the model dir).
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
from ..io import claim_run_dir, load_tensors, read_jsonl, save_tensors, write_json
from .connectivity import evaluate
from .data import DataSpec, TokenData, load_token_data, save_data_spec
from .hooks import capture
from .model import GateConfig, GatedImpl, ModelOutput, Transformer, causal_pair_count
from .modeldir import load_model, save_model
from .plots import plot_attention_patterns, plot_training_curves
from .training import OptimConfig, autocast, batch_for, run_training, steps_for, warmup_for

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
    steps: int | None = Field(
        None,
        gt=0,
        description="Optimiser steps; default: 30 passes over the training tokens, within 300-1000.",
    )
    batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens per step, as whole sequences of the context length; default 2048 "
        "on CPU, 16384 on an accelerator.",
    )
    batch_size: int | None = Field(
        None, gt=0, description="Sequences per step; overrides --batch-tokens."
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="The biggest lever: too high and the noisy-gate CE spikes. Default: 4e-4, "
        "less by the square root of the tokens a step gives up to the cap of 64 sequences.",
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear learning-rate warm-up; default: a twentieth of the steps."
    )
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: constant after warm-up.")
    gate_offset_start: float = Field(3.0, description="Gate offset b at step 0 (gates start open).")
    gate_offset_anneal: float = Field(
        0.3, gt=0, le=1, description="Fraction of steps over which b goes to 0."
    )
    lambda_init: float = Field(1.0, gt=0, description="Initial Lagrange multiplier on CE − τ.")
    lambda_ki: float = Field(
        0.02, gt=0, description="Integral gain: change of log λ per step at a full violation."
    )
    lambda_kp: float = Field(
        1.0, ge=0, description="Proportional gain on the smoothed violation (damping)."
    )
    lambda_ema: float = Field(
        0.9, ge=0, lt=1, description="EMA decay of the violation the proportional term sees."
    )
    lambda_validation: bool = Field(
        True,
        description="λ also answers the validation checks: the larger of a batch's constraint "
        "error and the last check's (its excess over dense less one standard error) drives it "
        "(a small training set is memorised, and its batches meet the constraint while unseen "
        "text does not).",
    )
    lambda_min: float = Field(1e-3, gt=0, description="Lower clamp of λ.")
    lambda_max: float = Field(1e4, gt=0, description="Upper clamp of λ.")
    tolerance_rel: float = Field(0.02, ge=0, description="τ = max((1+rel)·CE_dense, CE_dense+abs).")
    tolerance_abs: float = Field(
        0.005, ge=0, description="Absolute floor of the tolerance, in nats."
    )
    tolerance_margin: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the slack (τ − dense CE) that λ holds the training CE below τ, and "
        "the kept weights their validation CE below τ_validation (weights at τ's very edge pass "
        "the held-out check only by chance; 0.25 cost the toy much of its sparsity).",
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
    select_sequences: int | None = Field(
        None,
        ge=0,
        description="Held-out sequences, apart from the reported ones, for choosing the final "
        "weights; default: what the reported ones leave, up to 32768 tokens' worth (at least 128).",
    )
    select_every: int | None = Field(
        None,
        gt=0,
        description="Steps between checks of a candidate for the final weights; default: "
        "30 checks over the run.",
    )
    figure_index: int = Field(
        0, ge=0, description="Held-out sequence drawn in attention_patterns.png."
    )
    gated_impl: GatedImpl = Field(
        "tiled",
        description="Gated attention: 'tiled' (one operation, no T x T tensor, the same results) "
        "or 'reference' (materialises the pattern).",
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


def with_margin(tau: float, dense_ce: float, margin: float) -> float:
    """τ moved inside the tolerance by `margin` of its slack τ − CE_dense."""
    return tau - margin * (tau - dense_ce)


def constraint_error(hard_ce: float, dense_ce: float, tau: float, margin: float = 0.0) -> float:
    """CE_hard − τ' in units of the slack τ' − CE_dense, with τ' = τ less `margin` of the slack,
    clipped to [−1, 1]: −1 when the sparse model is as good as the dense one, 0 on the
    constraint, +1 at twice the allowed excess."""
    target = with_margin(tau, dense_ce, margin)
    slack = max(target - dense_ce, 1e-12)
    return max(-1.0, min(1.0, (hard_ce - target) / slack))


def update_lambda(
    integral: float, error_ema: float, error: float, cfg: SparsifyConfig
) -> tuple[float, float, float]:
    """One PI step on log λ: (λ, integral, error EMA). The integral is clamped to λ's range,
    so it never winds up beyond what λ can express."""
    lo, hi = math.log(cfg.lambda_min), math.log(cfg.lambda_max)
    integral = min(hi, max(lo, integral + cfg.lambda_ki * error))
    error_ema = cfg.lambda_ema * error_ema + (1 - cfg.lambda_ema) * error
    log_lambda = min(hi, max(lo, integral + cfg.lambda_kp * error_ema))
    return math.exp(log_lambda), integral, error_ema


def excess_over_dense(check: dict, dense: dict) -> tuple[float, float]:
    """The sparse model's CE excess over the dense one on the same sequences (per token) and
    its standard error over sequences. One sequence gone wrong on a near-zero CE (a task's
    wrong answer) has a standard error as large as its excess; every sequence a little worse
    (memorised training text) has a small one."""
    diff = check["ce_per_sequence"] - dense["ce_per_sequence"]  # per sequence, summed CE
    tokens = float(dense["scored_per_sequence"].sum())
    n = diff.numel()
    noise = float(diff.std()) * math.sqrt(n) / tokens if n > 1 else 0.0
    return float(diff.sum()) / tokens, noise


SELECT_TOKENS, MIN_SELECT_SEQUENCES = 32768, 128


def split_heldout_sequences(
    n_held: int, context_length: int, cfg: SparsifyConfig
) -> tuple[int, int]:
    """(reported, validation) sequences of a held-out set of `n_held`. The validation
    sequences choose the weights kept and hold the accuracy bar, so they take what the
    reported ones leave, up to SELECT_TOKENS tokens (on a task of a few scored tokens per
    sequence, 128 sequences cannot tell 0.5 % accuracy from noise); a small held-out set is
    shared half and half, so the weights are chosen apart from the reported sequences even then."""
    wanted = cfg.select_sequences
    if wanted is None:
        wanted = max(MIN_SELECT_SEQUENCES, SELECT_TOKENS // context_length)
    n_eval = min(cfg.eval_sequences, n_held - min(wanted, MIN_SELECT_SEQUENCES, n_held // 2))
    return n_eval, min(wanted, n_held - n_eval)


CPU_BATCH_TOKENS, ACCELERATOR_BATCH_TOKENS = 2048, 16384
PASSES, MIN_STEPS, MAX_STEPS = 30, 300, 1000
MAX_BATCH_SEQUENCES = 64
LR = 4e-4


def plan_run(
    cfg: SparsifyConfig, n_train: int, context_length: int, device: torch.device
) -> SparsifyConfig:
    """The config with every size the user left open filled in from the data and the device:
    sequences per step from the token budget and the context, steps from the data's size
    (PASSES passes, within MIN_STEPS..MAX_STEPS: the controller needs a few hundred steps to
    settle, and more rarely pays), warm-up and the checks of the kept weights as fractions of
    the steps (the anneal already is one, `gate_offset_anneal`).

    At a short context the budget would buy hundreds of sequences a step. What sparsity a run
    reaches is set by its updates, not its tokens (moving a circuit onto fewer heads takes
    many small steps), so a step takes at most MAX_BATCH_SEQUENCES and the cap on steps
    grows in proportion, up to 4 × MAX_STEPS: the run reads the same tokens in more updates.
    The checks of the kept weights stay as many steps apart as in a run of MAX_STEPS (a check's
    violation holds λ up until the next).
    Such a step takes a learning rate smaller by the square root of the tokens it gave up (its
    gradient is noisier: at 4e-4 and 576 tokens a step, the addition toy's CE stayed above τ
    for 2,000 steps of one seed's run, and λ wound up to 5,000)."""
    batch_tokens = cfg.batch_tokens or (
        CPU_BATCH_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_TOKENS
    )
    uncapped = batch_for(n_train, context_length, batch_tokens)
    batch_size = cfg.batch_size or min(uncapped, MAX_BATCH_SEQUENCES)
    # where the cap binds: more steps, a smaller learning rate, checks as many steps apart
    more_steps, lr = 1.0, LR
    if cfg.batch_size is None and batch_size < uncapped:
        more_steps = min(4.0, batch_tokens / (batch_size * context_length))
        lr = LR * math.sqrt(batch_size * context_length / batch_tokens)
    steps = cfg.steps or steps_for(
        n_train, batch_size, passes=PASSES, min_steps=MIN_STEPS,
        max_steps=int(MAX_STEPS * more_steps),
    )  # fmt: skip
    return cfg.model_copy(
        update={
            "batch_size": batch_size,
            "steps": steps,
            "lr": cfg.lr or lr,
            "warmup_steps": warmup_for(steps, cfg.warmup_steps),
            "select_every": cfg.select_every or max(1, int(steps / (30 * more_steps))),
        }
    )


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


def constraint_loss(
    o: ModelOutput, dense: ModelOutput, lam: float, distill_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Lagrangian of one batch: (L, R, KL) with R the mean expected open fraction of the
    noisy-gate output `o`, L = R + λ · CE [+ w · KL(dense ‖ model) per token]."""
    open_fraction = torch.stack([s.expected_open for s in o.gate_stats]).mean()  # over L,B,H
    loss = open_fraction + lam * o.loss
    kl = torch.zeros((), device=o.logits.device)
    if distill_weight > 0:
        kl = (
            F.kl_div(
                o.logits.float().log_softmax(-1),
                dense.logits.float().log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )
            / o.logits.shape[1]
        )
        loss = loss + distill_weight * kl
    return loss, open_fraction, kl


def is_better_candidate(
    check: dict[str, float],
    *,
    tau: float,
    best_connectivity: float,
    dense_accuracy: float | None = None,
    accuracy_tolerance: float = 0.0,
) -> bool:
    """Whether weights that scored `check` (loss, connectivity[, accuracy]) on the validation
    sequences replace the best kept so far: within τ, accurate enough on tasks, and sparser."""
    accurate = dense_accuracy is None or check["accuracy"] >= dense_accuracy - accuracy_tolerance
    return check["loss"] <= tau and accurate and check["connectivity"] < best_connectivity


def sparsify(cfg: SparsifyConfig) -> Path:
    """Post-train `cfg.model` into a sparsified model dir at `cfg.out` (resumed if it holds
    this run); return the dir."""
    device = resolve_device(cfg.device)
    out = claim_run_dir(cfg.out, "sparsify", cfg.model_dump(mode="json", exclude={"device"}))
    torch.manual_seed(cfg.seed)
    run = _Sparsifier(cfg, out, device)
    run_training(
        model=run.trainee,
        cfg=run.cfg,
        out=out,
        step_fn=run.step,
        extra_state=run.state,
        after_step=run.check,
        desc=f"sparsify {out.name}",
    )
    return run.finish()


class _Sparsifier:
    """One post-training run: the model and its dense reference, the data, the held-out and
    validation baselines, and λ's state (checkpointed with the weights)."""

    def __init__(self, cfg: SparsifyConfig, out: Path, device: torch.device):
        self.cfg, self.out, self.device = cfg, out, device
        self.model, self.tokenizer = load_model(cfg.model, device)
        self.model.set_gated_impl(cfg.gated_impl)
        if self.model.cfg.gate is not None:
            raise StageError(
                f"{cfg.model} is already sparsified; post-train the dense model it came from"
            )
        self.data = data = _data_for(cfg)
        if data.context_length > self.model.cfg.context_length:
            raise StageError(
                f"context length {data.context_length} is longer than the model's "
                f"{self.model.cfg.context_length}"
            )
        self.cfg = cfg = plan_run(cfg, data.train_inputs.shape[0], data.context_length, device)
        log.info(
            "plan: %d tokens per step (%d sequences of %d), %d steps (%.1f passes over %d "
            "training sequences); learning rate %.2g, warm-up %d steps, gate offset annealed over %d, "
            "the weights kept checked every %d steps after that",
            cfg.batch_size * data.context_length, cfg.batch_size, data.context_length, cfg.steps,
            cfg.steps * cfg.batch_size / data.train_inputs.shape[0], data.train_inputs.shape[0],
            cfg.lr, cfg.warmup_steps, int(cfg.gate_offset_anneal * cfg.steps), cfg.select_every,
        )  # fmt: skip
        self.task = data.spec.task
        n_eval, n_select = split_heldout_sequences(
            data.heldout_inputs.shape[0], data.context_length, cfg
        )
        self.held = (data.heldout_inputs[:n_eval], data.heldout_targets[:n_eval])
        end = n_eval + n_select
        self.val = (data.heldout_inputs[n_eval:end], data.heldout_targets[n_eval:end])
        self.anneal_steps = int(cfg.gate_offset_anneal * cfg.steps)
        self.best_path = out / "best.safetensors"

        self.model.set_gate("off")
        self.dense = self._evaluate(*self.held)
        self.tau = tolerance(self.dense["loss"], cfg.tolerance_rel, cfg.tolerance_abs)
        log.info(
            "dense CE on the held-out set %.4f: τ_held-out = %.4f", self.dense["loss"], self.tau
        )
        self.dense_val = self._evaluate(*self.val, per_sequence=True) if len(self.val[0]) else {}
        self.tau_val = (
            tolerance(self.dense_val["loss"], cfg.tolerance_rel, cfg.tolerance_abs)
            if self.dense_val
            else self.tau
        )
        self.tau_val_kept = with_margin(
            self.tau_val, self.dense_val.get("loss", self.dense["loss"]), cfg.tolerance_margin
        )
        if self.dense_val:
            log.info(
                "dense CE on the validation set %.4f: τ_validation = %.4f; the weights kept stay "
                "below %.4f (λ follows each training batch against its own dense CE, and the "
                "validation checks after the anneal)",
                self.dense_val["loss"],
                self.tau_val,
                self.tau_val_kept,
            )
        held_x = self.held[0]
        self.sample = held_x[cfg.figure_index % held_x.shape[0]].unsqueeze(0)
        self.dense_patterns = _patterns(self.model, self.sample)

        self.trainee: torch.nn.Module = (
            wrap_lora(self.model, cfg.lora_rank) if cfg.lora_rank else self.model
        )
        self.dense_forward = dense_reference(self.model, self.trainee, lora=bool(cfg.lora_rank))
        self.state = {
            "lambda": cfg.lambda_init,
            "integral": math.log(cfg.lambda_init),
            "error_ema": 0.0,
            "validation_error": -1.0,  # the last validation check's, beyond its noise
            "best_step": -1,
            "best_connectivity": 2.0,
        }

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor, **kw) -> dict:
        return evaluate(self.model, x, y, batch_size=self.cfg.eval_batch_size, task=self.task, **kw)

    # ------------------------------------------------------------------ the phases

    def step(self, step: int) -> dict[str, float]:
        """Forward and backward of one batch, then λ's update; the metrics line."""
        cfg, model, trainee, state = self.cfg, self.model, self.trainee, self.state
        offset = gate_offset_at(step, start=cfg.gate_offset_start, anneal_steps=self.anneal_steps)
        x, y = self.data.batch(step, cfg.batch_size, cfg.seed)
        x, y = x.to(self.device), y.to(self.device)
        with autocast(self.device):
            dense_out = self.dense_forward(x, y)
            model.set_gate("stochastic", offset)
            o = trainee(x, y)
            loss, open_fraction, kl = constraint_loss(
                o, dense_out, state["lambda"], cfg.distill_weight
            )
        loss.backward()
        # λ follows the deterministic-gate CE, the one inference has: the noisy-gate CE sits
        # above τ by the noise alone, which would ratchet λ to its clamp and stall sparsity.
        with torch.no_grad():
            model.set_gate("hard", offset)
            hard_ce = trainee(x, y).loss.item()
        lam_used, dense_ce = state["lambda"], dense_out.loss.item()
        batch_tau = tolerance(dense_ce, cfg.tolerance_rel, cfg.tolerance_abs)
        error = constraint_error(hard_ce, dense_ce, batch_tau, cfg.tolerance_margin)
        # A small training set is memorised: its batches meet the constraint while unseen text
        # does not. The last validation check then stands above the batch, and drives λ.
        error = max(error, state["validation_error"])
        state["lambda"], state["integral"], state["error_ema"] = update_lambda(
            state["integral"], state["error_ema"], error, cfg
        )
        T = x.shape[1]
        hard_edges = torch.stack([s.open_edges for s in o.gate_stats]).double()  # L,B,H
        return {
            "ce": o.loss.item(),
            "hard_ce": hard_ce,
            "dense_ce": dense_ce,
            "tau": batch_tau,
            "lambda": lam_used,
            "constraint_error": error,
            "validation_error": state["validation_error"],
            "gate_offset": offset,
            "open": open_fraction.item(),
            "hard_connectivity": (hard_edges / causal_pair_count(T)).mean().item(),
            "keys_per_query": (hard_edges / T).mean().item(),
            "kl": kl.item(),
        }

    def check(self, step: int) -> None:
        """Every `select_every` steps after the anneal, the validation sequences judge the
        deterministic-gate model: their constraint error joins λ's input, and the sparsest
        weights within τ_validation are kept."""
        cfg, state = self.cfg, self.state
        # not while b anneals: the CE overshoots then, and recovers
        if len(self.val[0]) == 0 or step < self.anneal_steps or (step + 1) % cfg.select_every:
            return
        self.model.set_gate("hard", 0.0)
        check = self._evaluate(*self.val, per_sequence=True)
        if cfg.lambda_validation:  # what of the excess is clear of noise drives λ
            excess, noise = excess_over_dense(check, self.dense_val)
            state["validation_error"] = constraint_error(
                self.dense_val["loss"] + excess - noise,
                self.dense_val["loss"], self.tau_val, cfg.tolerance_margin,
            )  # fmt: skip
        if is_better_candidate(
            check, tau=self.tau_val_kept, best_connectivity=state["best_connectivity"],
            dense_accuracy=self.dense_val.get("accuracy") if self.task is not None else None,
            accuracy_tolerance=cfg.accuracy_tolerance,
        ):  # fmt: skip
            state_dict = {
                k: v.clone() for k, v in self.trainee.state_dict().items()
            }  # tied weights
            save_tensors(self.best_path, state_dict)
            state["best_step"], state["best_connectivity"] = step + 1, check["connectivity"]

    def finish(self) -> Path:
        """The kept weights, merged and hard-gated; held-out metrics; the model dir with its
        data spec and picture, metrics.json last (it marks the run complete)."""
        cfg, state, out = self.cfg, self.state, self.out
        if state["best_step"] >= 0:
            self.trainee.load_state_dict(load_tensors(self.best_path))
            log.info(
                "final weights: step %d (validation connectivity %.4f)",
                state["best_step"],
                state["best_connectivity"],
            )
        elif len(self.val[0]):
            log.warning(
                "no checkpoint kept the validation CE below %.4f (τ_validation less the margin): the final "
                "weights are saved, but they may miss the tolerance; rerun with more steps",
                self.tau_val_kept,
            )
        model = self.trainee.merge_and_unload() if cfg.lora_rank else self.model
        model.cfg = model.cfg.model_copy(update={"gate": GateConfig(offset=0.0)})
        model.set_gate("hard", 0.0)
        sparse = evaluate(model, *self.held, batch_size=cfg.eval_batch_size, task=self.task)
        metrics = {
            "dense_loss": self.dense["loss"],
            "tau": self.tau,
            **sparse,
            "lambda": state["lambda"],
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "selected_step": state["best_step"] if state["best_step"] >= 0 else cfg.steps,
            "within_tolerance": sparse["loss"] <= self.tau,
        }
        if self.task is not None:
            metrics["dense_accuracy"] = self.dense["accuracy"]
        save_model(model, out, self.tokenizer or self.data.tokenizer)  # metrics.json last
        save_data_spec(out, self.data.spec)
        plot_attention_patterns(
            self.dense_patterns,
            _patterns(model, self.sample),
            out / "attention_patterns.png",
            tokens=[self.data.tokenizer.id_to_token(int(t)) for t in self.sample[0]],
        )
        plot_training_curves(
            {out.name: read_jsonl(out / "metrics.jsonl")},
            out / "training_curves.png",
            anneal_end=self.anneal_steps,
        )
        write_json(out / "metrics.json", metrics)
        log.info(
            "sparse: held-out CE %.4f (dense %.4f, τ_held-out %.4f), connectivity %.4f, keys/query %.3f",
            sparse["loss"],
            self.dense["loss"],
            self.tau,
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
