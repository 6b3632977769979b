"""`eval-clt`: how well a CLT reconstructs a model's MLP outputs, and how well it replaces them.

Shape letters: B batch, T positions, R rows (tokens), L layers, F features per layer, M d_model.

Reconstruction, over R rows (held-out tokens, BOS left out as in harvest; computed by the model
on the fly, or read from an activation store with --activations):
    fvu_per_layer[l] = Σ_r ||y_rl - ŷ_rl||² / Σ_r ||y_rl - ȳ_l||²     (ȳ_l: the rows' mean target)
    fvu              = Σ_l numerator / Σ_l denominator                 (pooled, as train-clt)
    l0_per_layer[l]  = mean over rows of the active features of layer l; l0 = mean over layers
    dead_fraction    = features (of all L·F) active on no row
    dense_fraction   = features active on more than `dense_threshold` of the rows

Splice (`splice.py`): every MLP replaced by the CLT in one forward pass, BOS positions keeping
the original MLP output; against the original model on the positions its data scores:
    spliced_ce_delta        CE(spliced) - CE(original)
    spliced_kl              KL(original ‖ spliced) of the next-token distributions
    spliced_top1_agreement  fraction of positions whose argmax token is the same

The results are merged into the CLT dir's metrics.json (keys already there are kept).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import DEVICE_HELP, Device, resolve_device
from ..errors import StageError
from ..io import read_json, write_json
from ..progress import progress_bar
from ..sparse_attention.data import DataSpec, load_token_data
from ..sparse_attention.hooks import capture
from ..sparse_attention.model import Transformer
from ..sparse_attention.modeldir import load_model
from .cltdir import load_clt
from .harvest import DataSource, StoreAccess, bos_mask, own_data_context, read_tokens_file
from .loader import ActivationLoader
from .model import CrossLayerTranscoder
from .splice import (
    FEATURE_INPUT_HOOK,
    FEATURE_OUTPUT_HOOK,
    CLTSplice,
    Replacement,
    check_compatible,
    spliced_logits,
    warn_if_other_model,
)

log = logging.getLogger(__name__)

STORE_BATCH_ROWS = 4096  # rows per batch read from an activation store


class TokenSource(DataSource):
    """Where evaluation tokens come from: the model's own data by default (its data.json)."""

    split: Literal["heldout", "train"] = Field(
        "heldout", description="Which split of the model's data."
    )
    sequences: int = Field(
        1024, ge=0, description="Sequences to use at most (the first of the split); 0: all."
    )
    context_length: int | None = Field(
        None, gt=0, description="Tokens per sequence; default: the data's."
    )
    include_bos: bool = Field(
        False, description="Count BOS rows (left out by default, as in harvest)."
    )


