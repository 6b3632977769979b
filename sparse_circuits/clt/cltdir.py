"""Our CLT directory: circuit-tracer's per-layer CLT layout plus config.json (and metrics.json).

    config.json              {"format": "sparse-circuits-clt", "clt": CLTConfig, ...}
    W_enc_{i}.safetensors    W_enc_{i} [F, M], b_enc_{i} [F], b_dec_{i} [M], threshold_{i} [F] (JumpReLU)
    W_dec_{i}.safetensors    W_dec_{i} [F, L - i, M]

The weights act on raw activations: the loader's normalisation, (x - mean) / scale per layer,
is folded in (`fold_normalization`). A per-layer transcoder is written as a CLT whose
decoders to later layers are zero, so circuit-tracer reads it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MissingInputError, StageError
from ..io import load_tensors, read_json, save_tensors, write_json
from .model import CLTConfig, CrossLayerTranscoder

FORMAT = "sparse-circuits-clt"
STAT_NAMES = ("inputs_mean", "inputs_scale", "targets_mean", "targets_scale")


@torch.no_grad()
def fold_normalization(
    clt: CrossLayerTranscoder, stats: dict[str, torch.Tensor]
) -> CrossLayerTranscoder:
    """A copy of `clt` (trained on normalised activations) that takes and returns raw ones.

    x̃_l = (x_l - μ_l) / s_l  =>  W_enc[l] / s_l,  b_enc[l] - W_enc[l] μ_l / s_l
    y_k = t_k ỹ_k + ν_k      =>  W_dec[i][:, k-i] · t_k,  b_dec[k] · t_k + ν_k
    Features, and so thresholds, are unchanged.
    """
    missing = [n for n in STAT_NAMES if n not in stats]
    if missing:
        raise StageError(f"normalisation stats lack {missing}")
    L, M = clt.cfg.n_layers, clt.cfg.d_model
    f64 = {n: stats[n].detach().to("cpu", torch.float64) for n in STAT_NAMES}
    for n, shape in (
        ("inputs_mean", (L, M)),
        ("inputs_scale", (L,)),
        ("targets_mean", (L, M)),
        ("targets_scale", (L,)),
    ):
        if tuple(f64[n].shape) != shape:
            raise StageError(
                f"stat {n} has shape {tuple(f64[n].shape)}, expected {shape} for this CLT"
            )
    mu, s, nu, t = (
        f64["inputs_mean"],
        f64["inputs_scale"],
        f64["targets_mean"],
        f64["targets_scale"],
    )

    state = {k: v.detach().to("cpu", torch.float64) for k, v in clt.state_dict().items()}
    W_enc = state["W_enc"] / s[:, None, None]  # L,F,M
    state["b_enc"] = state["b_enc"] - torch.einsum("lfm,lm->lf", W_enc, mu)
    state["W_enc"] = W_enc
    for i, K in enumerate(clt.cfg.decoder_layers):
        state[f"W_dec.{i}"] = state[f"W_dec.{i}"] * t[i : i + K, None]  # F,K,M * K,1
    state["b_dec"] = state["b_dec"] * t[:, None] + nu
    dtype, device = clt.b_enc.dtype, clt.b_enc.device
    return _build(clt.cfg, {k: v.to(device, dtype) for k, v in state.items()})


def _build(cfg: CLTConfig, state: dict[str, torch.Tensor]) -> CrossLayerTranscoder:
    with torch.device("meta"):
        clt = CrossLayerTranscoder(cfg)
    clt.load_state_dict(state, assign=True)
    return clt


@torch.no_grad()
def write_layer_files(
    clt: CrossLayerTranscoder, out: Path, dtype: torch.dtype | None = None
) -> None:
    """circuit-tracer's per-layer safetensors files (FORMATS.md) in `out`, in `dtype` (default:
    the CLT's): the one writer of the layout, for `save_clt` and `export` alike. A per-layer
    transcoder's decoders to later layers are written as zeros."""
    L, F, M = clt.cfg.n_layers, clt.cfg.d_features, clt.cfg.d_model
    threshold = clt.threshold
    for i in range(L):
        enc = {f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if threshold is not None:
            enc[f"threshold_{i}"] = threshold[i]
        W = clt.W_dec[i].detach()  # F,K_i,M
        if W.shape[1] != L - i:
            W = torch.cat([W, W.new_zeros(F, L - i - W.shape[1], M)], dim=1)
        cast = (lambda t: t.detach()) if dtype is None else (lambda t: t.detach().to(dtype))
        save_tensors(out / f"W_enc_{i}.safetensors", {k: cast(v) for k, v in enc.items()})
        save_tensors(out / f"W_dec_{i}.safetensors", {f"W_dec_{i}": cast(W)})


def save_clt(
    clt: CrossLayerTranscoder,
    out: str | os.PathLike,
    *,
    stats: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write `clt` in circuit-tracer's layout; with `stats`, fold the normalisation in first.

    `info` (JSON) rides along in config.json (hooks, the activation store, ...)."""
    cfg = clt.cfg
    if cfg.activation in ("topk", "batchtopk"):
        raise StageError(
            f"the circuit-tracer layout has no {cfg.activation} activation; convert with "
            "CrossLayerTranscoder.to_jumprelu(inputs) first"
        )
    if stats is not None:
        clt = fold_normalization(clt, stats)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_layer_files(clt, out)
    write_json(
        out / "config.json",
        {
            "format": FORMAT,
            "clt": cfg.model_dump(mode="json"),
            "normalization_folded": stats is not None,
            **(info or {}),
        },
    )
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    return out


def read_clt_config(path: str | os.PathLike) -> CLTConfig:
    raw = read_json(Path(path) / "config.json")
    if raw.get("format") != FORMAT:
        raise StageError(f"{path}/config.json is not a sparse-circuits CLT config")
    try:
        return CLTConfig(**raw["clt"])
    except (KeyError, TypeError, ValueError) as e:
        raise StageError(f"{path}/config.json: bad 'clt' section: {e}") from e


def load_clt(path: str | os.PathLike, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a CLT dir back (built on the meta device, weights assigned)."""
    path = Path(path)
    if path.is_file():
        raise StageError(f"{path} is a file; give the CLT's directory (the one with config.json)")
    if not path.is_dir():
        raise MissingInputError(f"CLT directory {path} does not exist")
    cfg = read_clt_config(path)
    L, F, M = cfg.n_layers, cfg.d_features, cfg.d_model
    W_enc, b_enc, b_dec, thresholds, state = [], [], [], [], {}
    for i in range(L):
        enc_file, dec_file = path / f"W_enc_{i}.safetensors", path / f"W_dec_{i}.safetensors"
        enc, dec = load_tensors(enc_file), load_tensors(dec_file)
        _expect(enc, f"W_enc_{i}", (F, M), enc_file)
        _expect(enc, f"b_enc_{i}", (F,), enc_file)
        _expect(enc, f"b_dec_{i}", (M,), enc_file)
        _expect(dec, f"W_dec_{i}", (F, L - i, M), dec_file)
        W_enc.append(enc[f"W_enc_{i}"])
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        if cfg.activation == "jumprelu":
            _expect(enc, f"threshold_{i}", (F,), enc_file)
            thresholds.append(enc[f"threshold_{i}"])
        W = dec[f"W_dec_{i}"]
        K = cfg.decoder_layers[i]
        if K < W.shape[1] and W[:, K:].any():
            raise StageError(
                f"{dec_file}: a per-layer transcoder with nonzero decoders to later layers"
            )
        state[f"W_dec.{i}"] = W[:, :K].float().contiguous()
    state.update(
        W_enc=torch.stack(W_enc).float(),
        b_enc=torch.stack(b_enc).float(),
        b_dec=torch.stack(b_dec).float(),
    )
    if thresholds:
        state["log_threshold"] = torch.stack(thresholds).float().log()
    return _build(cfg, state).to(device)


def _expect(tensors: dict[str, torch.Tensor], name: str, shape: tuple, source: Path) -> None:
    if name not in tensors:
        raise StageError(f"{source}: missing tensor {name}")
    if tuple(tensors[name].shape) != shape:
        raise StageError(
            f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}"
        )
