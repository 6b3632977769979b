"""Fixtures shared by the test files: tiny models and data built here, a loopback S3 server."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from sparse_circuits.sparse_attention.model import GateConfig, ModelConfig, Transformer
from sparse_circuits.sparse_attention.modeldir import save_model

TINY_VOCAB, TINY_BOS, TINY_SEQ_LEN = 50, 0, 16

# Eager attention tiles in the tests (and the CLIs they start): compiling them repays itself
# over a training run, not over a test of a few steps. test_gated_attention.py checks the
# compiled tiles explicitly.
os.environ.setdefault("SPARSE_CIRCUITS_COMPILE", "0")


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


# ----------------------------------------------------------------------------- databases


def _postgres_bin(name: str) -> str | None:
    import glob  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _as_postgres_user() -> list[str]:
    """How to run the server's binaries: initdb refuses root, so root runs them as `postgres`."""
    import os  # noqa: PLC0415
    import pwd  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the session (initdb + pg_ctl in a temp dir, a
    free port, its socket in the temp dir); skipped only where the binaries are absent."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl) are not installed")
    root = tempfile.mkdtemp(prefix="sc-pg-")  # not under pytest's 0700 root-owned tmp
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    runas = _as_postgres_user()
    if runas:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    run = lambda *argv: subprocess.run([*runas, *argv], check=True, capture_output=True)  # noqa: E731
    run(initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    port = _free_port()
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(root, "log.txt"), "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*runas, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """An empty database of its own for one test: a SQLite file, or a fresh database on the
    session's PostgreSQL server (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    import psycopg  # noqa: PLC0415

    server = request.getfixturevalue("postgres_server")
    name = "t_" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    name += f"_{abs(hash(request.node.nodeid)) % 10**8}"
    admin = server.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def migrated_url(database_url):
    """`database_url` migrated to the newest schema."""
    from sparse_circuits.jobs.db import migrate  # noqa: PLC0415

    migrate(database_url)
    return database_url


# ----------------------------------------------------------------------------- the service


class Api(NamedTuple):
    """A test's own service: a TestClient on the app (lifespan run), its data dir, a write key."""

    client: Any
    app: Any
    data_dir: Path
    database_url: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.secret}

    def session(self):
        return self.app.state.sessionmaker()


def make_api(database_url: str, data_dir: Path, **settings) -> Api:
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from sparse_circuits.server.app import create_app  # noqa: PLC0415
    from sparse_circuits.server.keys import create_key  # noqa: PLC0415
    from sparse_circuits.server.settings import ServerSettings  # noqa: PLC0415

    data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(ServerSettings(data_dir=data_dir, database_url=database_url, **settings))
    with app.state.sessionmaker() as session:
        _key, secret = create_key(session, name="test")
    return Api(TestClient(app), app, data_dir, database_url, secret)


@pytest.fixture
def api(migrated_url, tmp_path):
    """The API on a database of its own (SQLite and PostgreSQL) and an empty data dir."""
    made = make_api(migrated_url, tmp_path / "data")
    with made.client:
        yield made


@pytest.fixture
def api_factory(migrated_url, tmp_path):
    """`api` with settings of the test's choosing: `api_factory(read_requires_key=True)`; each
    call another data dir (or `data_dir=`) on the same database."""
    made = []

    def factory(data_dir: Path | None = None, **settings) -> Api:
        data_dir = data_dir or tmp_path / f"data{len(made)}"
        made.append(make_api(migrated_url, data_dir, **settings))
        made[-1].client.__enter__()
        return made[-1]

    yield factory
    for a in made:
        a.client.__exit__(None, None, None)


