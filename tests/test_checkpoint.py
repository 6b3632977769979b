"""Hugging Face checkpoint import, checked against `transformers` itself on tiny random models."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from sparse_circuits.sparse_attention.checkpoint import import_hf_checkpoint
from sparse_circuits.sparse_attention.modeldir import load_model, save_model

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 20
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With rope_theta=100 and head_dim=12 the wavelengths are 6.3, 13.5, 29.2, 62.8, 136, 292:
    # kept (< 32/4), smoothed (8..32) and divided by the factor (> 32) all occur.
    "original_max_position_embeddings": 32,
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that attention is sharp and positions matter; norms and biases non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(0.2 * noise)
            elif name.endswith("weight"):  # a norm's gain
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def _hf_models() -> dict:
    t = transformers
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    llama = dict(
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=48,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
    )
    return {
        "gpt2": t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=32, **common)
        ),
        "llama_gqa": t.LlamaForCausalLM(
            t.LlamaConfig(
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
                **llama,
                **common,
            )
        ),
        "llama3_rope": t.LlamaForCausalLM(
            t.LlamaConfig(
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=12,  # not hidden_size // heads
                rope_theta=100.0,
                rope_scaling=dict(LLAMA3_ROPE),  # transformers edits it in place
                **llama,
                **common,
            )
        ),
        "qwen2": t.Qwen2ForCausalLM(
            t.Qwen2Config(
                num_attention_heads=4,
                num_key_value_heads=1,
                tie_word_embeddings=True,
                **llama,
                **common,
            )
        ),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor, torch.Tensor]]:
    """name -> (checkpoint dir, tokens, transformers' fp32 logits)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, T))
    out = {}
    for i, (name, hf) in enumerate(_hf_models().items()):
        _randomise(hf, seed=i)
        hf.eval()
        with torch.no_grad():
            logits = hf(tokens).logits
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path, max_shard_size="20KB" if name == "llama3_rope" else "1GB")
        out[name] = (path, tokens, logits)
    return out


def _copy(checkpoints, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints[name][0], tmp_path / name))


def _edit_config(path: Path, fn) -> None:
    raw = json.loads((path / "config.json").read_text())
    fn(raw)
    (path / "config.json").write_text(json.dumps(raw))


# ----------------------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama3_rope", "qwen2"])
def test_logits_match_transformers(checkpoints, name):
    path, tokens, expected = checkpoints[name]
    model, tokenizer = load_model(path)
    assert tokenizer is None
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= 1e-4


def test_config_mapping(checkpoints):
    gpt2, _ = import_hf_checkpoint(checkpoints["gpt2"][0])
    assert (gpt2.cfg.family, gpt2.cfg.d_mlp, gpt2.cfg.context_length, gpt2.cfg.mlp_activation) == (
        "gpt2",
        128,
        32,
        "gelu_tanh",
    )
    assert gpt2.cfg.bias and gpt2.cfg.tie_embeddings and gpt2.lm_head.weight is gpt2.embed.weight
    llama, _ = import_hf_checkpoint(checkpoints["llama3_rope"][0])
    assert (llama.cfg.n_kv_heads, llama.cfg.d_head, llama.cfg.rope_theta) == (2, 12, 100.0)
    assert llama.cfg.rope_scaling == LLAMA3_ROPE
    qwen, _ = import_hf_checkpoint(checkpoints["qwen2"][0])
    assert (
        qwen.cfg.qkv_bias
        and not qwen.cfg.bias
        and qwen.cfg.n_kv_heads == 1
        and qwen.cfg.tie_embeddings
    )


def test_sharded_checkpoint_is_sharded(checkpoints):
    path = checkpoints["llama3_rope"][0]
    assert (path / "model.safetensors.index.json").is_file() and not (
        path / "model.safetensors"
    ).exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1


def test_transformers_v4_rope_spelling(checkpoints, tmp_path):
    """transformers v4 wrote rope_theta at the top level and the scaling under rope_scaling."""
    path = _copy(checkpoints, "llama3_rope", tmp_path)

    def to_v4(raw):
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}  # the older key name

    _edit_config(path, to_v4)
    model, _ = load_model(path)
    with torch.no_grad():
        logits = model(checkpoints["llama3_rope"][1]).logits
    assert (logits - checkpoints["llama3_rope"][2]).abs().max().item() <= 1e-4


