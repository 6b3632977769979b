"""Fixtures shared by the test files: tiny models and data built here, a loopback S3 server."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch

from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer
from sparse_circuits.sparse_attention.modeldir import save_model

TINY_VOCAB, TINY_BOS, TINY_SEQ_LEN = 50, 0, 16


def tiny_transformer(
    seed: int = 0, gate_offset: float | None = 0.5, family: str = "gpt2"
) -> Transformer:
    """A random 2-layer model; with gate_offset, a sparsified one (hard gates, as saved)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family=family, vocab_size=TINY_VOCAB, n_layers=2, d_model=16, n_heads=2, d_mlp=32,
        context_length=TINY_SEQ_LEN, bias=family == "gpt2", bos_token_id=TINY_BOS,
        gate=GateConfig(offset=gate_offset) if gate_offset is not None else None,
    )  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the 0.02 init, so layers differ visibly
        for p in model.parameters():
            p.mul_(20.0 if p.ndim > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_model():
    """`tiny_transformer` for tests that build their own (another seed or family)."""
    return tiny_transformer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A sparsified tiny gpt2-family model dir (no tokenizer: data comes as token files)."""
    return save_model(tiny_transformer(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """Same architecture, other weights."""
    return save_model(tiny_transformer(seed=1), tmp_path_factory.mktemp("model") / "other")


@pytest.fixture(scope="session")
def token_file(tmp_path_factory):
    """40 sequences of 16 token ids, BOS at position 0: 600 non-BOS rows."""
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, TINY_VOCAB, size=(40, TINY_SEQ_LEN))
    seqs[:, 0] = TINY_BOS
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, seqs)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto's standalone server) on loopback, for the session."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket (created through boto3) and the storage_options to reach it."""
    import boto3  # noqa: PLC0415  (test extra)

    name = "acts-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["key"], aws_secret_access_key=S3_CREDENTIALS["secret"],
    ).create_bucket(Bucket=name)  # fmt: skip
    return name, {**S3_CREDENTIALS, "endpoint_url": s3_endpoint}
