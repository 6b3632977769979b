"""`feature-stats`: what each CLT feature responds to and what it writes, for the service.

Shape letters: B batch, T positions, L layers, F features per layer, K top contexts,
W window (2·window + 1 tokens), NB histogram bins, N logits kept, V vocab, M d_model.

One streaming pass over data tokens runs the model (not spliced: features read the original
model's MLP inputs, as harvest records them) and the CLT, BOS rows left out, and keeps per
feature, in memory bounded by L·F·K·W whatever the number of tokens:
    frequency, mean_activation (over active rows), max_activation
    top contexts   the K highest activations (a running top-k), each with the token window of
                   ±window positions around it and this feature's activations there
    histogram      of nonzero activations: NB equal bins on [0, NB·w], w a power of two per
                   feature that doubles (merging bin pairs) whenever a larger value arrives
    logits         direct logit effect: the feature's decoders summed over its target layers,
                   d = Σ_k W_dec[l][f, k-l] (what one unit of activation adds to the residual
                   stream), through the final norm taken as linear (centring for LayerNorm and
                   the norm's weight; the per-token scale and the bias left out) and the
                   unembedding; the N most positive and N most negative tokens. Later layers
                   and attention are ignored: a ranking, not a prediction.

Stored next to the CLT as one zarr v3 group, C/features/, every array [L, F, ...] sharded one
shard per layer with one inner chunk per feature, so `read_feature` reads a feature's own
chunks (and the shard indexes) and nothing of the others.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from pydantic import Field, field_validator
from tokenizers import Tokenizer
from zarr.storage import LocalStore

from .. import __version__
from ..config import DEVICE_HELP, Device, resolve_device
from ..errors import MissingInputError, StageError
from ..io import atomic_dir
from ..progress import progress_bar
from ..sparse_attention.hooks import capture, stop_after
from ..sparse_attention.model import LayerNorm, Transformer
from ..sparse_attention.modeldir import load_tokenizer
from .evaluate import TokenSource, load_pair, load_tokens
from .harvest import bos_mask
from .model import CrossLayerTranscoder
from .splice import FEATURE_INPUT_HOOK

log = logging.getLogger(__name__)

FORMAT = "sparse-circuits-features"
FORMAT_VERSION = 1
FEATURES_DIR = "features"
TOKENIZER_FILE = "tokenizer.json"  # the model's, beside the arrays: token ids read as text
LOGIT_METHOD = (
    "direct logit effect: decoders summed over target layers, through the final norm's linear "
    "part (centring, weight; no per-token scale, no bias) and the unembedding"
)


class FeatureStatsConfig(TokenSource):
    """`feature-stats`: per-feature top contexts, frequency, histogram and logits, into C/features/."""

    clt: Path = Field(description="CLT directory; the statistics go to its features/ folder.")
    model: Path = Field(description="The model the CLT was trained on.")
    split: Literal["heldout", "train"] = Field(
        "train", description="Which split of the model's data."
    )
    batch_size: int = Field(16, gt=0, description="Sequences per forward pass.")
    top_k: int = Field(20, gt=0, description="Top-activating contexts kept per feature.")
    window: int = Field(8, ge=0, description="Tokens kept on each side of a top activation.")
    histogram_bins: int = Field(32, gt=0, description="Histogram bins (a power of two).")
    n_logits: int = Field(10, gt=0, description="Top and bottom output logits kept per feature.")
    device: Device = Field("auto", description=DEVICE_HELP)

    @field_validator("histogram_bins")
    @classmethod
    def _power_of_two(cls, bins: int) -> int:
        if bins & (bins - 1):
            raise StageError(f"histogram_bins must be a power of two, got {bins}")
        return bins


# ----------------------------------------------------------------------------- streaming statistics


class FeatureAccumulator:
    """Running per-feature statistics of one CLT; `add` one layer of one batch at a time."""

    def __init__(self, n_layers: int, d_features: int, top_k: int, window: int, bins: int, device):
        L, F, K, W = n_layers, d_features, top_k, 2 * window + 1
        self.top_k, self.window, self.bins = K, window, bins
        on = dict(device=device)
        self.count = torch.zeros(L, F, dtype=torch.int64, **on)
        self.sum = torch.zeros(L, F, dtype=torch.float64, **on)
        self.max = torch.zeros(L, F, **on)
        self.top_value = torch.full((L, F, K), -1.0, **on)  # -1: empty slot (activations are ≥ 0)
        self.top_doc = torch.full((L, F, K), -1, dtype=torch.int64, **on)
        self.top_pos = torch.full((L, F, K), -1, dtype=torch.int64, **on)
        self.top_tokens = torch.full(
            (L, F, K, W), -1, dtype=torch.int64, **on
        )  # -1: outside the sequence
        self.top_acts = torch.zeros(L, F, K, W, **on)
        self.hist = torch.zeros(L, F, bins, dtype=torch.int64, **on)
        self.hist_exp = torch.zeros(L, F, dtype=torch.int64, **on)  # bin width 2**exp
        self.hist_set = torch.zeros(L, F, dtype=torch.bool, **on)
        self.rows = 0  # kept (non-BOS) rows seen

    @torch.no_grad()
    def add(self, layer: int, acts: torch.Tensor, tokens: torch.Tensor, first_doc: int) -> None:
        """acts B,T,F (zero at rows left out); tokens B,T; sequences first_doc, first_doc+1, ..."""
        B, T, F = acts.shape
        flat = acts.reshape(B * T, F)
        active = flat > 0
        self.count[layer] += active.sum(0)
        self.sum[layer] += flat.double().sum(0)
        self.max[layer] = torch.maximum(self.max[layer], flat.max(0).values)
        self._top(layer, acts, tokens, first_doc)
        self._histogram(layer, flat, active)

    def _top(self, layer: int, acts: torch.Tensor, tokens: torch.Tensor, first_doc: int) -> None:
        B, T, F = acts.shape
        K, w = self.top_k, self.window
        values, rows = acts.reshape(B * T, F).topk(min(K, B * T), dim=0)  # k,F
        b, t = rows // T, rows % T
        pos = t[..., None] + torch.arange(-w, w + 1, device=acts.device)  # k,F,W
        inside = (pos >= 0) & (pos < T)
        pos = pos.clamp(0, T - 1)
        bb = b[..., None].expand_as(pos)
        win_tokens = torch.where(inside, tokens[bb, pos], -1)
        feature = torch.arange(F, device=acts.device)[None, :, None].expand_as(pos)
        win_acts = torch.where(inside, acts[bb, pos, feature], 0.0)

        def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # F,K,... with F,k,...
            both = torch.cat([old, new], dim=1)
            idx = order.view(*order.shape, *([1] * (both.ndim - 2))).expand(-1, -1, *both.shape[2:])
            return both.gather(1, idx)

        both_values = torch.cat([self.top_value[layer], values.T], dim=1)  # F,K+k
        order = both_values.topk(K, dim=1).indices  # F,K
        self.top_value[layer] = both_values.gather(1, order)
        self.top_doc[layer] = merge(self.top_doc[layer], (first_doc + b).T)
        self.top_pos[layer] = merge(self.top_pos[layer], t.T)
        self.top_tokens[layer] = merge(self.top_tokens[layer], win_tokens.transpose(0, 1))
        self.top_acts[layer] = merge(self.top_acts[layer], win_acts.transpose(0, 1))

    def _histogram(self, layer: int, flat: torch.Tensor, active: torch.Tensor) -> None:
        NB = self.bins
        batch_max = flat.max(0).values  # F
        seen = batch_max > 0
        if not seen.any():
            return
        # Smallest exponent e with batch_max ≤ NB·2^e; the bins widen to it where it is larger.
        need = torch.ceil(torch.log2(batch_max[seen].double() / NB)).long()
        exp, is_set = self.hist_exp[layer], self.hist_set[layer]
        grow = torch.zeros_like(exp)
        grow[seen] = torch.where(is_set[seen], (need - exp[seen]).clamp(min=0), 0)
        exp[seen] = torch.where(is_set[seen], torch.maximum(exp[seen], need), need)
        is_set |= seen
        for d in grow.unique().tolist():
            if d > 0:
                sel = grow == d
                s = 2 ** min(d, int(math.log2(NB)))  # bins merged into one
                merged = self.hist[layer][sel].view(-1, NB // s, s).sum(-1)  # n,NB/s
                self.hist[layer][sel] = torch.nn.functional.pad(merged, (0, NB - NB // s))
        f = torch.arange(flat.shape[1], device=flat.device).expand_as(flat)[active]
        width = torch.exp2(exp.double())[f]
        bin_ = (flat[active].double() / width).floor().long().clamp(0, NB - 1)
        self.hist[layer].view(-1).index_add_(0, f * NB + bin_, torch.ones_like(bin_))

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything to store, [L, F, ...] each."""
        count = self.count.double()
        width = torch.where(self.hist_set, torch.exp2(self.hist_exp.double()), 0.0)
        out = {
            "frequency": count / max(self.rows, 1),
            "mean_activation": torch.where(count > 0, self.sum / count.clamp(min=1), 0.0),
            "max_activation": self.max + 0.0,  # + 0.0: no -0.0 (a negative pre-activation masked)
            "top_activation": self.top_value.clamp(min=0),
            "top_doc": self.top_doc,
            "top_pos": self.top_pos.to(torch.int32),
            "top_window_tokens": self.top_tokens.to(torch.int32),
            "top_window_activations": self.top_acts + 0.0,
            "histogram_counts": self.hist,
            "histogram_bin_width": width,
        }
        return {k: v.cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def direct_logit_effects(
    model: Transformer, clt: CrossLayerTranscoder, n: int, chunk: int = 1024
) -> dict[str, np.ndarray]:
    """Top and bottom `n` tokens of each feature's direct logit effect (see the module docstring)."""
    L, F = clt.cfg.n_layers, clt.cfg.d_features
    n = min(n, model.cfg.vocab_size)
    W_U = model.lm_head.weight.float()  # V,M
    gain = model.final_norm.weight.float()  # M
    out = {
        k: []
        for k in ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values")
    }
    for layer in range(L):
        d = clt.W_dec[layer].float().sum(1)  # F,M
        parts = {k: [] for k in out}
        for a in range(0, F, chunk):
            x = d[a : a + chunk]
            if isinstance(model.final_norm, LayerNorm):
                x = x - x.mean(-1, keepdim=True)
            logits = (x * gain) @ W_U.T  # f,V
            top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
            parts["top_logit_ids"].append(top.indices)
            parts["top_logit_values"].append(top.values)
            parts["bottom_logit_ids"].append(bottom.indices)
            parts["bottom_logit_values"].append(bottom.values)
        for k in out:
            out[k].append(torch.cat(parts[k]))
    return {
        k: torch.stack(v).cpu().numpy().astype(np.int32 if k.endswith("ids") else np.float32)
        for k, v in out.items()
    }


@torch.no_grad()
def accumulate(
    model: Transformer,
    clt: CrossLayerTranscoder,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    top_k: int,
    window: int,
    bins: int,
    include_bos: bool = False,
) -> FeatureAccumulator:
    """Stream `tokens` [N,T] through the model and the CLT."""
    device = next(model.parameters()).device
    L = model.cfg.n_layers
    acc = FeatureAccumulator(L, clt.cfg.d_features, top_k, window, bins, device)
    names = [FEATURE_INPUT_HOOK.format(layer=layer) for layer in range(L)]

    for j in progress_bar(range(0, len(tokens), batch_size), desc="feature-stats", unit="batch"):
        tok = tokens[j : j + batch_size].to(device)  # B,T
        keep = bos_mask(tok, model.cfg.bos_token_id, include_bos)
        with capture(model, names) as acts, stop_after(model, names[-1]):
            model(tok)  # ends once the last MLP input is captured
        for layer in range(L):
            x = acts[names[layer]].to(clt.W_enc.dtype)  # B,T,M
            a = clt.activate_layer(clt.encode_layer(x, layer), layer) * keep[..., None]  # B,T,F
            acc.add(layer, a.float(), tok, j)
        acc.rows += int(keep.sum())
    return acc


# ----------------------------------------------------------------------------- storage


def write_features(
    path: Path, arrays: dict[str, np.ndarray], attrs: dict, tokenizer: Tokenizer | None = None
) -> Path:
    """One zarr v3 group, built beside `path` and swapped in whole; with the model's tokenizer
    beside the arrays, so that read_feature gives every token's text."""
    with atomic_dir(path) as tmp:
        if tokenizer is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer.to_str())
        group = zarr.create_group(LocalStore(tmp), zarr_format=3, attributes=attrs)
        for name, a in arrays.items():
            F, rest = a.shape[1], a.shape[2:]  # L,F,...: one shard per layer
            arr = group.create_array(
                name, shape=a.shape, dtype=a.dtype, chunks=(1, 1, *rest), shards=(1, F, *rest)
            )
            arr[...] = a
    return path


