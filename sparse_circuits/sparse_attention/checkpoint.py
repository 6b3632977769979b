"""Import a Hugging Face checkpoint directory (GPT-2, Llama, Qwen2) without `transformers`.

A checkpoint directory holds config.json, the weights as one `model.safetensors` or as shards
`model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`, and maybe a
`tokenizer.json`. Import is three small tables per family: the config keys, the parameter names
(Hugging Face name -> ours), and the tensors to transpose (GPT-2's Conv1D stores weights as
[in, out]; ours, like nn.Linear, are [out, in]). GPT-2's fused `c_attn` is split into q, k, v.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from tokenizers import Tokenizer

from ..errors import MissingInputError, StageError
from ..io import read_json
from .model import ModelConfig, Transformer, rope_inverse_frequencies

log = logging.getLogger(__name__)

# Hugging Face `model_type` -> the causal-LM architectures we import for it.
ARCHITECTURES = {
    "gpt2": {"GPT2LMHeadModel"},
    "llama": {"LlamaForCausalLM"},
    "qwen2": {"Qwen2ForCausalLM"},
}

ACTIVATIONS = {  # Hugging Face activation names -> ours
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
}


# ----------------------------------------------------------------------------- parameter tables


def _fill(name: str, layer: str | None) -> str:
    return name if layer is None else name.replace("{l}", layer)


class KeyTable:
    """How one family's Hugging Face tensor names map onto ours.

    `keys` maps a name (without `prefix`; `{l}` is the layer index) to our name, or to a tuple of
    our names for a fused tensor split along dim 0 (after any transpose). `transposed` lists the
    names stored [in, out]; `ignored` are regexes for buffers some checkpoints carry.
    """

    def __init__(
        self,
        prefix: str,
        keys: dict[str, str | tuple[str, ...]],
        transposed: frozenset[str],
        ignored: tuple[str, ...],
    ):
        self.prefix, self.transposed, self.ignored = prefix, transposed, ignored
        self.keys = {k: v if isinstance(v, tuple) else (v,) for k, v in keys.items()}
        self._regexes = {k: re.compile(re.escape(k).replace(r"\{l\}", r"(\d+)")) for k in keys}

    def strip(self, name: str) -> str:
        return name[len(self.prefix) :] if name.startswith(self.prefix) else name

    def lookup(self, name: str) -> tuple[tuple[str, ...], bool] | None:
        """Our names for a Hugging Face name and whether it is transposed; None if unknown."""
        name = self.strip(name)
        for pattern, regex in self._regexes.items():
            if m := regex.fullmatch(name):
                layer = m.group(1) if regex.groups else None
                ours = tuple(_fill(o, layer) for o in self.keys[pattern])
                return ours, pattern in self.transposed
        return None

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(r, self.strip(name)) for r in self.ignored)

    def hf_names(self, n_layers: int) -> dict[str, tuple[str, ...]]:
        """Every Hugging Face name (with the usual prefix) -> our names, for n_layers layers."""
        out = {}
        for pattern, ours in self.keys.items():
            full = pattern if pattern == "lm_head.weight" else self.prefix + pattern
            layers = [str(i) for i in range(n_layers)] if "{l}" in pattern else [None]
            for layer in layers:
                out[_fill(full, layer)] = tuple(_fill(o, layer) for o in ours)
        return out


def _qkv(part: str) -> tuple[str, str, str]:
    return tuple(f"blocks.{{l}}.attn.{p}_proj.{part}" for p in "qkv")


GPT2_KEYS = KeyTable(
    prefix="transformer.",
    keys={
        "wte.weight": "embed.weight",
        "wpe.weight": "pos_embed.weight",
        "h.{l}.ln_1.weight": "blocks.{l}.attn_norm.weight",
        "h.{l}.ln_1.bias": "blocks.{l}.attn_norm.bias",
        "h.{l}.attn.c_attn.weight": _qkv("weight"),  # fused q, k, v
        "h.{l}.attn.c_attn.bias": _qkv("bias"),
        "h.{l}.attn.c_proj.weight": "blocks.{l}.attn.o_proj.weight",
        "h.{l}.attn.c_proj.bias": "blocks.{l}.attn.o_proj.bias",
        "h.{l}.ln_2.weight": "blocks.{l}.mlp_norm.weight",
        "h.{l}.ln_2.bias": "blocks.{l}.mlp_norm.bias",
        "h.{l}.mlp.c_fc.weight": "blocks.{l}.mlp.up_proj.weight",
        "h.{l}.mlp.c_fc.bias": "blocks.{l}.mlp.up_proj.bias",
        "h.{l}.mlp.c_proj.weight": "blocks.{l}.mlp.down_proj.weight",
        "h.{l}.mlp.c_proj.bias": "blocks.{l}.mlp.down_proj.bias",
        "ln_f.weight": "final_norm.weight",
        "ln_f.bias": "final_norm.bias",
        "lm_head.weight": "lm_head.weight",
    },
    transposed=frozenset(
        {
            "h.{l}.attn.c_attn.weight",
            "h.{l}.attn.c_proj.weight",
            "h.{l}.mlp.c_fc.weight",
            "h.{l}.mlp.c_proj.weight",
        }
    ),
    ignored=(r"h\.\d+\.attn\.bias", r"h\.\d+\.attn\.masked_bias"),  # causal-mask buffers
)

LLAMA_KEYS = KeyTable(
    prefix="model.",
    keys={
        "embed_tokens.weight": "embed.weight",
        "layers.{l}.input_layernorm.weight": "blocks.{l}.attn_norm.weight",
        **{
            f"layers.{{l}}.self_attn.{p}_proj.weight": f"blocks.{{l}}.attn.{p}_proj.weight"
            for p in "qkvo"
        },
        **{
            f"layers.{{l}}.self_attn.{p}_proj.bias": f"blocks.{{l}}.attn.{p}_proj.bias"
            for p in "qkv"
        },  # Qwen2
        "layers.{l}.post_attention_layernorm.weight": "blocks.{l}.mlp_norm.weight",
        **{
            f"layers.{{l}}.mlp.{p}_proj.weight": f"blocks.{{l}}.mlp.{p}_proj.weight"
            for p in ("gate", "up", "down")
        },
        "norm.weight": "final_norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    transposed=frozenset(),
    ignored=(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",),
)

TABLES = {"gpt2": GPT2_KEYS, "llama": LLAMA_KEYS, "qwen2": LLAMA_KEYS}


# ----------------------------------------------------------------------------- config


def _need(raw: dict, key: str, source: Path):
    if raw.get(key) is None:
        raise StageError(f"{source} lacks the required key {key!r}")
    return raw[key]


def _token_id(value) -> int | None:
    """bos/eos ids: an int, a list of ints (Llama 3 instruct lists several eos ids), or None."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _activation(name: str, source: Path) -> str:
    if name not in ACTIVATIONS:
        raise StageError(
            f"{source}: unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})"
        )
    return ACTIVATIONS[name]


