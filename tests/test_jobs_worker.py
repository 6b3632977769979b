"""The worker end to end with real jobs in real processes: a worker SIGKILLed mid-job loses
nothing (another worker resumes the job after its lease expires, never twice at once, and the
result equals an uninterrupted run's); SIGTERM requeues; cancel keeps a marked partial artifact;
retry resumes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select
from waiting import wait_for

from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.io import load_checkpoint
from sparse_circuits.jobs import queue
from sparse_circuits.jobs.db import Artifact, make_engine, make_sessionmaker
from sparse_circuits.jobs.specs import validate_job

# a CLT on the tiny model's 600-row store: 400 steps are a few seconds, checkpoints every 10
CLT = {
    "activations": "activations/tiny.zarr", "d_features": 32, "batch_size": 32, "steps": 400,
    "checkpoint_every": 10, "eval_steps": 5, "device": "cpu", "autocast": False,
}  # fmt: skip
STEPS = CLT["steps"]
WORKER_SCRIPT = (
    "import logging, sys\n"
    "from sparse_circuits.jobs.worker import WorkerConfig, run_worker\n"
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')\n"
    "run_worker(WorkerConfig.model_validate_json(sys.argv[1]))\n"
)


@pytest.fixture
def data(tmp_path, tiny_model_dir, token_file, monkeypatch):
    """A data dir holding the tiny model and its activation store, harvested as a job would
    (paths relative to the data dir)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_model_dir, root / "models/tiny")
    shutil.copy(token_file, root / "tokens.npy")
    with monkeypatch.context() as m:
        m.chdir(root)
        harvest(
            HarvestConfig(
                model="models/tiny", tokens_file="tokens.npy", out="activations/tiny.zarr",
                device="cpu",
            )
        )  # fmt: skip
    return root


@pytest.fixture
def sessions(migrated_url):
    engine = make_engine(migrated_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _worker(data_dir: Path, url: str, name: str, **settings) -> subprocess.Popen:
    """A worker process (lease 3 s, heartbeat 0.5 s), its log in the data dir."""
    cfg = {
        "data_dir": str(data_dir), "database_url": url, "worker_id": name, "lease_s": 3.0,
        "heartbeat_s": 0.5, "poll_s": 0.2, "grace_s": 20.0, **settings,
    }  # fmt: skip
    log = open(data_dir / f"{name}.log", "a")  # noqa: SIM115  (the process owns it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", WORKER_SCRIPT, json.dumps(cfg)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _submit(sessions, data_dir: Path, kind: str, config: dict) -> str:
    config = validate_job(kind, config, data_dir).model_dump(mode="json")
    with sessions() as s:
        return queue.submit_job(s, kind=kind, config=config).id


def _job(sessions, job_id: str):
    with sessions() as s:
        return queue.get_job(s, job_id=job_id)


def _progress(data_dir: Path, job_id: str) -> int:
    try:
        return json.loads((data_dir / "jobs" / job_id / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its dead parent's reaper) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> None:
    try:
        assert proc.wait(timeout=timeout) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _same_run(got: Path, want: Path) -> None:
    """The CLT dirs hold the same weights (last checkpoint and saved files) and metrics."""
    ref, out = load_checkpoint(want / "checkpoints")[0], load_checkpoint(got / "checkpoints")[0]
    assert ref.keys() == out.keys()
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)
    for file in sorted(want.glob("W_*.safetensors")):
        saved, expected = load_file(got / file.name), load_file(file)
        for name in expected:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-6, atol=1e-6)
    m_want = json.loads((want / "metrics.json").read_text())
    m_got = json.loads((got / "metrics.json").read_text())
    assert m_got.keys() == m_want.keys()
    for key, value in m_want.items():
        want = pytest.approx(value, rel=1e-6) if _numbers(value) else value  # e.g. a schedule
        assert m_got[key] == want, key


def _numbers(value) -> bool:
    """A number or a list of numbers (what pytest.approx compares)."""
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)