def load_tokens(
    source: TokenSource, model_dir: Path, model: Transformer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N,T] and next-token targets [N,T] (-100 where no loss is taken)."""
    if source.tokens_file is not None:
        seqs = read_tokens_file(source.tokens_file)
        if source.context_length is not None:
            if seqs.shape[1] < source.context_length:
                raise StageError(
                    f"{source.tokens_file}: sequences of {seqs.shape[1]} tokens are shorter than "
                    f"the context length {source.context_length}"
                )
            seqs = seqs[:, : source.context_length]
        targets = torch.cat([seqs[:, 1:], torch.full_like(seqs[:, :1], -100)], dim=1)
    else:
        spec = source.data
        if source.corpus is not None:
            spec = DataSpec(corpus=source.corpus, context_length=own_data_context(model_dir, model))
        data = load_token_data(model_dir, spec, source.context_length)
        if source.split == "heldout":
            seqs, targets = data.heldout_inputs, data.heldout_targets
        else:
            seqs, targets = data.train_inputs, data.train_targets
    if source.sequences:
        seqs, targets = seqs[: source.sequences], targets[: source.sequences]
    cfg = model.cfg
    if seqs.numel() == 0:
        raise StageError("the data gives no sequence to evaluate on")
    if seqs.shape[1] > cfg.context_length:
        raise StageError(
            f"sequences of {seqs.shape[1]} tokens are longer than the model's context {cfg.context_length}"
        )
    if int(seqs.max()) >= cfg.vocab_size or int(seqs.min()) < 0:
        raise StageError(
            f"token ids must lie in [0, {cfg.vocab_size}); the data has {int(seqs.min())}..{int(seqs.max())}"
        )
    return seqs.long(), targets.long()


class EvalCLTConfig(TokenSource, StoreAccess):
    """`eval-clt`: reconstruction and spliced-model metrics of a CLT, into its metrics.json."""

    clt: Path = Field(
        description="CLT directory (train-clt's output); its metrics.json is updated."
    )
    model: Path = Field(
        description="The model the CLT was trained on (dense or sparsified; gates as saved)."
    )
    activations: str | None = Field(
        None,
        description="Read FVU/L0 rows from this activation store (local path or s3:// URL) instead of "
        "computing them with the model; the splice always runs the model.",
    )
    tokens: int | None = Field(
        None, gt=0, description="Store rows to read at most (with --activations); default all."
    )
    batch_size: int = Field(32, gt=0, description="Sequences per forward pass.")
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="A feature active on more than this fraction of rows is dense."
    )
    device: Device = Field("auto", description=DEVICE_HELP)


# ----------------------------------------------------------------------------- accumulators


class ReconstructionStats:
    """Running sums over rows for FVU, L0, dead and dense features (float64)."""

    def __init__(self, n_layers: int, d_features: int, d_model: int, device: torch.device):
        L, F_, M = n_layers, d_features, d_model
        f64 = dict(dtype=torch.float64, device=device)
        self.err, self.sq, self.sum = (
            torch.zeros(L, **f64),
            torch.zeros(L, **f64),
            torch.zeros(L, M, **f64),
        )
        self.fired = torch.zeros(
            L, F_, dtype=torch.int64, device=device
        )  # rows each feature was active on
        self.rows = 0

    @torch.no_grad()
    def add(
        self, features: torch.Tensor, reconstruction: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """features R,L,F; reconstruction and targets R,L,M."""
        t = targets.double()
        self.err += (reconstruction.double() - t).pow(2).sum((0, 2))
        self.sq += t.pow(2).sum((0, 2))
        self.sum += t.sum(0)
        self.fired += (features != 0).sum(0)
        self.rows += t.shape[0]

    def metrics(self, dense_threshold: float) -> dict:
        if self.rows == 0:
            raise StageError("no rows to evaluate the reconstruction on")
        var = self.sq - self.sum.pow(2).sum(-1) / self.rows  # L: Σ_r ||y_r - ȳ||²
        l0_per_layer = (self.fired.sum(-1).double() / self.rows).tolist()
        frequency = self.fired.double() / self.rows  # L,F
        return {
            "fvu": float(self.err.sum() / var.sum()),
            "fvu_per_layer": (self.err / var).tolist(),
            "l0": sum(l0_per_layer) / len(l0_per_layer),
            "l0_total": sum(l0_per_layer),
            "l0_per_layer": l0_per_layer,
            "dead_fraction": float((self.fired == 0).double().mean()),
            "dead_per_layer": (self.fired == 0).sum(-1).tolist(),
            "dense_fraction": float((frequency > dense_threshold).double().mean()),
            "dense_per_layer": (frequency > dense_threshold).sum(-1).tolist(),
            "eval_rows": self.rows,
        }


class SpliceStats:
    """Running sums of CE (original, spliced), KL and top-1 agreement over scored positions."""

    def __init__(self):
        self.ce_original = self.ce_spliced = self.kl = 0.0
        self.agree = self.positions = 0

    @torch.no_grad()
    def add(self, original: torch.Tensor, spliced: torch.Tensor, targets: torch.Tensor) -> None:
        """original, spliced: logits B,T,V; targets B,T (-100: not scored)."""
        scored = targets != -100
        lp_o = original[scored].float().log_softmax(-1)  # P,V
        lp_s = spliced[scored].float().log_softmax(-1)
        t = targets[scored]
        self.ce_original -= float(lp_o.gather(-1, t[:, None]).double().sum())
        self.ce_spliced -= float(lp_s.gather(-1, t[:, None]).double().sum())
        self.kl += float((lp_o.exp() * (lp_o - lp_s)).sum(-1).double().sum())
        self.agree += int((lp_o.argmax(-1) == lp_s.argmax(-1)).sum())
        self.positions += int(scored.sum())

    def metrics(self) -> dict:
        if self.positions == 0:
            raise StageError("the data scores no position (every target is -100)")
        n = self.positions
        return {
            "spliced_ce_delta": (self.ce_spliced - self.ce_original) / n,
            "spliced_kl": self.kl / n,
            "spliced_top1_agreement": self.agree / n,
            "spliced_loss": self.ce_spliced / n,
            "original_loss": self.ce_original / n,
            "spliced_positions": n,
        }


# ----------------------------------------------------------------------------- passes


def mlp_rows(
    acts: dict[str, torch.Tensor], n_layers: int, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captured MLP inputs and outputs at the kept positions: R,L,M each."""
    out = []
    for hook in (FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK):
        x = torch.stack(
            [acts[hook.format(layer=layer)] for layer in range(n_layers)], dim=2
        )  # B,T,L,M
        out.append(x[keep])
    return out[0], out[1]


