"""A data dir that is an s3:// prefix (the loopback moto server of conftest.py), end to end.

The server and two workers share one database and one prefix, each with its own cache dir (as
on three machines): a job submitted over HTTP runs on one worker, the next job reads its result
on the other, and the server serves what they wrote (transcoders, their curves, graphs) from
its own cache, which it fetches from the prefix. A job a worker was stopped in the middle of
resumes on the other worker from the first one's checkpoint. Each job record names the host
and pid of the process that ran it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from waiting import wait_for

from sparse_circuits import storage
from sparse_circuits.clt.train import TrainCLTConfig, train_clt
from sparse_circuits.jobs import queue
from sparse_circuits.jobs.db import migrate
from sparse_circuits.jobs.runner import ATTEMPTS_FILE
from sparse_circuits.server.app import create_app
from sparse_circuits.server.keys import create_key
from sparse_circuits.server.mirror import ArtifactMirror
from sparse_circuits.server.settings import ServerSettings
from sparse_circuits.storage import MANIFEST

CLT = {
    "activations": "activations/tiny.zarr", "d_features": 32, "batch_size": 32,
    "checkpoint_every": 10, "eval_steps": 5, "device": "cpu", "autocast": False,
}  # fmt: skip


@pytest.fixture
def prefix(s3_bucket, monkeypatch) -> str:
    """An empty data dir on S3; the S3 settings in the environment (the workers inherit them)."""
    bucket, options = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return f"s3://{bucket}/lab-data"


class Service:
    """The server (in this process, its cache under XDG_CACHE_HOME) and workers (processes)."""

    def __init__(self, tmp_path: Path, url: str, monkeypatch):
        self.tmp, self.url = tmp_path, url
        self.db = f"sqlite:///{tmp_path / 'service.db'}"
        migrate(self.db)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "server-cache"))
        settings = ServerSettings(data_dir=url, database_url=self.db, inline_graph_budget_s=0)
        self.app = create_app(settings)
        self.cache = settings.data_dir
        with self.app.state.sessionmaker() as session:
            self.headers = {"X-API-Key": create_key(session, name="test")[1]}
        self.client = TestClient(self.app)
        self.mirror = ArtifactMirror(self.app)
        self.workers: list[subprocess.Popen] = []

    def worker(self, name: str, *flags: str, cache: Path | None = None) -> Path:
        """Start `sparse-circuits worker` on the prefix, as on a machine of its own: with
        `cache`, `--data-url URL --data-dir CACHE`; else `--data-dir URL`, the cache then the
        default one under its own XDG_CACHE_HOME. Returns its cache dir."""
        home = self.tmp / f"home-{name}"
        if cache is not None:
            where = ["--data-url", self.url, "--data-dir", str(cache)]
        else:
            where = ["--data-dir", self.url]
            cache = home / "sparse-circuits" / "data" / self.url.split("://", 1)[1]
        cmd = [
            sys.executable, "-m", "sparse_circuits.cli", "worker", *where, "--database-url",
            self.db, "--worker-id", name, "--poll-s", "0.2", "--heartbeat-s", "1",
            "--lease-s", "15", *flags,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(home)}
        log = open(self.tmp / f"worker-{name}.log", "a")  # noqa: SIM115  (the process owns it)
        self.workers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        return cache

    def worker_of(self, job_id: str) -> str:
        """The worker that holds or held the job (the record's worker_id)."""
        with self.app.state.sessionmaker() as session:
            return queue.get_job(session, job_id=job_id).worker_id

    def submit(self, kind: str, config: dict) -> str:
        r = self.client.post(
            "/v1/jobs", json={"kind": kind, "config": config}, headers=self.headers
        )
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait_done(self, job_id: str, timeout: float = 300.0) -> dict:
        job = wait_for(
            f"job {job_id} to end",
            lambda: (j := self.job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
            timeout=timeout,
        )
        assert job["state"] == "succeeded", (job["error"], job["log_tail"], self.logs())
        return job

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("worker-*.log")))

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.client.close()
        self.app.state.engine.dispose()