def _rope(raw: dict, source: Path) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from transformers v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters")
    if params is None:  # transformers v4 spelling
        params = {"rope_theta": raw.get("rope_theta", 10000.0), **(raw.get("rope_scaling") or {})}
    elif "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # v5 per-layer-type form
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise StageError(f"{source}: unsupported RoPE type {kind!r} (supported: default, llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if f not in params]
    if missing:
        raise StageError(f"{source}: llama3 RoPE scaling lacks {missing}")
    return theta, {"rope_type": "llama3", **{f: params[f] for f in fields}}


def _gpt2_fields(raw: dict, source: Path) -> dict:
    if not raw.get("scale_attn_weights", True) or raw.get("scale_attn_by_inverse_layer_idx", False):
        raise StageError(
            f"{source}: GPT-2 attention without the 1/sqrt(d) scale, or scaled by layer, is not supported"
        )
    if raw.get("add_cross_attention", False):
        raise StageError(f"{source}: GPT-2 with cross-attention is not a decoder-only model")
    d_model = _need(raw, "n_embd", source)
    return dict(
        family="gpt2",
        vocab_size=_need(raw, "vocab_size", source),
        n_layers=_need(raw, "n_layer", source),
        d_model=d_model,
        n_heads=_need(raw, "n_head", source),
        d_mlp=raw.get("n_inner") or 4 * d_model,
        context_length=raw.get("n_positions") or _need(raw, "n_ctx", source),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        bias=True,
        tie_embeddings=raw.get("tie_word_embeddings", True),
        mlp_activation=_activation(raw.get("activation_function", "gelu_new"), source),
    )


def _llama_fields(raw: dict, model_type: str, source: Path) -> dict:
    # Options our Llama block does not have: refuse them rather than import a different model.
    if raw.get("attention_bias", False):
        raise StageError(f"{source}: attention_bias=true (a bias on o_proj) is not supported")
    if raw.get("mlp_bias", False):
        raise StageError(f"{source}: mlp_bias=true is not supported")
    if raw.get("use_sliding_window", False):
        raise StageError(f"{source}: sliding-window attention is not supported")
    theta, scaling = _rope(raw, source)
    n_heads = _need(raw, "num_attention_heads", source)
    d_model = _need(raw, "hidden_size", source)
    return dict(
        family="llama",
        vocab_size=_need(raw, "vocab_size", source),
        n_layers=_need(raw, "num_hidden_layers", source),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        d_head=raw.get("head_dim") or d_model // n_heads,
        d_mlp=_need(raw, "intermediate_size", source),
        context_length=_need(raw, "max_position_embeddings", source),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=raw.get("tie_word_embeddings", False),
        rope_theta=theta,
        rope_scaling=scaling,
        mlp_activation=_activation(raw.get("hidden_act", "silu"), source),
    )


def hf_model_config(
    raw: dict, source: str | os.PathLike = "config.json"
) -> tuple[ModelConfig, str]:
    """Our ModelConfig from a Hugging Face config.json dict; also returns its model_type."""
    source = Path(source)
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise StageError(
            f"{source}: unsupported model_type {model_type!r} (supported: {sorted(ARCHITECTURES)})"
        )
    architectures = raw.get("architectures") or []
    unknown = [a for a in architectures if a not in ARCHITECTURES[model_type]]
    if unknown:
        raise StageError(
            f"{source}: unsupported architecture {unknown[0]!r} for model_type {model_type!r} "
            f"(supported: {sorted(ARCHITECTURES[model_type])})"
        )
    fields = (
        _gpt2_fields(raw, source)
        if model_type == "gpt2"
        else _llama_fields(raw, model_type, source)
    )
    fields.update(
        bos_token_id=_token_id(raw.get("bos_token_id")),
        eos_token_id=_token_id(raw.get("eos_token_id")),
    )
    try:
        return ModelConfig(**fields), model_type
    except ValidationError as e:
        raise StageError(f"{source}: {e}") from e


# ----------------------------------------------------------------------------- weights


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint dir: the index's shards, or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise StageError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingInputError(f"{index} names shards that do not exist: {missing}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    hint = ""
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        hint = "; pickled weights (*.bin, *.pt) are not loaded, convert them to safetensors"
    raise MissingInputError(
        f"no safetensors weights in {path}: expected model.safetensors or model.safetensors.index.json{hint}"
    )


def _read_weights(
    files: list[Path], table: KeyTable, expected: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Our state dict from the files, checking names and shapes against `expected` (ours)."""
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own types for truncated or corrupt files
            raise StageError(f"{file} is not a readable safetensors file: {e}") from e
        with handle as f:
            for name in f.keys():
                found = table.lookup(name)
                if found is None:
                    if not table.is_ignored(name):
                        unexpected.append(name)
                    continue
                ours, transposed = found
                if ours == ("lm_head.weight",) and "lm_head.weight" not in expected:
                    continue  # tied embeddings: some checkpoints store the head anyway
                if any(o not in expected for o in ours):
                    unexpected.append(name)
                    continue
                # the stored shape: fused parts stack on dim 0, Conv1D weights are [in, out]
                rows = sum(expected[o][0] for o in ours)
                want = (rows, *expected[ours[0]][1:])
                want = want[::-1] if transposed else want
                shape = tuple(f.get_slice(name).get_shape())
                if shape != want:
                    raise StageError(f"{file}: tensor {name} has shape {shape}, expected {want}")
                tensor = f.get_tensor(name)
                if transposed:
                    tensor = tensor.T.contiguous()
                parts = tensor.split([expected[o][0] for o in ours]) if len(ours) > 1 else (tensor,)
                for o, part in zip(ours, parts, strict=True):
                    # clone splits: tensors sharing storage cannot be saved to safetensors later
                    state[o] = part.clone() if len(ours) > 1 else part
    if unexpected:
        raise StageError(
            f"{files[0].parent}: unexpected tensors {sorted(unexpected)[:5]} (wrong family or layer count?)"
        )
    return state


def import_hf_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Our Transformer (and tokenizer, if the dir has tokenizer.json) from a Hugging Face checkpoint dir.

    Weights keep the checkpoint's dtype (that of the embedding) unless `dtype` is given.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingInputError(f"checkpoint directory {path} does not exist")
    cfg, model_type = hf_model_config(read_json(path / "config.json"), path / "config.json")
    table = TABLES[model_type]
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {
        k: v.shape
        for k, v in model.state_dict().items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    state = _read_weights(weight_files(path), table, expected)
    missing = [
        hf
        for hf, ours in table.hf_names(cfg.n_layers).items()
        if all(o in expected for o in ours) and any(o not in state for o in ours)
    ]
    if missing:
        raise StageError(
            f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    dtype = dtype or state["embed.weight"].dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if cfg.family == "llama":  # non-persistent buffer: rebuild it off the meta device
        model.rope_inv_freq = rope_inverse_frequencies(cfg)
    log.info("imported %s checkpoint %s (%d parameters)", model_type, path, model.num_parameters())
    return model, _load_tokenizer(path)


def _load_tokenizer(path: Path) -> Tokenizer | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise StageError(f"{file} is not a readable tokenizers file: {e}") from e