def open_features(clt_dir: str | os.PathLike) -> zarr.Group:
    path = Path(clt_dir) / FEATURES_DIR
    if not (path / "zarr.json").is_file():
        raise MissingInputError(
            f"no feature statistics at {path}; compute them with `sparse-circuits feature-stats --clt {clt_dir} --model M`"
        )
    group = zarr.open_group(LocalStore(path, read_only=True), mode="r", zarr_format=3)
    if group.attrs.get("format") != FORMAT:
        raise StageError(
            f"{path} is a zarr group but not feature statistics (attrs['format'] != {FORMAT!r})"
        )
    if group.attrs.get("format_version") != FORMAT_VERSION:
        raise StageError(
            f"{path} has format version {group.attrs.get('format_version')}; this code reads {FORMAT_VERSION}"
        )
    return group


def read_feature(
    clt_dir: str | os.PathLike, layer: int, index: int, tokenizer: Tokenizer | None = None
) -> dict:
    """One feature's statistics, reading only its own chunks. Tokens are decoded too (as
    `strings`, `token`) with `tokenizer`, or else with the one stored with the statistics."""
    group = open_features(clt_dir)
    stored = Path(clt_dir) / FEATURES_DIR / TOKENIZER_FILE
    if tokenizer is None and stored.is_file():
        tokenizer = Tokenizer.from_file(str(stored))
    attrs = group.attrs
    L, F = attrs["n_layers"], attrs["d_features"]
    if not 0 <= layer < L:
        raise StageError(f"layer {layer} is out of range: the CLT has {L} layers (0..{L - 1})")
    if not 0 <= index < F:
        raise StageError(
            f"feature {index} is out of range: layer {layer} has {F} features (0..{F - 1})"
        )

    def get(name: str) -> np.ndarray:
        return np.asarray(group[name][layer, index])

    w = attrs["window"]
    contexts = []
    for value, doc, pos, toks, acts in zip(
        get("top_activation"), get("top_doc"), get("top_pos"), get("top_window_tokens"), get("top_window_activations"),
        strict=True,
    ):  # fmt: skip
        if value <= 0:  # an empty slot: the feature fired on fewer than top_k rows
            continue
        inside = toks >= 0
        start = int(np.argmax(inside))
        context = {
            "activation": float(value), "doc": int(doc), "pos": int(pos), "start_pos": int(pos) - w + start,
            "center": w - start, "tokens": toks[inside].tolist(), "activations": acts[inside].tolist(),
        }  # fmt: skip
        if tokenizer is not None:
            context["strings"] = [tokenizer.decode([t]) for t in context["tokens"]]
        contexts.append(context)
    width, counts = float(get("histogram_bin_width")), get("histogram_counts")
    logits = {}
    for side in ("top", "bottom"):
        ids, values = get(f"{side}_logit_ids"), get(f"{side}_logit_values")
        logits[f"{side}_logits"] = [
            {"token_id": int(i), "value": float(v)}
            | ({"token": tokenizer.decode([int(i)])} if tokenizer else {})
            for i, v in zip(ids, values, strict=True)
        ]
    return {
        "layer": layer, "index": index, "frequency": float(get("frequency")),
        "mean_activation": float(get("mean_activation")), "max_activation": float(get("max_activation")),
        "n_tokens": attrs["n_tokens"], "top_contexts": contexts,
        "histogram": {"edges": (width * np.arange(len(counts) + 1)).tolist(), "counts": counts.tolist()},
        **logits, "logit_method": attrs["logit_method"],
    }  # fmt: skip