@pytest.fixture
def service(tmp_path, prefix, monkeypatch, tiny_model_dir, token_file):
    """The service on the prefix, which holds the tiny model and its token file."""
    storage.put_dir(tiny_model_dir, f"{prefix}/models/tiny")
    storage.put_file(token_file, f"{prefix}/tokens.npy")
    made = Service(tmp_path, prefix, monkeypatch)
    try:
        yield made
    finally:
        made.close()


def _attempts(cache: Path, job_id: str) -> list[dict]:
    return [json.loads(x) for x in (cache / "jobs" / job_id / ATTEMPTS_FILE).open()]


def _same_weights(got: Path, want: Path) -> None:
    files = sorted(p.name for p in want.glob("W_*.safetensors"))
    assert files and files == sorted(p.name for p in got.glob("W_*.safetensors"))
    for name in files:
        expected, saved = load_file(want / name), load_file(got / name)
        for key in expected:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-5, atol=1e-6)


def test_jobs_on_an_s3_data_dir_run_on_workers_with_their_own_caches(
    service, tmp_path, graph_artifacts
):
    cache_a = service.worker("a", "--kinds", "harvest", "eval-clt", cache=tmp_path / "a-cache")
    cache_b = service.worker("b", "--kinds", "train-clt", "attribute")

    # 1. harvest on worker a: the model and tokens fetched into a's cache, the store on S3
    harvest = service.submit("harvest", {
        "model": "models/tiny", "tokens_file": "tokens.npy", "out": "activations/tiny.zarr",
        "device": "cpu",
    })  # fmt: skip
    job = service.wait_done(harvest)
    store_url = f"{service.url}/activations/tiny.zarr"
    assert job["result"] == store_url and service.worker_of(harvest) == "a"
    runner = _attempts(cache_a, harvest)[-1]  # the record names the process that ran it
    assert (job["host"], job["pid"]) == (runner["host"], runner["pid"]) == (
        socket.gethostname(), runner["pid"],
    )  # fmt: skip
    assert (cache_a / "models/tiny/model.safetensors").is_file()
    assert not (cache_a / "activations").exists()  # read and written on S3, never copied

    # 2. train-clt on worker b (its own cache): the store read from S3, the CLT uploaded whole
    clt_job = service.submit("train-clt", {**CLT, "steps": 20, "out": "clts/c"})
    job = service.wait_done(clt_job)
    assert (service.worker_of(clt_job), job["result"]) == ("b", "clts/c")
    assert (job["host"], job["pid"]) == (
        socket.gethostname(),
        _attempts(cache_b, clt_job)[-1]["pid"],
    )
    manifest = storage.read_manifest(f"{service.url}/clts/c")
    assert (manifest["state"], manifest["job_id"], manifest["attempt"]) == ("complete", clt_job, 1)
    assert storage.dir_complete(f"{service.url}/clts/c")
    # the same config run by the stage itself on the same store gives the same CLT
    direct = train_clt(TrainCLTConfig(**{**CLT, "steps": 20, "activations": store_url,
                                         "out": tmp_path / "direct"}))  # fmt: skip
    _same_weights(cache_b / "clts/c", direct)

    # 3. eval-clt on worker a reads b's CLT from the prefix and writes into it
    eval_job = service.submit("eval-clt", {
        "clt": "clts/c", "model": "models/tiny", "tokens_file": "tokens.npy", "tokens": 256,
        "device": "cpu",
    })  # fmt: skip
    service.wait_done(eval_job)
    _same_weights(cache_a / "clts/c", cache_b / "clts/c")
    evaluated = json.loads((cache_a / "clts/c/metrics.json").read_text())
    assert "spliced_ce_delta" in evaluated
    assert storage.read_manifest(f"{service.url}/clts/c")["job_id"] == eval_job

    # the server lists the CLT with the evaluation's metrics and its lineage, and serves its
    # curve and files from its own cache, fetched from the prefix
    assert "clts/c" in service.mirror.sync()
    (clt,) = service.client.get("/v1/transcoders").json()["data"]
    assert clt["path"] == "clts/c" and clt["metrics"] == evaluated
    stores = service.client.get("/v1/stores").json()["data"]
    assert [s["path"] for s in stores] == [store_url] and clt["store_id"] == stores[0]["id"]
    curve = service.client.get(f"/v1/transcoders/{clt['id']}/metrics-log").json()
    assert [r["step"] for r in curve] == list(range(1, 21))
    _same_weights(service.cache / "clts/c", cache_b / "clts/c")
    assert json.loads((service.cache / "clts/c/metrics.json").read_text()) == evaluated
    assert service.mirror.sync() == []  # nothing changed: nothing fetched again

    # 4. a graph asked of the server is made by a job on worker b and served by the server
    ids = {}
    for plural, folder, src in (("models", "models", graph_artifacts.model),
                                ("transcoders", "clts", graph_artifacts.clt)):  # fmt: skip
        storage.put_dir(src, f"{service.url}/{folder}/{src.name}")
        r = service.client.post(f"/v1/{plural}/register", json={"path": f"{folder}/{src.name}"},
                                headers=service.headers)  # fmt: skip
        assert r.status_code == 201, r.text
        ids[plural] = r.json()["id"]
    r = service.client.post("/v1/graphs", headers=service.headers, json={
        "model": ids["models"], "transcoder": ids["transcoders"], "prompt": "<bos>12+34=",
    })  # fmt: skip
    assert r.status_code == 202, r.text
    graph = r.json()
    service.wait_done(graph["job"]["id"])
    assert service.worker_of(graph["job"]["id"]) == "b"
    assert storage.dir_complete(f"{service.url}/{graph['graph']['path']}")
    service.mirror.sync()
    got = service.client.get(f"/v1/graphs/{graph['graph']['id']}/json")
    assert got.status_code == 200, got.text
    assert got.json()["nodes"] and got.json()["metadata"]["prompt_tokens"][-1] == "="