def test_imported_model_saves_and_reloads(checkpoints, tmp_path):
    """The split c_attn must not leave tensors sharing storage (safetensors refuses those)."""
    path, tokens, _ = checkpoints["gpt2"]
    model, _ = load_model(path)
    ours = save_model(model, tmp_path / "ours")
    again, _ = load_model(ours)
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_bf16_checkpoint_keeps_its_dtype(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama_gqa", tmp_path)
    state = load_file(str(path / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path / "model.safetensors"))
    model, _ = import_hf_checkpoint(path)
    assert model.embed.weight.dtype == torch.bfloat16
    _, tokens, expected = checkpoints["llama_gqa"]
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    model32, _ = import_hf_checkpoint(path, dtype=torch.float32)
    assert model32.embed.weight.dtype == torch.float32


def test_tokenizer_json_is_loaded(checkpoints, tmp_path):
    path = _copy(checkpoints, "qwen2", tmp_path)
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    _, loaded = load_model(path)
    assert loaded is not None and loaded.encode("the cat sat dog").ids == [1, 2, 3, 0]
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizers file"):
        load_model(path)


# ----------------------------------------------------------------------------- bad input


def _set(key, value):
    return lambda raw: raw.__setitem__(key, value)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("llama_gqa", _set("model_type", "bert"), "unsupported model_type 'bert'"),
        (
            "llama_gqa",
            _set("architectures", ["LlamaForSequenceClassification"]),
            "unsupported architecture 'LlamaForSequenceClassification'",
        ),
        ("gpt2", lambda raw: raw.pop("n_embd"), "lacks the required key 'n_embd'"),
        ("gpt2", _set("activation_function", "relu"), "unsupported activation 'relu'"),
        (
            "llama_gqa",
            _set("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "unsupported RoPE type 'linear'",
        ),
        ("llama_gqa", _set("attention_bias", True), "attention_bias"),
        ("llama_gqa", _set("num_hidden_layers", 1), "unexpected tensors"),
        ("llama_gqa", _set("num_hidden_layers", 3), "missing tensors"),
    ],
)
def test_bad_config_is_named(checkpoints, tmp_path, name, edit, message):
    path = _copy(checkpoints, name, tmp_path)
    _edit_config(path, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(path)


def _edit_weights(path: Path, fn) -> None:
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama_gqa", tmp_path)
    _edit_weights(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=re.escape("missing tensors ['model.layers.1.mlp.up_proj.weight']")
    ):
        load_model(path)


def test_untied_head_must_be_present(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama_gqa", tmp_path)
    _edit_weights(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=re.escape("missing tensors ['lm_head.weight']")):
        load_model(path)


@pytest.mark.parametrize(
    ("name", "key", "shape", "message"),
    [
        (
            "llama_gqa",
            "model.layers.0.self_attn.k_proj.weight",
            (32, 32),
            "k_proj.weight has shape (32, 32), expected (16, 32)",
        ),
        # Conv1D weights are [in, out]: the expected shape is given as stored
        (
            "gpt2",
            "transformer.h.0.attn.c_attn.weight",
            (96, 32),
            "c_attn.weight has shape (96, 32), expected (32, 96)",
        ),
    ],
)
def test_misshapen_tensor_is_named(checkpoints, tmp_path, name, key, shape, message):
    path = _copy(checkpoints, name, tmp_path)
    _edit_weights(path, lambda s: s.__setitem__(key, torch.zeros(shape)))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model(path)


def test_unknown_tensor_is_named_and_buffers_are_ignored(checkpoints, tmp_path):
    path = _copy(checkpoints, "gpt2", tmp_path)
    # buffers that old GPT-2 checkpoints carry: ignored
    _edit_weights(
        path,
        lambda s: s.update(
            {
                "transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32),
                "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
            }
        ),
    )
    load_model(path)
    _edit_weights(path, lambda s: s.__setitem__("score.weight", torch.zeros(2, 32)))
    with pytest.raises(ValueError, match=re.escape("unexpected tensors ['score.weight']")):
        load_model(path)


def test_no_safetensors_file(checkpoints, tmp_path):
    path = _copy(checkpoints, "gpt2", tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no safetensors weights .*pickled weights"):
        load_model(path)


def test_missing_shard_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints, "llama3_rope", tmp_path)
    shard = sorted(path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        load_model(path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_hf_checkpoint("/nonexistent/checkpoint")
