"""Several replicas on one PostgreSQL: two servers (uvicorn on two loopback ports) and two workers,
all real processes, on a database migrated once beforehand by `sparse-circuits db upgrade`.

Jobs are submitted to both servers; one server and one worker are SIGKILLed while jobs run; more
jobs are submitted to the survivor. A new worker takes the dead one's place, as a supervisor would start it. Every job ends succeeded exactly once: one record, one
registered artifact, one runner per attempt and never two at once, the job whose worker died
resumed by the other worker from its checkpoint — and every model is bit-identical to the others
(same config, other `out`), so the interrupted one lost nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import select
from waiting import wait_for

from sparse_circuits.jobs.db import Artifact, Job, make_engine, make_sessionmaker

httpx = pytest.importorskip("httpx")

TOY = dict(
    steps=300, batch_size=16, n_layers=1, d_model=32, n_heads=2, warmup_steps=5,
    checkpoint_every=20, log_every=10, seed=0, device="cpu",
)  # fmt: skip
N_BEFORE, N_AFTER = 4, 1  # jobs submitted before and after the kills
LEASE_S = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparse_circuits.cli", *args]


def _last_worker(sessions, job_id: str) -> str | None:
    with sessions() as session:
        return session.get(Job, job_id).worker_id


class Replicas:
    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url
        self.data = root / "data"
        self.data.mkdir()
        self.env = os.environ | {"OMP_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.bases: dict[str, str] = {}

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(_cli(*args), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = proc
        return proc

    def server(self, name: str) -> None:
        port = _free_port()
        self.bases[name] = f"http://127.0.0.1:{port}"
        self.spawn(name, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
                   str(self.data), "--database-url", self.url, "--no-worker")  # fmt: skip

    def worker(self, name: str) -> None:
        port = _free_port()
        self.bases[name] = f"http://127.0.0.1:{port}"  # its Prometheus metrics
        self.spawn(name, "worker", "--data-dir", str(self.data), "--database-url", self.url,
                   "--worker-id", name, "--lease-s", str(LEASE_S), "--heartbeat-s", "1",
                   "--poll-s", "0.3", "--metrics-port", str(port))  # fmt: skip

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_servers_two_workers_one_postgresql_survive_sigkill(database_url, tmp_path):
    t0 = time.monotonic()
    # Migrations run once, at deployment, before any replica starts.
    up = subprocess.run(_cli("db", "upgrade", "--database-url", database_url), capture_output=True, text=True)  # fmt: skip
    assert up.returncode == 0, up.stderr
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    from sparse_circuits.server.keys import create_key  # noqa: PLC0415

    with sessions() as session:
        _key, secret = create_key(session, name="replicas")
    headers = {"X-API-Key": secret}

    r = Replicas(tmp_path, database_url)
    try:
        for name in ("server-a", "server-b"):
            r.server(name)
        for name in ("worker-a", "worker-b"):
            r.worker(name)
        for name in ("server-a", "server-b"):
            wait_for(f"{name} to be ready", lambda n=name: _ready(r.bases[n]), timeout=180)

        def submit(server: str, i: int) -> str:
            body = {"kind": "train-toy", "config": TOY | {"out": f"models/toy-{i}"}}
            resp = httpx.post(f"{r.bases[server]}/v1/jobs", json=body, headers=headers, timeout=30)
            assert resp.status_code == 201, resp.text
            return resp.json()["id"]

        ids = [submit(("server-a", "server-b")[i % 2], i) for i in range(N_BEFORE)]

        # Mid-job: worker-a holds a running job that has made progress. SIGKILL it and server-a.
        def victim() -> Job | None:
            with sessions() as session:
                return session.scalars(
                    select(Job).where(Job.worker_id == "worker-a", Job.state == "running", Job.step > 20)
                ).first()  # fmt: skip

        killed = wait_for("worker-a to be mid-job", victim, timeout=120)
        r.procs["worker-a"].send_signal(signal.SIGKILL)
        r.procs["server-a"].send_signal(signal.SIGKILL)
        print(
            f"SIGKILL worker-a (job {killed.id} at step {killed.step}) and server-a, {time.monotonic() - t0:.0f} s in"
        )
        r.worker("worker-c")  # as a supervisor restarts a dead worker (compose: restart)
        ids += [submit("server-b", N_BEFORE + i) for i in range(N_AFTER)]

        def all_ended():
            resp = httpx.get(f"{r.bases['server-b']}/v1/jobs", params={"limit": 100}, timeout=30)
            jobs = {j["id"]: j for j in resp.json()["data"]}
            return all(jobs[i]["state"] in ("succeeded", "failed", "cancelled") for i in ids) and jobs  # fmt: skip

        try:
            jobs = wait_for("every job to end", all_ended, timeout=420, interval=1.0)
        except AssertionError:
            raise AssertionError(r.log("worker-b")[-3000:] + r.log("worker-c")[-3000:]) from None
        metrics = httpx.get(f"{r.bases['worker-b']}/metrics", timeout=10).text
        server_metrics = httpx.get(f"{r.bases['server-b']}/metrics", timeout=10).text
    finally:
        r.stop_all()
    elapsed = time.monotonic() - t0

    assert sorted(jobs) == sorted(ids)  # nothing lost, nothing extra
    assert all(jobs[i]["state"] == "succeeded" for i in ids), {i: jobs[i]["error"] for i in ids}
    assert jobs[killed.id]["attempts"] == 2  # taken up again after its lease expired
    with sessions() as session:
        for job_id in ids:
            job = session.get(Job, job_id)
            assert job.finished_at is not None and job.result == f"models/toy-{ids.index(job_id)}"
            arts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
            assert len(arts) == 1 and arts[0].state == "complete", job_id
    for job_id in ids:
        attempts = [
            json.loads(line)
            for line in (r.data / "jobs" / job_id / "attempts.jsonl").read_text().splitlines()
        ]
        assert [a["attempt"] for a in attempts] == list(range(1, jobs[job_id]["attempts"] + 1))
    log = (r.data / "jobs" / killed.id / "log.txt").read_text()
    assert "resumed" in log or "resuming" in log, log[-2000:]

    reference = load_file(r.data / "models" / "toy-0" / "model.safetensors")
    for i in range(1, len(ids)):
        got = load_file(r.data / "models" / f"toy-{i}" / "model.safetensors")
        assert got.keys() == reference.keys()
        assert all(got[k].equal(reference[k]) for k in got), f"toy-{i} differs from toy-0"
    # worker-b's own metrics count the jobs whose last attempt it ran
    by_b = sum(_last_worker(sessions, i) == "worker-b" for i in ids)
    line = 'sparse_circuits_worker_jobs{kind="train-toy",state="succeeded"}'
    assert by_b == 0 or f"{line} {float(by_b)}" in metrics, metrics
    assert 'sparse_circuits_worker_info{backend="local"' in metrics
    assert "sparse_circuits_http_requests" in server_metrics
    print(f"{len(ids)} jobs, each succeeded once, all models equal; {elapsed:.1f} s")
    engine.dispose()