def test_a_job_stopped_on_one_worker_resumes_on_another_from_its_checkpoint(service, tmp_path):
    cache_a = service.worker("a", cache=tmp_path / "a-cache")
    worker_a = service.workers[-1]
    service.wait_done(service.submit("harvest", {
        "model": "models/tiny", "tokens_file": "tokens.npy", "out": "activations/tiny.zarr",
        "device": "cpu",
    }))  # fmt: skip
    steps = 2000  # long enough that the stop lands mid-run on an idle machine
    job_id = service.submit("train-clt", {**CLT, "steps": steps, "out": "clts/moved"})
    wait_for("the job to train a while", lambda: (service.job(job_id)["step"] or 0) >= 30)
    worker_a.send_signal(signal.SIGTERM)  # stops at the next step, uploads, requeues
    assert worker_a.wait(120) == 0
    job = service.job(job_id)
    assert job["state"] == "queued" and 30 <= job["step"] < steps
    manifest = storage.read_manifest(f"{service.url}/clts/moved")
    assert manifest["state"] == "partial" and "checkpoints/latest" in manifest["files"]
    stopped_at = int((cache_a / "clts/moved/checkpoints/latest").read_text().split("_")[1])
    assert stopped_at >= 30

    cache_b = service.worker("b", "--idle-exit-s", "2")
    job = service.wait_done(job_id)
    assert service.worker_of(job_id) == "b" and job["step"] == steps and job["attempts"] == 1
    log = (cache_b / "jobs" / job_id / "log.txt").read_text()
    assert "resumed" in log  # from a's checkpoint, fetched from the prefix, not from zero
    steps_run = [json.loads(x)["step"] for x in (cache_b / "clts/moved/metrics.jsonl").open()]
    assert steps_run == list(range(1, steps + 1))  # each step once, a's included
    manifest = storage.read_manifest(f"{service.url}/clts/moved")
    assert manifest["state"] == "complete" and MANIFEST not in manifest["files"]
