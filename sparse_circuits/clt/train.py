"""Train a CLT on an activation store: `sparse-circuits train-clt --activations A.zarr --out C`.

One loop serves one process and `torchrun` (DDP) alike: under torchrun each rank reads its
own share of every global batch, gradients are averaged by DDP, and the dead-feature
counters are reduced over ranks so every rank sees the same global counts.

Loss per step: nmse + λ_S(step)·sparsity + λ_P·preact + α·auxk (terms in `model.py`), with
AdamW, a warm-up + cosine/linear learning-rate schedule (the one in
`sparse_attention/training.py`) and λ_S's warm-up both pure functions of the step. λ_S
defaults to 0 for TopK/BatchTopK, whose k sets the sparsity. BatchTopK under DDP selects over
the global batch (`model.py`).

Defaults that converge on any store (`resolve_schedule`): the run's length follows the
dictionary, tokens_per_feature tokens for each of its L × F features, read as one pass over a
large store or several (at most max_passes) over a small one; the learning-rate warm-up, λ_S's
warm-up and the dead-feature window are fractions of that length. A run with fewer steps than
its dictionary needs (a --steps too small, a store too small) says so in a warning.

TopK/BatchTopK CLTs are saved as JumpReLU (the circuit-tracer layout has no TopK): the
thresholds are calibrated on held-out batches, the ones after the last trained batch (a
one-pass run holds them back from training; a run of several passes reads rows it has seen),
read by every rank; `metrics.json`'s `fvu` and `l0` are the saved JumpReLU model's on those
batches, and the TopK model's training-window figures stay under `fvu_before_conversion`,
`l0_before_conversion`, ....

A checkpoint holds the weights, optimiser state, step and counters;
a rerun after a kill resumes there, reading its data from batch `step` on (no replay).

The output dir is the CLT dir (`cltdir.py`, normalisation folded in) plus `metrics.json`
(`fvu`, `l0`, ...), `metrics.jsonl` (one line per logged step), `checkpoints/` and `run.json`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from pydantic import ConfigDict, Field, model_validator
from torch.nn.parallel import DistributedDataParallel

from ..config import Device, resolve_device
from ..errors import StageError
from ..io import (
    append_jsonl,
    claim_run_dir,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from ..progress import progress_bar
from ..sparse_attention.training import learning_rate, truncate_log
from .cltdir import load_clt, save_clt
from .harvest import StoreAccess
from .loader import ActivationLoader, open_store
from .model import (
    Activation,
    CLTConfig,
    CrossLayerTranscoder,
    jumprelu_thresholds,
    sparsity_coefficient,
)

__all__ = ["TrainCLTConfig", "train_clt", "learning_rate", "load_clt", "save_clt"]

log = logging.getLogger(__name__)

STAGE = "train-clt"
# Fields that change how a run is executed, not what it computes: a resumed run may differ in them.
# Where the store is reached (and its credentials) is no part of a run's identity, and never saved.
OPERATIONAL_FIELDS = {
    "device",
    "resume",
    "log_every",
    "endpoint_url",
    "storage_options",
    "checkpoint_minutes",
}

# batches(start) -> this rank's (inputs, targets) of global batches start, start + 1, ...
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]

# Defaults under which a run with every flag left out converges on a small store (the addition
# toy's 72k rows: many passes) and a large one (one pass) alike; README "train-clt defaults".
# BatchTopK fixes L0 at k whatever the store, where a JumpReLU's L0 follows λ_S and the data.
DEFAULT_EXPANSION = 8  # d_features = 8 × d_model, on a store that can train it
MIN_EXPANSION = 2  # ... halved on a smaller store, down to this
DEFAULT_K = 14
LR_WARMUP_FRACTION, LR_WARMUP_MAX = 0.05, 1000
SPARSITY_WARMUP_FRACTION = 0.8
DEAD_TOKENS_FRACTION, DEAD_TOKENS_MIN, DEAD_TOKENS_MAX = 0.1, 100_000, 10_000_000


class TrainCLTConfig(StoreAccess):
    """Everything one CLT training run needs; n_layers and d_model come from the store."""

    model_config = ConfigDict(extra="forbid")
    activations: str = Field(
        description="Activation store written by `harvest`: a local path or s3:// URL (with --endpoint-url; "
        "credentials in storage_options, through --config or the environment)."
    )
    out: Path = Field(description="Output CLT directory (resumed if it holds this same run).")
    # ---- the CLT (see CLTConfig)
    d_features: int | None = Field(
        None,
        gt=0,
        description=f"Features per layer; default {DEFAULT_EXPANSION} × d_model, halved (to "
        f"{MIN_EXPANSION} × at least) while the store is too small to train that many.",
    )
    activation: Activation = Field(
        "batchtopk",
        description="relu, jumprelu, topk or batchtopk (k sets the L0 on any store; saved as JumpReLU).",
    )
    k: int | None = Field(
        None,
        gt=0,
        description=f"Active features per token and layer (topk, batchtopk); default {DEFAULT_K} "
        "(at most d_features / 8).",
    )
    batchtopk_scope: Literal["layer", "all"] = Field(
        "layer", description="batchtopk over each layer or all layers."
    )
    cross_layer: bool = Field(
        True, description="Decoders to all later layers; --no-cross-layer: per-layer transcoder."
    )
    bandwidth: float = Field(0.05, gt=0, description="JumpReLU straight-through kernel width.")
    initial_threshold: float = Field(0.1, gt=0, description="JumpReLU threshold at initialisation.")
    sparsity_c: float = Field(
        4.0, gt=0, description="c in the tanh(c · a · ||W_dec||) sparsity penalty."
    )
    k_aux: int | None = Field(
        None, gt=0, description="Dead features per token and layer in AuxK; default d_model // 2."
    )
    # ---- optimisation
    batch_size: int = Field(1024, gt=0, description="Tokens per step, over all ranks.")
    steps: int | None = Field(
        None,
        gt=0,
        description="Optimiser steps; default: tokens_per_feature tokens for each of the L × F features, "
        "at least one pass over the store and at most max_passes.",
    )
    tokens_per_feature: int = Field(
        400,
        gt=0,
        description="Default --steps: training tokens per feature of the dictionary that a run needs to "
        "converge; a run given fewer warns.",
    )
    max_passes: float = Field(
        20.0,
        ge=1,
        description="Default --steps: passes over a small store at most (repeating rows beyond this "
        "overfits more than it converges).",
    )
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    lr_warmup_steps: int | None = Field(
        None,
        ge=0,
        description=f"Linear learning-rate warm-up; default {LR_WARMUP_FRACTION:.0%} of the steps, "
        f"at most {LR_WARMUP_MAX}.",
    )
    lr_decay: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after the warm-up."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )
    clip_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip.")
    sparsity_coefficient: float | None = Field(
        None,
        ge=0,
        description="Final λ_S of the tanh sparsity penalty; default 1e-3 for relu/jumprelu and 0 for "
        "topk/batchtopk, whose k sets the sparsity.",
    )
    sparsity_warmup_steps: int | None = Field(
        None,
        ge=0,
        description=f"Steps over which λ_S ramps from 0; default {SPARSITY_WARMUP_FRACTION:.0%} of the "
        "steps, so the rest of the run settles at the final λ_S.",
    )
    preact_coefficient: float | None = Field(
        None,
        ge=0,
        description="λ_P of the pre-activation (dead-feature) loss; default 3e-6 for relu/jumprelu "
        "and 0 for topk/batchtopk, whose dead features AuxK revives.",
    )
    auxk_coefficient: float = Field(
        1 / 32, ge=0, description="α of the AuxK loss (topk, batchtopk)."
    )
    dead_feature_tokens: int | None = Field(
        None,
        gt=0,
        description="A feature silent this many tokens is dead (AuxK revives it); default a tenth of the "
        f"run's tokens, within [{DEAD_TOKENS_MIN:,}, {DEAD_TOKENS_MAX:,}].",
    )
    calibration_tokens: int = Field(
        16384,
        gt=0,
        description="topk/batchtopk: held-out tokens (the batches after the trained ones) for the saved "
        "JumpReLU's thresholds and its fvu/l0; a one-pass run holds back at most a tenth of its batches.",
    )
    init_fire_rate: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Encoder bias set so each feature fires this often at first (topk: at least 2k/F).",
    )
    # ---- bookkeeping
    eval_steps: int = Field(
        50,
        gt=0,
        description="metrics.json averages the last this-many steps (each batch scored before its update).",
    )
    seed: int = Field(0, description="Seed of the initialisation and the loader's shuffle.")
    checkpoint_every: int = Field(500, gt=0, description="Steps between checkpoints.")
    checkpoint_minutes: float = Field(
        5.0, gt=0, description="Also checkpoint once this many minutes passed since the last one."
    )
    log_every: int = Field(1, gt=0, description="Steps between metrics.jsonl lines.")
    device: Device = Field(
        "auto",
        description="auto (cuda if present), cpu, cuda, cuda:N; torchrun ranks use cuda:LOCAL_RANK.",
    )
    autocast: bool = Field(True, description="bfloat16 autocast on CUDA (ignored on CPU).")
    resume: bool = Field(
        True, description="Resume this run from its latest checkpoint if --out holds it."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainCLTConfig:
        if self.sparsity_coefficient is None:
            self.sparsity_coefficient = 0.0 if self.converts else 1e-3
        if self.preact_coefficient is None:
            self.preact_coefficient = 0.0 if self.converts else 3e-6
        return self

    @property
    def converts(self) -> bool:
        """TopK/BatchTopK: saved as JumpReLU after calibration on held-out batches."""
        return self.activation in ("topk", "batchtopk")

    def calibration_batches(self) -> int:
        return math.ceil(self.calibration_tokens / self.batch_size)

    def clt_config(self, n_layers: int, d_model: int, rows: int | None = None) -> CLTConfig:
        """The CLT to train. Left out, d_features is DEFAULT_EXPANSION × d_model, halved (down
        to MIN_EXPANSION × d_model) while a store of `rows` read max_passes times cannot give
        each of the L × F features its tokens_per_feature tokens."""
        d_features = self.d_features
        if d_features is None:
            d_features = DEFAULT_EXPANSION * d_model
            fed = None if rows is None else self.max_passes * rows
            while fed and d_features > MIN_EXPANSION * d_model and (
                self.tokens_per_feature * n_layers * d_features > fed
            ):
                d_features //= 2
        k = self.k
        if k is None and self.converts:  # a small dictionary keeps its features sparse
            k = max(1, min(DEFAULT_K, d_features // 8))
        return CLTConfig(
            n_layers=n_layers,
            d_model=d_model,
            d_features=d_features,
            activation=self.activation,
            k=k,
            batchtopk_scope=self.batchtopk_scope,
            cross_layer=self.cross_layer,
            bandwidth=self.bandwidth,
            initial_threshold=self.initial_threshold,
            sparsity_c=self.sparsity_c,
            k_aux=self.k_aux,
        )


# ----------------------------------------------------------------------------- the schedule


class Schedule(NamedTuple):
    """A run's size-dependent settings, resolved once; the per-step schedules are pure
    functions of the step and these."""

    steps: int
    lr_warmup_steps: int
    sparsity_warmup_steps: int
    dead_feature_tokens: int
    needed_steps: int  # what the dictionary needs to converge (`needed_steps`)


def needed_steps(config: TrainCLTConfig, n_features: int) -> int:
    """Steps that a dictionary of `n_features` (L × F) needs: tokens_per_feature tokens each."""
    return math.ceil(config.tokens_per_feature * n_features / config.batch_size)


def default_steps(config: TrainCLTConfig, *, n_features: int, batches_per_pass: int) -> int:
    """--steps left out: what the dictionary needs, but at least one pass over the store (a
    large store is read once, whole) and at most max_passes (a small one is read repeatedly)."""
    most = max(batches_per_pass, math.floor(config.max_passes * batches_per_pass))
    return max(batches_per_pass, min(needed_steps(config, n_features), most))


def resolve_schedule(config: TrainCLTConfig, steps: int, n_features: int) -> Schedule:
    """The warm-ups and the dead-feature window of a `steps`-step run: fractions of the run
    unless set, so a short run is not all warm-up and a long one not penalised from its start."""

    def given_or(value: int | None, default: int) -> int:
        return default if value is None else value

    tokens = steps * config.batch_size
    dead = min(DEAD_TOKENS_MAX, max(DEAD_TOKENS_MIN, round(DEAD_TOKENS_FRACTION * tokens)))
    return Schedule(
        steps=steps,
        lr_warmup_steps=given_or(
            config.lr_warmup_steps, min(LR_WARMUP_MAX, max(1, round(LR_WARMUP_FRACTION * steps)))
        ),
        sparsity_warmup_steps=given_or(
            config.sparsity_warmup_steps, round(SPARSITY_WARMUP_FRACTION * steps)
        ),
        dead_feature_tokens=given_or(config.dead_feature_tokens, dead),
        needed_steps=needed_steps(config, n_features),
    )


def warn_if_too_short(
    config: TrainCLTConfig, schedule: Schedule, n_features: int, rows: int | None = None
) -> bool:
    """Log a warning, and return True, when the run has fewer steps than its dictionary needs
    (by more than the tenth a one-pass run may hold back to calibrate on)."""
    if schedule.steps >= 0.9 * schedule.needed_steps:
        return False
    if config.steps is not None:
        why, fix = f"--steps {config.steps}", "leave --steps out or raise it"
    else:
        held = f"{rows:,} rows" if rows is not None else "its rows"
        why = f"a store of {held} read at most {config.max_passes:g} times"
        fix = "harvest more rows (harvest --tokens) or take a smaller --d-features"
    log.warning(
        "train-clt: the run is too short to converge (%s): %d steps give %.0f tokens to each of "
        "%d features, where about %d (%d steps) are needed; expect a high FVU or many dead "
        "features; %s",
        why,
        schedule.steps,
        schedule.steps * config.batch_size / n_features,
        n_features,
        config.tokens_per_feature,
        schedule.needed_steps,
        fix,
    )
    return True


# ----------------------------------------------------------------------------- distributed


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


@contextlib.contextmanager
def distributed(device: torch.device):
    """Join the torchrun process group when WORLD_SIZE > 1; yield (rank, world_size)."""
    rank, world, _ = dist_env()
    owned = world > 1 and not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        yield rank, world
        finished = True
    finally:
        if owned:
            if finished:  # no rank closes its connections while another still uses them
                dist.barrier()
            dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, world: int, op=None) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def update_dead_counters(
    tokens_since_fired: torch.Tensor, fired: torch.Tensor, tokens: int, world: int
) -> torch.Tensor:
    """Tokens since each feature (L,F) last fired on any rank, after a step of `tokens` global tokens."""
    fired_anywhere = _all_reduce(fired.to(torch.int32), world) > 0
    return torch.where(
        fired_anywhere, torch.zeros_like(tokens_since_fired), tokens_since_fired + tokens
    )


# ----------------------------------------------------------------------------- the loop


def train_clt(config: TrainCLTConfig) -> Path:
    """Train on the store at `config.activations`; return the CLT dir."""
    rank, world, local_rank = dist_env()
    if config.batch_size % world:
        raise StageError(f"batch_size={config.batch_size} is not a multiple of the {world} ranks")
    device = resolve_device(config.device, local_rank)
    local_batch = config.batch_size // world
    loader_kwargs = dict(
        seed=config.seed, rank=rank, world_size=world, normalize=True, drop_last=True, device=device
    )
    loader_kwargs["storage_options"] = config.fsspec_options()
    n_calibration = config.calibration_batches() if config.converts else 0
    with distributed(device):
        probe = ActivationLoader(config.activations, local_batch, **loader_kwargs)
        if len(probe) == 0:  # not one batch: a fixed step count would wait for rows forever
            raise StageError(
                f"{config.activations} holds {probe.n_rows} rows: not one batch of {config.batch_size}"
            )
        n_layers, d_model = probe.stats["inputs_mean"].shape
        n_features = n_layers * config.clt_config(n_layers, d_model, probe.n_rows).d_features
        # Ranks may hold different row counts, so the fewest batches make a pass.
        per_pass = int(
            _all_reduce(torch.tensor(len(probe), device=device), world, dist.ReduceOp.MIN)
        )
        steps = config.steps or default_steps(
            config, n_features=n_features, batches_per_pass=per_pass
        )
        if config.steps or steps > per_pass:  # the loader cycles over the store
            loader_kwargs["epochs"] = None
        else:  # one pass over a store large enough for the dictionary
            loader_kwargs["epochs"] = 1
            if n_calibration:  # held back from training: the batches after the last trained one
                n_calibration = min(n_calibration, max(1, steps // 10))
                steps -= n_calibration
        if steps < 1:
            raise StageError(
                f"{config.activations} holds {probe.n_rows} rows: not one batch of {config.batch_size}"
            )

        def batches(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            # start_batch: the loader computes which rows come next; nothing before is read.
            return iter(
                ActivationLoader(
                    config.activations, local_batch, start_batch=start, **loader_kwargs
                )
            )

        info = {
            "feature_input_hook": "blocks.{layer}.hook_mlp_in",
            "feature_output_hook": "blocks.{layer}.hook_mlp_out",
            "activations": {
                "url": config.activations,
                "attrs": dict(open_store(config.activations, config.fsspec_options()).attrs),
            },
        }
        return _train(
            config,
            batches,
            probe.stats,
            steps=steps,
            info=info,
            calibration_batches=n_calibration,
            rows=probe.n_rows,
        )


def _train(
    config: TrainCLTConfig,
    batches: Batches,
    stats: dict[str, torch.Tensor],
    *,
    steps: int,
    info: dict | None = None,
    calibration_batches: int | None = None,
    rows: int | None = None,
) -> Path:
    """The training loop over any source of this rank's normalised batches.

    `batches(start)` yields this rank's (inputs, targets) [B/world, L, M] for global batches
    start, start + 1, ...; `stats` is the store's normalisation (folded into the saved CLT).
    A TopK/BatchTopK CLT is converted on `calibration_batches` held-out batches, global
    batches steps, steps + 1, ... (default: config.calibration_tokens' worth). `rows`: the
    store's, named by the warning of a run too short for its dictionary.
    """
    _, _, local_rank = dist_env()
    device = resolve_device(config.device, local_rank)
    n_layers, d_model = stats["inputs_mean"].shape
    clt_cfg = config.clt_config(n_layers, d_model, rows)
    out = Path(config.out)
    with distributed(device) as (rank, world):
        if config.batch_size % world:
            raise StageError(
                f"batch_size={config.batch_size} is not a multiple of the {world} ranks"
            )
        identity = config.model_dump(mode="json", exclude=OPERATIONAL_FIELDS)
        if rank == 0:
            claim_run_dir(out, STAGE, identity, resume=config.resume)
        if world > 1:
            dist.barrier()
        if (out / "metrics.json").is_file():
            log.info("%s already holds the finished run", out)
            return out
        trainer = _Trainer(config, clt_cfg, device, rank, world, steps)
        if rank == 0:
            warn_if_too_short(config, trainer.schedule, n_layers * clt_cfg.d_features, rows)
        trainer.run(batches)
        if calibration_batches is None:
            calibration_batches = config.calibration_batches()
        trainer.finish(batches, stats, info or {}, calibration_batches)
    return out


class _Trainer:
    """The state of one run: model, optimiser, step, counters, and the phases that use them."""

    def __init__(
        self,
        config: TrainCLTConfig,
        clt_cfg: CLTConfig,
        device: torch.device,
        rank: int,
        world: int,
        steps: int,
    ):
        self.config, self.device, self.steps = config, device, steps
        self.schedule = resolve_schedule(config, steps, clt_cfg.n_layers * clt_cfg.d_features)
        self.rank, self.world = rank, world
        self.out = Path(config.out)
        self.ckpt_root = self.out / "checkpoints"
        torch.manual_seed(config.seed)
        # Built on the CPU, then moved: the same initial weights on any device.
        self.model = CrossLayerTranscoder(clt_cfg).to(device)
        self.model.distributed_batch = world > 1  # BatchTopK over the global batch
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            fused=device.type == "cuda",
        )
        L, F = clt_cfg.n_layers, clt_cfg.d_features
        self.step = 0
        self.tokens_since_fired = torch.zeros(L, F, dtype=torch.int64, device=device)
        # Sums over the last `eval_steps` steps, each batch scored before its update: L-vectors.
        self.window = {
            n: torch.zeros(L, dtype=torch.float64, device=device) for n in ("err", "var", "l0")
        }
        self.window_tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ones = torch.ones(L, device=device)  # normalised targets: unit variance per entry
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")

    # ------------------------------------------------------------------ checkpoints

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors.update({f"window.{k}": v for k, v in self.window.items()})
        tensors["window.tokens"] = self.window_tokens
        return tensors

    def save(self) -> None:
        self.last_checkpoint = time.monotonic()
        if self.rank == 0:
            save_checkpoint(
                self.ckpt_root,
                self.step,
                self._state_tensors(),
                {"step": self.step, "optimizer": _to_cpu(self.opt.state_dict())},
            )

    def try_resume(self) -> bool:
        found = load_checkpoint(self.ckpt_root)
        if found is None:
            return False
        tensors, state = found
        self.model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.window = {k: tensors[f"window.{k}"].to(self.device) for k in self.window}
        self.window_tokens = tensors["window.tokens"].to(self.device)
        if self.rank == 0:  # lines name the steps done: keep those up to the checkpoint's
            truncate_log(self.out / "metrics.jsonl", below=self.step + 1)
        log.info("resumed %s at step %d", self.out, self.step)
        return True

    # ------------------------------------------------------------------ the loop

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's share of a global batch, concatenated in rank order."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _init_from_first_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Biases from the whole first global batch (gathered), so every rank count agrees."""
        inputs, targets = self._gather(inputs), self._gather(targets)
        self.model.init_from_batch(inputs, targets, self.config.init_fire_rate)

    def run(self, batches: Batches) -> None:
        resumed = self.try_resume()
        if self.step >= self.steps:  # a run killed after its last checkpoint: still say so
            self.prepare()
            self.bar.close()
            return
        it = iter(batches(self.step))
        if not resumed:
            first = next(it, None)
            if first is None:
                raise StageError("the activation source yielded no batch")
            first = tuple(t.to(self.device) for t in first)
            self._init_from_first_batch(*first)
            it = itertools.chain([first], it)
        self.prepare()
        for inputs, targets in it:
            if self.step >= self.steps:
                break
            self.train_step(inputs, targets)
            due = time.monotonic() - self.last_checkpoint >= 60 * self.config.checkpoint_minutes
            if self.step % self.config.checkpoint_every == 0 or self.step == self.steps or due:
                self.save()
        self.bar.close()
        if self.step < self.steps:  # a finite source shorter than `steps`
            log.warning("the activations ran out after %d of %d steps", self.step, self.steps)
            self.steps = self.step
            self.save()

    def prepare(self, progress: bool = True) -> None:
        """Wrap the model for DDP and start the progress bar and clock, once weights are set."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp = self.model
        self.bar = progress_bar(
            total=self.steps,
            initial=self.step,
            desc="train-clt",
            disable=self.rank != 0 or not progress,
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.last_checkpoint = time.monotonic()

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimiser step on this rank's batch, with its counters and metrics line."""
        cfg = self.config
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        expected = (cfg.batch_size // self.world, *self.model.W_enc.shape[::2])  # B/world,L,M
        if tuple(inputs.shape) != expected or tuple(targets.shape) != expected:
            got = f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            raise ValueError(f"batch shapes {got}; expected {expected} on each rank")
        lr = learning_rate(
            self.step, peak=cfg.lr, warmup_steps=self.schedule.lr_warmup_steps,
            total_steps=self.steps, decay=cfg.lr_decay, min_ratio=cfg.min_lr_ratio,
        )  # fmt: skip
        for group in self.opt.param_groups:
            group["lr"] = lr
        lam = sparsity_coefficient(
            self.step,
            final=cfg.sparsity_coefficient,
            warmup_steps=self.schedule.sparsity_warmup_steps,
        )
        dead = self.tokens_since_fired >= self.schedule.dead_feature_tokens
        use_auxk = self.model.cfg.activation in ("topk", "batchtopk") and cfg.auxk_coefficient > 0
        use_autocast = cfg.autocast and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
            o = self.ddp(
                inputs, targets, target_variance=self.ones,
                dead=dead if use_auxk else None, with_preact=cfg.preact_coefficient > 0,
            )  # fmt: skip
        loss = (
            o.nmse
            + lam * o.sparsity
            + cfg.preact_coefficient * o.preact
            + cfg.auxk_coefficient * o.auxk
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
        self.opt.step()

        with torch.no_grad():
            # L,F: tokens each feature fired on (an int32 sum: a quarter of int64's time on CPU)
            counts = (o.features != 0).sum(0, dtype=torch.int32)
            self.tokens_since_fired = update_dead_counters(
                self.tokens_since_fired, counts > 0, cfg.batch_size, self.world
            )
            if self.step >= self.steps - cfg.eval_steps:
                self._accumulate(o, targets, counts)
        self.step += 1
        self.last_batch = (inputs, targets)
        if self.step % cfg.log_every == 0 or self.step == self.steps:
            l0_sum = counts.sum() / inputs.shape[0]  # active features per token, all layers
            self._log(
                o, loss, l0_sum, lam, lr, grad_norm, dead, time.perf_counter() - self.t0, self.bar
            )
        self.bar.update(1)

    def _accumulate(self, o, targets: torch.Tensor, counts: torch.Tensor) -> None:
        """Add this step's global sums (all ranks) to the metrics window."""
        t = targets.double()
        err = (o.reconstruction.double() - t).pow(2).sum((0, 2))  # L
        sums = _all_reduce(torch.stack([err, counts.sum(-1).double()]), self.world)  # 2,L
        var, n = _global_variance(t, self.world)
        for name, s in zip(("err", "var", "l0"), (sums[0], var, sums[1]), strict=True):
            self.window[name] += s
        self.window_tokens += n

    def _log(self, o, loss, l0_sum, lam, lr, grad_norm, dead, elapsed, bar) -> None:
        terms = torch.stack([loss, o.nmse, o.sparsity, o.preact, o.auxk, l0_sum]).detach().float()
        terms = _all_reduce(terms, self.world) / self.world
        if self.rank != 0:
            return
        loss_, nmse, sparsity, preact, auxk, l0_total = terms.tolist()
        record = {
            "step": self.step, "loss": loss_, "nmse": nmse, "sparsity": sparsity, "preact": preact, "auxk": auxk,
            "l0": l0_total / self.model.cfg.n_layers, "dead_fraction": dead.float().mean().item(),
            "lr": lr, "sparsity_coefficient": lam, "grad_norm": float(grad_norm), "elapsed_s": elapsed,
        }  # fmt: skip
        append_jsonl(self.out / "metrics.jsonl", record)
        bar.set_postfix(nmse=f"{nmse:.3f}", l0=f"{record['l0']:.1f}", refresh=False)

    # ------------------------------------------------------------------ the artifact

    @torch.no_grad()
    def finish(
        self, batches: Batches, stats: dict[str, torch.Tensor], info: dict, n_calibration: int
    ) -> None:
        """Every rank: convert a TopK/BatchTopK CLT on held-out batches. Rank 0: write the CLT
        dir (normalisation folded) and metrics.json."""
        window = {k: v.clone() for k, v in self.window.items()}
        tokens = float(self.window_tokens)
        if tokens == 0:
            raise StageError("no step was scored for metrics.json (did the run train at all?)")
        fvu_per_layer = (window["err"] / window["var"]).tolist()
        l0_per_layer = (window["l0"] / tokens).tolist()
        dead = self.tokens_since_fired >= self.schedule.dead_feature_tokens
        metrics = {
            "fvu": float(window["err"].sum() / window["var"].sum()),
            "l0": sum(l0_per_layer) / len(l0_per_layer),
            "l0_total": sum(l0_per_layer),
            "fvu_per_layer": fvu_per_layer,
            "l0_per_layer": l0_per_layer,
            "dead_fraction": dead.float().mean().item(),
            "steps": self.step,
            "tokens": self.step * self.config.batch_size,
            "eval_tokens": int(tokens),
            "schedule": self.schedule._asdict(),
        }
        clt = self.model
        if clt.cfg.activation in ("topk", "batchtopk"):
            clt, converted = self._convert(batches, max(1, n_calibration))
            keys = ("fvu", "l0", "l0_total", "fvu_per_layer", "l0_per_layer", "eval_tokens")
            metrics |= {f"{k}_before_conversion": metrics[k] for k in keys} | converted
        if self.rank == 0:
            save_clt(
                clt, self.out, stats=stats, info={**info, "trained_as": self.model.cfg.activation}
            )
            write_json(self.out / "metrics.json", metrics)  # last: it marks the run finished

    def _held_out(self, batches: Batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the `n` global batches after the last trained one; every rank
        gets as many. A source that ends there gives the last trained batch instead."""
        held = [
            (x.to(self.device), y.to(self.device))
            for x, y in itertools.islice(batches(self.step), n)
        ]
        count = int(
            _all_reduce(torch.tensor(len(held), device=self.device), self.world, dist.ReduceOp.MIN)
        )
        if count == 0:
            log.warning(
                "no held-out batch after step %d: calibrating on the last trained batch", self.step
            )
            if self.last_batch is None:  # resumed after the last step: any batch will do
                self.last_batch = next(iter(batches(0)))
            held = [tuple(t.to(self.device) for t in self.last_batch)]
            count = 1
        return held[:count]

    def _convert(self, batches: Batches, n: int) -> tuple[CrossLayerTranscoder, dict]:
        """The JumpReLU copy of the TopK/BatchTopK model: thresholds from the first half of
        the held-out batches (all ranks), its fvu and l0 measured on the second half (on all of
        them when there is one)."""
        held = self._held_out(batches, n)
        calibrate, measure = (
            (held[: len(held) // 2], held[len(held) // 2 :]) if len(held) > 1 else (held, held)
        )
        n_tokens = sum(x.shape[0] for x, _ in calibrate) * self.world
        theta = jumprelu_thresholds(
            self.model, (x for x, _ in calibrate), n_tokens, world=self.world
        )
        clt = self.model.with_thresholds(theta)
        L = clt.cfg.n_layers
        sums = torch.zeros(2, L, dtype=torch.float64, device=self.device)  # err, active
        for x, y in measure:
            o = clt(x)
            sums[0] += (o.reconstruction.double() - y.double()).pow(2).sum((0, 2))
            sums[1] += (o.features != 0).sum((0, 2)).double()
        sums = _all_reduce(sums, self.world)
        var, measured = _global_variance(torch.cat([y for _, y in measure]).double(), self.world)
        sums = torch.stack([sums[0], var, sums[1]])  # err, var, active
        l0_per_layer = (sums[2] / measured).tolist()
        return clt, {
            "fvu": float(sums[0].sum() / sums[1].sum()),
            "l0": sum(l0_per_layer) / L,
            "l0_total": sum(l0_per_layer),
            "fvu_per_layer": (sums[0] / sums[1]).tolist(),
            "l0_per_layer": l0_per_layer,
            "eval_tokens": measured,
            "calibration_tokens": n_tokens,
            "converted_from": self.model.cfg.activation,
        }


def _global_variance(t: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """Σ over every rank's rows of (t - mean)² per layer, the mean over all ranks' rows (as
    one process of the whole batch would compute it), and the row count: t N,L,M -> L, n."""
    n = torch.tensor(float(t.shape[0]), dtype=torch.float64, device=t.device)
    moments = [t.sum(0), t.pow(2).sum((0, 2)), n]  # L,M  L  scalar
    if world > 1:
        for m in moments:
            dist.all_reduce(m)
    s1, s2, n = moments
    return s2 - s1.pow(2).sum(-1) / n, int(n)


def _to_cpu(obj):
    """A state dict with every tensor on the CPU, so a checkpoint loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