@torch.no_grad()
def evaluate(
    model: Transformer,
    clt: CrossLayerTranscoder,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 32,
    include_bos: bool = False,
    reconstruction: bool = True,
    dense_threshold: float = 0.1,
    replacement: Replacement | None = None,
) -> dict:
    """Splice metrics (and, with `reconstruction`, FVU/L0 on the model's own activations) over
    the sequences tokens [N,T] with next-token targets [N,T]. `replacement` stands in for the
    MLPs in the splice (default: the CLT)."""
    device = next(model.parameters()).device
    L = model.cfg.n_layers
    rec = ReconstructionStats(L, clt.cfg.d_features, clt.cfg.d_model, device)
    splice = SpliceStats()
    names = [
        h.format(layer=layer)
        for layer in range(L)
        for h in (FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK)
    ]
    for j in progress_bar(range(0, len(tokens), batch_size), desc="eval-clt", unit="batch"):
        tok, tgt = tokens[j : j + batch_size].to(device), targets[j : j + batch_size].to(device)
        keep = bos_mask(tok, model.cfg.bos_token_id, include_bos)  # B,T
        with capture(model, names if reconstruction else []) as acts:
            original = model(tok).logits
        if reconstruction:
            x, y = mlp_rows(acts, L, keep)
            out = clt(x.to(clt.W_enc.dtype))
            rec.add(out.features, out.reconstruction, y)
        spliced = spliced_logits(model, replacement or CLTSplice(clt), tok, keep)
        splice.add(original, spliced, tgt)
    metrics = splice.metrics()
    if reconstruction:
        metrics = rec.metrics(dense_threshold) | metrics
    return metrics


@torch.no_grad()
def evaluate_store(
    clt: CrossLayerTranscoder,
    url: str,
    *,
    storage_options: dict | None = None,
    max_rows: int | None = None,
    dense_threshold: float = 0.1,
    device: torch.device | str = "cpu",
) -> dict:
    """FVU/L0/dead/dense on the raw rows of an activation store."""
    loader = ActivationLoader(
        url, STORE_BATCH_ROWS, storage_options=storage_options, normalize=False, device=device
    )
    if (loader.n_layers, loader.d_model) != (clt.cfg.n_layers, clt.cfg.d_model):
        raise StageError(
            f"{url} holds {loader.n_layers} layers of d_model {loader.d_model}, but the CLT has "
            f"{clt.cfg.n_layers} layers of d_model {clt.cfg.d_model}"
        )
    rec = ReconstructionStats(
        clt.cfg.n_layers, clt.cfg.d_features, clt.cfg.d_model, torch.device(device)
    )
    total = min(loader.n_rows, max_rows or loader.n_rows)
    with progress_bar(total=total, desc="eval-clt store", unit="tok", unit_scale=True) as bar:
        for x, y in loader:
            n = min(len(x), total - rec.rows)
            out = clt(x[:n].to(clt.W_enc.dtype))
            rec.add(out.features, out.reconstruction, y[:n])
            bar.update(n)
            if rec.rows >= total:
                break
    return rec.metrics(dense_threshold)


# ----------------------------------------------------------------------------- the stage


def load_pair(
    clt_dir: Path, model_dir: Path, device: torch.device
) -> tuple[Transformer, CrossLayerTranscoder]:
    """The model and the CLT, checked to fit each other."""
    clt = load_clt(clt_dir)
    model, _ = load_model(model_dir)
    clt_info = read_json(Path(clt_dir) / "config.json")
    check_compatible(model, clt, clt_info)
    warn_if_other_model(model, clt_info)
    return model.to(device).eval(), clt.to(device).eval()


def eval_clt(config: EvalCLTConfig) -> Path:
    """Evaluate the CLT at config.clt against config.model; merge the figures into its metrics.json."""
    device = resolve_device(config.device)
    model, clt = load_pair(config.clt, config.model, device)
    tokens, targets = load_tokens(config, config.model, model)
    from_store = config.activations is not None
    metrics = evaluate(
        model, clt, tokens, targets, batch_size=config.batch_size, include_bos=config.include_bos,
        reconstruction=not from_store, dense_threshold=config.dense_threshold,
    )  # fmt: skip
    if from_store:
        metrics = evaluate_store(
            clt, config.activations, storage_options=config.fsspec_options(), max_rows=config.tokens,
            dense_threshold=config.dense_threshold, device=device,
        ) | metrics  # fmt: skip
    metrics["eval"] = {
        "model": str(config.model),
        "rows_from": config.activations or "model",
        "data": str(config.tokens_file)
        if config.tokens_file
        else f"model data, {config.split} split",
        "sequences": int(tokens.shape[0]),
        "context_length": int(tokens.shape[1]),
        "include_bos": config.include_bos,
        "dense_threshold": config.dense_threshold,
    }
    path = Path(config.clt) / "metrics.json"
    previous = read_json(path) if path.is_file() else {}
    write_json(path, previous | metrics)
    log.info(
        "fvu %.4f, l0 %.1f, spliced CE delta %.4f, top-1 agreement %.4f",
        metrics["fvu"], metrics["l0"], metrics["spliced_ce_delta"], metrics["spliced_top1_agreement"],
    )  # fmt: skip
    return Path(config.clt)
