"""Our model directory: config.json + model.safetensors + tokenizer.json (+ metrics.json).

`load_model` also takes a Hugging Face checkpoint directory (GPT-2, Llama, Qwen2), which it
imports through `checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from ..config import validation_message
from ..errors import MissingInputError, StageError
from ..io import atomic_path, load_tensors, read_json, save_tensors, write_json
from .model import ModelConfig, Transformer, rope_inverse_frequencies

FORMAT = "sparse-circuits-model"


def save_model(
    model: Transformer,
    out: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    metrics: dict | None = None,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (model.cfg.tie_embeddings and k == "lm_head.weight")
    }
    save_tensors(out / "model.safetensors", state, metadata={"format": FORMAT})
    if tokenizer is not None:
        with atomic_path(out / "tokenizer.json") as tmp:
            tmp.write_text(tokenizer.to_str())
    write_json(out / "config.json", {"format": FORMAT, **model.cfg.model_dump(mode="json")})
    if metrics is not None:  # last: a stage that writes more files writes metrics.json itself
        write_json(out / "metrics.json", metrics)
    return out


def is_own_model_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("format") == FORMAT


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    raw = read_json(Path(path) / "config.json")
    if raw.get("format") != FORMAT:
        raise StageError(f"{path}/config.json is not a sparse-circuits model config")
    raw = {k: v for k, v in raw.items() if k != "format"}
    try:
        return ModelConfig(**raw)
    except ValidationError as e:
        raise StageError(f"{path}/config.json: {validation_message(e)}") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise StageError(
            f"{file} is not a readable tokenizer: {' '.join(str(e).split())}"
        ) from None


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer | None]:
    """Load our model dir, or import a Hugging Face checkpoint dir."""
    path = Path(path)
    if path.is_file():
        raise StageError(f"{path} is a file; give the model's directory (the one with config.json)")
    if not path.is_dir():
        raise MissingInputError(f"model directory {path} does not exist")
    raw = read_json(path / "config.json")
    if raw.get("format") != FORMAT:
        from .checkpoint import import_hf_checkpoint  # noqa: PLC0415  (HF import only when needed)

        model, tok = import_hf_checkpoint(path)
        return model.to(device), tok
    cfg = read_model_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_tensors(path / "model.safetensors")
    load_state_strict(model, state, source=path / "model.safetensors")
    return model.to(device), load_tokenizer(path)


def load_state_strict(model: Transformer, state: dict[str, torch.Tensor], source) -> None:
    """Assign weights, naming any missing, unexpected or misshapen tensor."""
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (model.cfg.tie_embeddings and k == "lm_head.weight")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StageError(
            f"{source}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise StageError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if model.cfg.family == "llama":  # non-persistent buffer: rebuild it off the meta device
        model.rope_inv_freq = rope_inverse_frequencies(model.cfg).to(model.embed.weight.device)


def model_sha256(model: Transformer) -> str:
    """sha256 over the config (gate settings included) and every weight tensor, by name."""
    h = hashlib.sha256(json.dumps(model.cfg.model_dump(mode="json"), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