# ----------------------------------------------------------------------------- the stage


def feature_stats(config: FeatureStatsConfig) -> Path:
    """Compute the statistics of every feature of config.clt; return the features dir."""
    device = resolve_device(config.device)
    model, clt = load_pair(config.clt, config.model, device)
    tokens, _ = load_tokens(config, config.model, model)
    acc = accumulate(
        model, clt, tokens, batch_size=config.batch_size, top_k=config.top_k, window=config.window,
        bins=config.histogram_bins, include_bos=config.include_bos,
    )  # fmt: skip
    arrays = acc.arrays() | direct_logit_effects(model, clt, config.n_logits)
    attrs = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "generator": {"name": "sparse-circuits", "version": __version__},
        "n_layers": clt.cfg.n_layers, "d_features": clt.cfg.d_features, "n_tokens": acc.rows,
        "sequences": int(tokens.shape[0]), "context_length": int(tokens.shape[1]),
        "top_k": config.top_k, "window": config.window, "histogram_bins": config.histogram_bins,
        "n_logits": config.n_logits, "logit_method": LOGIT_METHOD, "model": str(config.model),
        "data": str(config.tokens_file) if config.tokens_file else f"model data, {config.split} split",
        "include_bos": config.include_bos,
    }  # fmt: skip
    out = write_features(
        Path(config.clt) / FEATURES_DIR, arrays, attrs, tokenizer=load_tokenizer(config.model)
    )
    log.info(
        "feature statistics of %d features over %d tokens in %s", clt.num_features, acc.rows, out
    )
    return out
