"""The loop every training stage shares: AdamW, warm-up + cosine schedule, clipping,
autocast where the device supports it, progress bar, JSONL metrics, checkpoints and resume.

A stage supplies `step_fn(step) -> metrics`, which runs forward and backward for one batch;
batches are a pure function of the step, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..config import DEVICE_HELP, Device, resolve_device
from ..io import append_jsonl, atomic_path, load_checkpoint, save_checkpoint
from ..progress import progress_bar

log = logging.getLogger(__name__)


class OptimConfig(BaseModel):
    """Optimisation fields shared by the training stages."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, gt=0, description="Optimiser steps.")
    batch_size: int = Field(64, gt=0, description="Sequences per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Cosine decay floor as a fraction of lr."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    checkpoint_every: int = Field(250, gt=0, description="Steps between checkpoints.")
    log_every: int = Field(10, gt=0, description="Steps between metrics.jsonl records.")
    seed: int = Field(0, description="Seed of the initialisation, the batches and the gate noise.")
    device: Device = Field("auto", description=DEVICE_HELP)


def learning_rate(
    step: int,
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    min_ratio: float,
) -> float:
    """The one learning-rate schedule of every training loop: linear warm-up to `peak`, then
    cosine or linear decay (or none: "constant") to `min_ratio · peak` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if decay == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if decay == "linear":
        return peak * (1 - (1 - min_ratio) * progress)
    raise ValueError(f"decay must be cosine, linear or constant, got {decay!r}")


def lr_at(step: int, *, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """`learning_rate` with cosine decay, in the fields of `OptimConfig`."""
    return learning_rate(
        step, peak=lr, warmup_steps=warmup_steps, total_steps=steps, min_ratio=min_lr_ratio
    )


def batch_for(n_train: int, context_length: int, batch_tokens: int) -> int:
    """Sequences per step of a run sized in tokens: `batch_tokens` as whole sequences of the
    context, but at least 20 steps per pass over a small corpus."""
    return max(1, min(batch_tokens // context_length, n_train // 20))


def steps_for(
    n_train: int, batch_size: int, *, passes: float, min_steps: int, max_steps: int
) -> int:
    """`passes` over the `n_train` training sequences, within min..max steps."""
    return min(max_steps, max(min_steps, math.ceil(passes * n_train / batch_size)))


def size_run(
    *,
    n_train: int,
    context_length: int,
    batch_tokens: int,
    batch_size: int | None,
    steps: int | None,
    passes: float,
    min_steps: int,
    max_steps: int,
) -> tuple[int, int]:
    """(sequences per step, steps) for what the user left open (`batch_for`, `steps_for`)."""
    if batch_size is None:
        batch_size = batch_for(n_train, context_length, batch_tokens)
    if steps is None:
        steps = steps_for(
            n_train, batch_size, passes=passes, min_steps=min_steps, max_steps=max_steps
        )
    return batch_size, steps


def warmup_for(steps: int, warmup_steps: int | None) -> int:
    """The learning-rate warm-up of a run sized by `size_run`: a twentieth of it, unless given."""
    return steps // 20 if warmup_steps is None else warmup_steps


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA; nothing on CPU, where it is slower than fp32."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_training(
    *,
    model: torch.nn.Module,
    cfg: OptimConfig,
    out: Path,
    step_fn: Callable[[int], dict[str, float]],
    extra_state: dict | None = None,
    after_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """Train `model` for cfg.steps, resuming from `out/checkpoints` if a checkpoint is there.

    `extra_state` (plain numbers, e.g. a Lagrange multiplier) is saved with each checkpoint
    and restored in place on resume. `after_step(step)` runs after each update, before that
    step's checkpoint, so what it records in `extra_state` is saved with it.
    """
    extra_state = extra_state if extra_state is not None else {}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=resolve_device(cfg.device).type == "cuda",
    )
    ckpt_root, log_path = out / "checkpoints", out / "metrics.jsonl"
    start = 0
    resumed = load_checkpoint(ckpt_root)
    if resumed is not None:
        tensors, state = resumed
        model.load_state_dict(tensors)
        optimizer.load_state_dict(state["optimizer"])
        extra_state.update(state["extra"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        truncate_log(log_path, start)
        log.info("resumed %s from step %d", out, start)
    elif log_path.exists():
        log_path.unlink()

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "extra": dict(extra_state),
            "rng": torch.get_rng_state(),
        }
        save_checkpoint(ckpt_root, step, model.state_dict(), state)

    metrics: dict[str, float] = {}
    model.train()
    bar = progress_bar(
        range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, dynamic_ncols=True
    )
    timer = StepTimer(start, cfg.steps, resolve_device(cfg.device))
    for step in bar:
        timer.tick(step)
        lr = lr_at(
            step,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            steps=cfg.steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        metrics = step_fn(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            record = {"step": step, "lr": lr, "grad_norm": float(grad_norm), **metrics}
            append_jsonl(log_path, record)
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "ce", "lambda", "open")}
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    bar.close()
    model.eval()
    return metrics


class StepTimer:
    """The time estimate every training stage prints: the mean of a few steps after the first
    (which pays for warm-up allocations), times the steps left; a warning past an hour."""

    def __init__(self, start: int, steps: int, device: torch.device, measure: int = 5):
        self.begin, self.end, self.steps, self.device = start + 1, start + 1 + measure, steps, device
        self.t0 = 0.0

    def tick(self, step: int) -> None:
        if step == self.begin:
            self.t0 = time.perf_counter()
        elif step == self.end:
            per_step = (time.perf_counter() - self.t0) / (self.end - self.begin)
            left = per_step * (self.steps - step)
            text = "%.2f s per step: about %s for the %d steps left on %s"
            args = (per_step, _duration(left), self.steps - step, self.device)
            if left > 3600:
                log.warning(text + "; fewer --steps or a smaller batch make it shorter", *args)
            else:
                log.info(text, *args)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"


def truncate_log(path: Path, below: int) -> int:
    """Keep the JSONL records of `path` whose "step" is below `below` (those written before
    the checkpoint a resume starts from), so the log has each step once; a line cut short by
    a kill, or one without a step, is dropped. The file is replaced atomically. Every
    training loop resumes through this. Returns the number of records kept."""
    if not path.exists():
        return 0
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if isinstance(record, dict) and int(record["step"]) < below:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # torn or foreign
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
    return len(keep)
