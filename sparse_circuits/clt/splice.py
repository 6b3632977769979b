"""A CLT in place of a model's MLPs: one layer at a time, inside the model's own forward pass.

Shape letters: B batch, T positions, L layers, F features per layer, M d_model.

The spliced model runs its layers in order; at layer l
    x_l   = the spliced model's own MLP input           (blocks.{l}.hook_mlp_in)
    a_l   = act(x_l · W_enc[l]ᵀ + b_enc[l])
    mlp_l = Σ_{i≤l} a_i · W_dec[i][:, l-i] + b_dec[l]   (replaces blocks.{l}.hook_mlp_out)
so features of layer l see every earlier layer's replacement, never the original MLPs' outputs.
Positions outside `keep` (BOS, which CLTs are trained without) keep the original MLP output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..errors import StageError
from ..sparse_attention.hooks import hooks
from ..sparse_attention.model import Transformer
from ..sparse_attention.modeldir import model_sha256
from .model import CrossLayerTranscoder

log = logging.getLogger(__name__)

# The hook points a CLT of ours reads and writes (train-clt records them in config.json).
FEATURE_INPUT_HOOK = "blocks.{layer}.hook_mlp_in"
FEATURE_OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"

# replacement(layer, mlp_in B,T,M) -> mlp_out B,T,M; called for layers 0, 1, ... in order.
Replacement = Callable[[int, torch.Tensor], torch.Tensor]


def check_compatible(
    model: Transformer, clt: CrossLayerTranscoder, clt_info: dict | None = None
) -> None:
    """Raise a StageError naming both numbers when `clt` cannot stand in for `model`'s MLPs."""
    mc, cc = model.cfg, clt.cfg
    if cc.n_layers != mc.n_layers:
        raise StageError(f"the CLT has {cc.n_layers} layers but the model has {mc.n_layers}")
    if cc.d_model != mc.d_model:
        raise StageError(
            f"the CLT has width (d_model) {cc.d_model} but the model has d_model {mc.d_model}"
        )
    info = clt_info or {}
    for key, ours in (
        ("feature_input_hook", FEATURE_INPUT_HOOK),
        ("feature_output_hook", FEATURE_OUTPUT_HOOK),
    ):
        theirs = info.get(key)
        if theirs is not None and theirs != ours:
            raise StageError(f"the CLT's {key} is {theirs!r}; this code splices CLTs at {ours!r}")


def warn_if_other_model(model: Transformer, clt_info: dict | None) -> bool:
    """Warn when the CLT was trained on activations of other weights than `model`'s (the hash
    its activation store recorded differs). Shapes may fit and the graph still be meaningless;
    a model saved in another dtype also differs, so this warns rather than refuses.
    Call it on the model as loaded, before any dtype change. True when the hashes agree."""
    attrs = ((clt_info or {}).get("activations") or {}).get("attrs") or {}
    recorded = attrs.get("model_sha256")
    if recorded is None:
        return False
    if model_sha256(model) == recorded:
        return True
    log.warning(
        "the CLT was trained on activations of another model (%s, sha256 %s…), not these weights",
        attrs.get("model", "unknown"), recorded[:12],
    )  # fmt: skip
    return False


class CLTSplice:
    """The CLT as a `Replacement`: remembers this forward pass's features layer by layer."""

    def __init__(self, clt: CrossLayerTranscoder):
        self.clt = clt
        self.features: list[torch.Tensor] = []  # a_0 .. a_l, each B,T,F

    def __call__(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            self.features = []
        if layer != len(self.features):
            raise RuntimeError(f"layer {layer} reached before layer {len(self.features)}")
        clt, x = self.clt, mlp_in.to(self.clt.W_enc.dtype)
        self.features.append(clt.activate_layer(clt.encode_layer(x, layer), layer))
        return clt.decode_layer(self.features, layer)


def true_mlp(model: Transformer) -> Replacement:
    """The model's own MLPs as a `Replacement`: a spliced forward with it is the original one."""
    return lambda layer, mlp_in: model.blocks[layer].mlp(mlp_in)


def spliced_logits(
    model: Transformer,
    replacement: Replacement,
    tokens: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B,T,V] of `model` on tokens [B,T] with every MLP output replaced by
    `replacement(layer, mlp_in)` where `keep` [B,T] is True (everywhere without `keep`)."""
    mlp_in: dict[int, torch.Tensor] = {}

    def read(layer: int):
        def fn(x: torch.Tensor) -> None:
            mlp_in[layer] = x

        return fn

    def write(layer: int):
        def fn(out: torch.Tensor) -> torch.Tensor:
            y = replacement(layer, mlp_in.pop(layer)).to(out.dtype)
            return y if keep is None else torch.where(keep[..., None], y, out)

        return fn

    fns = {}
    for layer in range(model.cfg.n_layers):
        fns[FEATURE_INPUT_HOOK.format(layer=layer)] = read(layer)
        fns[FEATURE_OUTPUT_HOOK.format(layer=layer)] = write(layer)
    with hooks(model, fns):
        return model(tokens).logits