def test_a_sigkilled_worker_loses_nothing(sessions, migrated_url, data):
    killed = _submit(sessions, data, "train-clt", {**CLT, "out": "clts/killed"})
    first = _worker(data, migrated_url, "first")
    try:
        wait_for("the job to train a while", lambda: _progress(data, killed) >= STEPS // 4)
        child = _job(sessions, killed).pid
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    # the job's own process dies with its worker: nothing runs it until the lease expires
    wait_for("the orphaned job process to end", lambda: not _alive(child), timeout=30)
    assert _job(sessions, killed).state == "running"  # still leased to the dead worker
    assert not (data / "clts/killed/metrics.json").exists()
    reference = _submit(sessions, data, "train-clt", {**CLT, "out": "clts/reference"})
    second = _worker(data, migrated_url, "second", idle_exit_s=1.0)
    _finish(second)

    job = _job(sessions, killed)
    assert (job.state, job.attempts, job.worker_id, job.result) == (
        "succeeded", 2, "second", "clts/killed",
    )  # fmt: skip
    assert job.step == job.total == STEPS and job.metrics["step"] == STEPS
    # never twice at once: attempt 1's process was gone before attempt 2 took the job's lock
    attempts = [json.loads(x) for x in (data / "jobs" / killed / "attempts.jsonl").open()]
    assert [a["attempt"] for a in attempts] == [1, 2] and attempts[0]["pid"] == child
    assert attempts[1]["pid"] != child
    log = (data / "jobs" / killed / "log.txt").read_text()
    assert "resumed" in log  # from the first attempt's checkpoint, not from zero
    steps = [json.loads(x)["step"] for x in (data / "clts/killed/metrics.jsonl").open()]
    assert steps == list(range(1, STEPS + 1))  # each step once

    assert _job(sessions, reference).state == "succeeded"
    _same_run(data / "clts/killed", data / "clts/reference")
    with sessions() as s:
        clt = s.scalar(select(Artifact).where(Artifact.path == "clts/killed"))
        store = s.get(Artifact, clt.store_id)
        model = s.get(Artifact, store.model_id)
    assert (clt.kind, clt.state, clt.job_id) == ("transcoder", "complete", killed)
    assert clt.metrics == json.loads((data / "clts/killed/metrics.json").read_text())
    assert (store.kind, store.path, model.kind, model.path) == (
        "store", "activations/tiny.zarr", "model", "models/tiny",
    )  # fmt: skip
    assert clt.model_id == model.id


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sigterm_requeues_cancel_keeps_a_partial_artifact_retry_resumes(
    sessions, migrated_url, data
):
    # long enough that neither stop request can arrive after the last step on an idle machine
    steps = 2000
    job_id = _submit(sessions, data, "train-clt", {**CLT, "steps": steps, "out": "clts/clt"})
    worker = _worker(data, migrated_url, "a")
    try:
        wait_for("the job to train a while", lambda: _progress(data, job_id) >= 20)
        worker.send_signal(signal.SIGTERM)  # graceful: stop at the next step, back to the queue
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    job = _job(sessions, job_id)
    assert (job.state, job.attempts, job.worker_id, job.pid) == ("queued", 0, None, None)
    stopped_at = _progress(data, job_id)
    assert 0 < stopped_at < steps

    worker = _worker(data, migrated_url, "b", idle_exit_s=2.0)
    try:
        wait_for(
            "the job to run again",
            lambda: _job(sessions, job_id).pid and _progress(data, job_id) >= stopped_at + 20,
        )
        with sessions() as s:
            assert queue.cancel_job(s, job_id=job_id).cancel_requested
        wait_for("the job to stop", lambda: _job(sessions, job_id).state == "cancelled")
        job = _job(sessions, job_id)
        assert 0 < job.step < steps and job.log_tail
        assert (data / "clts/clt/cancelled.json").is_file()
        with sessions() as s:
            partial = s.scalar(select(Artifact).where(Artifact.path == "clts/clt"))
            assert (partial.kind, partial.state, partial.job_id) == (
                "transcoder",
                "partial",
                job_id,
            )
            queue.retry_job(s, job_id=job_id)
        _finish(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    job = _job(sessions, job_id)
    assert (job.state, job.attempts, job.step) == ("succeeded", 1, steps)
    assert not (data / "clts/clt/cancelled.json").exists()
    with sessions() as s:
        done = s.scalar(select(Artifact).where(Artifact.path == "clts/clt"))
        assert done.state == "complete" and "fvu" in done.metrics
    assert (data / "jobs" / job_id / "log.txt").read_text().count("resumed") >= 2


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_worker_cut_off_from_the_database_stops_its_job_before_the_lease_expires(
    sessions, migrated_url, data
):
    import psycopg  # noqa: PLC0415

    job_id = _submit(sessions, data, "train-clt", {**CLT, "steps": 100_000, "out": "clts/c"})
    worker = _worker(data, migrated_url, "cut-off", lease_s=6.0, heartbeat_s=1.0)
    admin = migrated_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)
    name = admin[1]
    try:
        wait_for("the job to train", lambda: _progress(data, job_id) >= 5)
        child = _job(sessions, job_id).pid
        sessions.kw["bind"].dispose()
        with psycopg.connect(admin[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cut_at = time.monotonic()
            # 4 s (lease_s - 2 heartbeats) after its last renewal (at most 1 s before the cut)
            # the worker ends the job itself, before the 6 s lease can expire (5 s or more after
            # the cut) and another worker claim it
            wait_for("the job's process to end", lambda: not _alive(child), timeout=30)
            assert time.monotonic() - cut_at < 5.0
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        # back in touch: the lease expires, the job is claimed again and resumes
        wait_for("the second attempt", lambda: _job(sessions, job_id).attempts == 2)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
    attempts = [json.loads(x) for x in (data / "jobs" / job_id / "attempts.jsonl").open()]
    assert [a["pid"] == child for a in attempts] == [True, False]
