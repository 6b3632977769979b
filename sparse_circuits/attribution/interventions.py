"""Interventions on the replacement model: ablate, scale or set features and rerun.

Shape letters: T positions, L layers, F features per layer, M d_model, V vocab.

The replacement model runs the original model with each MLP output replaced by
    Σ_{i≤l} a_i · W_dec[i][:, l-i] + b_dec[l] + error_l
where error_l is the prompt's (held fixed, as in the graph) and a_i are the CLT's activations
of the run's own MLP inputs, except the features intervened on. Attention can be frozen at
the prompt's patterns (with the norms' scales, as in the graph) or free (recomputed, gates
included). With `freeze_features`, every feature not intervened on keeps its prompt
activation: the run then measures direct effects only, which is what a graph's edges are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..sparse_attention.hooks import hooks
from .replacement import PromptRun, ReplacementModel, norm_scale_hooks


class FeatureIntervention(NamedTuple):
    layer: int
    pos: int
    feature: int
    value: float | None = None  # set the activation to this (0: ablate)
    scale: float | None = None  # or multiply the prompt's activation by this


class InterventionResult(NamedTuple):
    logits: torch.Tensor  # T,V
    pre_acts: torch.Tensor  # T,L,F  of this run's MLP inputs
    features: torch.Tensor  # T,L,F  the activations used (after interventions)


def ablate(layer: int, pos: int, feature: int) -> FeatureIntervention:
    return FeatureIntervention(layer, pos, feature, value=0.0)


def _check(
    rm: ReplacementModel, run: PromptRun, interventions: Sequence[FeatureIntervention]
) -> None:
    L, F = rm.cfg.n_layers, rm.clt.cfg.d_features
    for iv in interventions:
        if not (0 <= iv.layer < L and 0 <= iv.pos < run.n_pos and 0 <= iv.feature < F):
            raise ValueError(
                f"no feature at layer {iv.layer}, position {iv.pos}, index {iv.feature}"
            )
        if (iv.value is None) == (iv.scale is None):
            raise ValueError(f"intervention {iv} needs exactly one of value and scale")
        if not bool(run.feature_mask[iv.pos]):
            raise ValueError(
                f"position {iv.pos} holds no features (BOS; its error node holds the MLP output)"
            )


@torch.no_grad()
def intervene(
    rm: ReplacementModel,
    run: PromptRun,
    interventions: Sequence[FeatureIntervention] = (),
    *,
    freeze_attention: bool = True,
    freeze_norms: bool | None = None,
    freeze_features: bool = False,
    add: dict[str, torch.Tensor] | None = None,
    tokens: torch.Tensor | None = None,
) -> InterventionResult:
    """Run the replacement model on `run`'s prompt (or on `tokens` at the same positions).

    freeze_norms defaults to freeze_attention. `add` maps hook names to T,M tensors added
    to those values (after the MLP replacement at `blocks.{l}.hook_mlp_out`)."""
    _check(rm, run, interventions)
    model, clt, L = rm.model, rm.clt, rm.cfg.n_layers
    freeze_norms = freeze_attention if freeze_norms is None else freeze_norms
    tokens = run.tokens if tokens is None else tokens.to(run.tokens.device)
    if tokens.shape != run.tokens.shape:
        raise ValueError(
            f"the prompt has {run.n_pos} positions, got tokens of shape {tuple(tokens.shape)}"
        )
    add = dict(add or {})
    mlp_adds = {name: add.pop(name) for name in list(add) if name.endswith("hook_mlp_out")}
    pre_acts, features = run.pre_acts.clone(), run.features.clone()
    by_layer: dict[int, list[FeatureIntervention]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv)

    fns = {}
    if freeze_attention:
        for li in range(L):
            fns[f"blocks.{li}.attn.hook_pattern"] = lambda _x, v=run.patterns[li][None]: v
    if freeze_norms:
        for name in norm_scale_hooks(L):
            fns[name] = lambda _x, v=run.scales[name][None]: v
    for li in range(L):

        def mlp_in(x: torch.Tensor, li=li) -> None:
            pre_acts[:, li] = clt.encode_layer(x[0].to(clt.W_enc.dtype), li)  # T,F

        def mlp_out(_x: torch.Tensor, li=li) -> torch.Tensor:
            a = (
                run.features[:, li]
                if freeze_features
                else rm.activate_layer(pre_acts[:, li], li, pre_acts, run.feature_mask)
            )
            a = a.clone()
            for iv in by_layer.get(li, []):
                a[iv.pos, iv.feature] = (
                    iv.value
                    if iv.value is not None
                    else iv.scale * run.features[iv.pos, li, iv.feature]
                )
            features[:, li] = a
            decoded = rm.decoder_output(features, li, run.feature_mask)
            out = decoded.to(run.errors.dtype) + run.errors[li]
            return (out + mlp_adds.get(f"blocks.{li}.hook_mlp_out", 0))[None]

        fns[f"blocks.{li}.hook_mlp_in"] = mlp_in
        fns[f"blocks.{li}.hook_mlp_out"] = mlp_out
    for name, delta in add.items():
        inner = fns.get(name)

        def added(x: torch.Tensor, d=delta, inner=inner) -> torch.Tensor:
            y = inner(x) if inner is not None else None
            return (x if y is None else y) + d

        fns[name] = added
    with hooks(model, fns):
        logits = model(tokens[None]).logits[0]
    return InterventionResult(logits, pre_acts, features)