def service_state(api: Api) -> dict:
    """Every row of every table and every file under the data dir (path, size, mtime): equal
    before and after a request that must write nothing."""
    from sqlalchemy import select  # noqa: PLC0415

    from sparse_circuits.jobs.db import Base  # noqa: PLC0415

    rows = {}
    with api.session() as session:
        for table in Base.metadata.sorted_tables:
            found = session.execute(select(table)).mappings().all()
            rows[table.name] = sorted(repr(sorted(dict(r).items())) for r in found)
    files = sorted(
        (p.relative_to(api.data_dir).as_posix(), p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in api.data_dir.rglob("*")
    )
    return {"rows": rows, "files": files}


@pytest.fixture
def snapshot():
    """`snapshot(api)`: the service's state (`service_state`), to compare before and after."""
    return service_state


class LiveServer(NamedTuple):
    url: str
    api: Api


@pytest.fixture
def live_server(api):
    """`api`'s app under uvicorn on loopback (for streams and the client), in a thread."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    port = _free_port()
    config = uvicorn.Config(
        api.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", api)
    finally:
        server.should_exit = True
        thread.join(10)


# ----------------------------------------------------------------------------- attribution graphs


def firing_clt(model: Transformer, seed: int = 0, d_features: int = 24):
    """A random JumpReLU CLT for `model` whose encoder biases are set from the model's own MLP
    inputs, so that about 40 % of its features fire on a token (attribution has nodes)."""
    import math  # noqa: PLC0415

    from sparse_circuits.clt.model import CLTConfig, CrossLayerTranscoder  # noqa: PLC0415
    from sparse_circuits.sparse_attention.hooks import capture  # noqa: PLC0415

    cfg, L = model.cfg, model.cfg.n_layers
    torch.manual_seed(seed + 100)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=cfg.d_model, d_features=d_features))
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.context_length))
    names = [f"blocks.{li}.hook_mlp_in" for li in range(L)]
    with torch.no_grad(), capture(model, names) as got:
        model(tokens)
    inputs = torch.stack([got[n].flatten(0, 1) for n in names], dim=1)  # N,L,M
    with torch.no_grad():
        clt.W_enc.normal_(0, 1 / math.sqrt(cfg.d_model))
        clt.log_threshold.copy_(torch.empty(L, d_features).uniform_(0.05, 0.5).log())
        clt.init_from_batch(inputs, inputs, fire_rate=0.4)
        for W in clt.W_dec:
            W.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.2)
    return clt.eval()


class GraphArtifacts(NamedTuple):
    root: Path
    model: Path  # root/models/addition-tiny: a sparsified model with the addition tokenizer
    clt: Path  # root/clts/addition-tiny: a CLT of it whose features fire
    tokens: Path  # root/data/addition.npy: sequences over its vocabulary, BOS first


@pytest.fixture(scope="session")
def graph_artifacts(tmp_path_factory) -> GraphArtifacts:
    """A tiny sparsified model over the addition toy's vocabulary (with its tokenizer) and a
    CLT whose features fire, laid out as in a data dir (models/, clts/), for graph tests."""
    from sparse_circuits.clt.cltdir import save_clt  # noqa: PLC0415
    from sparse_circuits.sparse_attention.toy import addition_tokenizer  # noqa: PLC0415

    root = tmp_path_factory.mktemp("graph-artifacts")
    tok = addition_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="gpt2", vocab_size=tok.get_vocab_size(), n_layers=2, d_model=16, n_heads=2,
        d_mlp=32, context_length=12, bias=True, bos_token_id=tok.token_to_id("<bos>"),
        gate=GateConfig(offset=0.0),
    )  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # weights large enough for peaked patterns and closed gates
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.mul_(15.0)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.eval()
    model_dir = save_model(model, root / "models" / "addition-tiny", tokenizer=tok)
    info = {
        "feature_input_hook": "blocks.{layer}.hook_mlp_in",
        "feature_output_hook": "blocks.{layer}.hook_mlp_out",
    }
    clt_dir = save_clt(firing_clt(model), root / "clts" / "addition-tiny", info=info)
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, cfg.vocab_size, size=(24, cfg.context_length))
    seqs[:, 0] = cfg.bos_token_id
    (root / "data").mkdir()
    np.save(root / "data" / "addition.npy", seqs)
    return GraphArtifacts(root, model_dir, clt_dir, root / "data" / "addition.npy")


@pytest.fixture(scope="session")
def toy_pipeline(tmp_path_factory):
    """quickstart's data-dir layout, every stage run for real at a tiny size (seconds, not
    minutes): a dense addition model, its sparsified twin, their activation store, a BatchTopK
    CLT, its evaluation and both quickstart graphs. Tests that change it work on a copy."""
    from sparse_circuits.attribution.attribute import AttributeConfig, run_attribute
    from sparse_circuits.clt.evaluate import EvalCLTConfig, eval_clt
    from sparse_circuits.clt.harvest import HarvestConfig, harvest
    from sparse_circuits.clt.train import TrainCLTConfig, train_clt
    from sparse_circuits.io import released_locks
    from sparse_circuits.quickstart import PROMPTS, paths
    from sparse_circuits.sparse_attention.sparsify import SparsifyConfig, sparsify
    from sparse_circuits.sparse_attention.train import ToyTrainConfig, train_toy

    p = paths(tmp_path_factory.mktemp("pipeline") / "data")
    with released_locks():
        train_toy(ToyTrainConfig(
            out=p.dense, n_layers=2, d_model=32, n_heads=2, steps=30, batch_size=64,
            warmup_steps=5, device="auto",
        ))  # fmt: skip
        sparsify(SparsifyConfig(
            model=p.dense, out=p.sparse, steps=6, batch_size=32, warmup_steps=1,
            eval_sequences=64, select_sequences=32, select_every=2, device="auto",
        ))  # fmt: skip
        harvest(HarvestConfig(model=p.sparse, out=str(p.acts), tokens=2048, device="auto"))
        train_clt(TrainCLTConfig(
            activations=str(p.acts), out=p.clt, d_features=32, batch_size=128, steps=8,
            lr_warmup_steps=1, activation="batchtopk", k=4, device="auto",
        ))  # fmt: skip
        eval_clt(EvalCLTConfig(clt=p.clt, model=p.sparse, device="auto"))
        for prompt, graph in zip(PROMPTS, p.graphs, strict=True):
            run_attribute(AttributeConfig(
                model=p.sparse, clt=p.clt, prompt=prompt, out=graph, max_feature_nodes=16,
                qk_edges=0,
            ))  # fmt: skip
    return p


@pytest.fixture
def worker_process(live_server):
    """A real `sparse-circuits worker` process on the live server's data dir and database
    (short leases and polls, so that tests move quickly); stopped after the test."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    api = live_server.api
    cmd = [
        sys.executable, "-m", "sparse_circuits.cli", "worker", "--data-dir", str(api.data_dir),
        "--database-url", api.database_url, "--poll-s", "0.2", "--heartbeat-s", "1",
        "--lease-s", "15",
    ]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
