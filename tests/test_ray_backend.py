"""Jobs on Ray: a real Ray head that the test starts on 127.0.0.1 (`ray start --head ... --block`,
stopped at the end by its process group), a real server and a real Ray-backed worker as
subprocesses, jobs submitted over HTTP.

- train-clt submitted over HTTP runs as a Ray job; its runner is SIGKILLed mid-run; the job goes
  back to the queue, its next attempt (a new Ray job) resumes from the checkpoint, and the CLT
  it writes equals, bit for bit, the same config run by the CLI.
- cancelling over HTTP stops the Ray job (stop_job): the stage stops at its next step, the job
  ends cancelled, its partial artifact kept and marked.
- what a job asks Ray for: CPUs, GPUs, memory, and torchrun for multi-GPU train-clt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from waiting import wait_for

from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.sparse_attention.modeldir import save_model

ray_submission = pytest.importorskip("ray.job_submission")
httpx = pytest.importorskip("httpx")

CLT_CONFIG = dict(
    # long enough (seconds on an idle machine) that a kill seen at step 60 lands mid-run
    activations="activations/a.zarr", d_features=64, batch_size=64, steps=2000,
    lr_warmup_steps=10, checkpoint_every=20, seed=3, device="cpu",
)  # fmt: skip
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with the dashboard (the job submission API), 2 CPUs, a small
    object store; every process it starts is in one process group, ended at teardown (never a
    `ray stop`, which would end every Ray process of this user on the machine)."""
    ray = shutil.which("ray", path=str(VENV_BIN)) or shutil.which("ray")
    if ray is None:
        pytest.skip("ray is not installed")
    temp = tempfile.mkdtemp(prefix="scray-", dir="/tmp")  # short: Ray's socket paths are long
    dashboard = _free_port()
    ports = {
        "--port": _free_port(), "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
        "--metrics-export-port": _free_port(), "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(), "--runtime-env-agent-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
    }  # fmt: skip
    argv = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
            "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp}",
            *(f"{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    log = open(Path(temp) / "ray-start.log", "w")
    head = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for("the Ray head", lambda: head.poll() is not None or _answers(f"{address}/api/version"), timeout=120)  # fmt: skip
        if head.poll() is not None:
            raise AssertionError(f"ray start failed:\n{(Path(temp) / 'ray-start.log').read_text()}")
        client = ray_submission.JobSubmissionClient(address)
        wait_for("the job submission API", lambda: client.list_jobs() is not None, timeout=60)
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait)
                time.sleep(1)  # the daemons of the group end after `ray start`
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of the group still there
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


class Service:
    """A server (`serve --no-worker`) and a Ray-backed worker on one data dir, as subprocesses."""

    def __init__(self, data_dir: Path, ray_address: str):
        self.data_dir, self.ray_address = data_dir, ray_address
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.logs = data_dir.parent / "logs"
        self.logs.mkdir(exist_ok=True)

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")
        argv = [sys.executable, "-m", "sparse_circuits.cli", *args]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env())
        self.procs.append(proc)
        return proc

    def start(self) -> Service:
        d = str(self.data_dir)
        self._spawn("server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", d, "--no-worker")  # fmt: skip
        wait_for("the server", lambda: _answers(f"{self.base}/readyz"), timeout=90)
        from sparse_circuits.jobs.db import database_url, make_engine, make_sessionmaker  # noqa: PLC0415
        from sparse_circuits.server.keys import create_key  # noqa: PLC0415

        engine = make_engine(database_url(self.data_dir))
        with make_sessionmaker(engine)() as session:
            _key, self.secret = create_key(session, name="ray-test")
        engine.dispose()
        self._spawn("worker", "worker", "--data-dir", d, "--backend", "ray",
                    "--ray-address", self.ray_address, "--lease-s", "8", "--heartbeat-s", "1",
                    "--poll-s", "0.5")  # fmt: skip
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    # -- the API

    def submit(self, kind: str, config: dict) -> dict:
        r = httpx.post(f"{self.base}/v1/jobs", json={"kind": kind, "config": config},
                       headers={"X-API-Key": self.secret}, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        r = httpx.get(f"{self.base}/v1/jobs/{job_id}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def cancel(self, job_id: str) -> dict:
        r = httpx.post(f"{self.base}/v1/jobs/{job_id}/cancel", headers={"X-API-Key": self.secret}, timeout=30)  # fmt: skip
        assert r.status_code in (200, 202), r.text
        return r.json()

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        try:
            return wait_for(f"job {job_id} {states}", lambda: (j := self.job(job_id))["state"] in states and j, timeout=timeout, interval=0.5)  # fmt: skip
        except AssertionError:
            raise AssertionError(
                f"{self.job(job_id)}\n--- worker log\n{self.log('worker')[-6000:]}"
            ) from None


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_head, make_tiny_model, token_file):
    """A data dir holding a tiny model and its activation store, served with a Ray worker."""
    data = tmp_path_factory.mktemp("ray") / "data"
    model = save_model(make_tiny_model(), data / "models" / "tiny")
    harvest(HarvestConfig(model=model, out=str(data / "activations" / "a.zarr"), tokens_file=token_file,
                          tokens=512, batch_size=8, shard_rows=256, shuffle_shards=1, device="cpu"))  # fmt: skip
    svc = Service(data, ray_head).start()
    try:
        yield svc
    finally:
        svc.stop()


def _transcript(step: str, job: dict) -> None:
    keys = ("state", "attempts", "step", "total", "progress_desc", "backend", "backend_ref", "host", "error")  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {step}: " + json.dumps({k: job.get(k) for k in keys}))


def _runner_pid(data_dir: Path, job_id: str, attempt: int) -> int | None:
    path = data_dir / "jobs" / job_id / "attempts.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("attempt") == attempt:
            return record["pid"]
    return None


def test_train_clt_over_http_on_ray_killed_mid_run_equals_the_cli(service, ray_head, tmp_path):
    t0 = time.monotonic()
    job = service.submit("train-clt", CLT_CONFIG | {"out": "clts/ray"})
    _transcript("submitted", job)
    running = wait_for("the Ray job to pass step 60", lambda: (j := service.job(job["id"]))["state"] == "running" and (j["step"] or 0) >= 60 and j, timeout=120, interval=0.3)  # fmt: skip
    _transcript("running", running)
    assert running["backend"] == "ray" and running["backend_ref"] == f"sc-{job['id']}-a1"
    pid = _runner_pid(service.data_dir, job["id"], 1)
    assert pid is not None
    # the record names the runner's process on its Ray node, not the head's address
    assert (running["host"], running["pid"]) == (socket.gethostname(), pid)
    os.kill(pid, signal.SIGKILL)  # the Ray job's process dies mid-run
    print(f"SIGKILL runner pid {pid} (Ray job {running['backend_ref']}) at step {running['step']}")

    done = service.wait_state(job["id"], ("succeeded", "failed", "cancelled"), 600)
    _transcript("ended", done)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2 and done["backend_ref"] == f"sc-{job['id']}-a2"
    assert done["result"] == "clts/ray"
    assert (done["host"], done["pid"]) == (
        socket.gethostname(),
        _runner_pid(service.data_dir, job["id"], 2),
    )
    assert done["step"] == done["total"] == CLT_CONFIG["steps"]
    assert done["metrics"]["step"] == CLT_CONFIG["steps"] and "nmse" in done["metrics"]
    client = ray_submission.JobSubmissionClient(ray_head)
    assert str(client.get_job_status(f"sc-{job['id']}-a1").value) == "FAILED"
    assert str(client.get_job_status(f"sc-{job['id']}-a2").value) == "SUCCEEDED"
    # the second attempt resumed from a checkpoint: it did not start again from step 0
    resumed = re.search(r"resumed \S+ at step (\d+)", (service.data_dir / "jobs" / job["id"] / "log.txt").read_text())  # fmt: skip
    assert resumed and 0 < int(resumed.group(1)) < CLT_CONFIG["steps"]
    print(f"Ray job killed and resumed: {time.monotonic() - t0:.1f} s")

    # the same config through the CLI, uninterrupted
    cfg = tmp_path / "cli.json"
    cfg.write_text(json.dumps(CLT_CONFIG | {"activations": str(service.data_dir / "activations/a.zarr"), "out": str(tmp_path / "cli-clt")}))  # fmt: skip
    # a process of its own with the Ray job's thread count (OMP_NUM_THREADS=1): same float sums
    cli = subprocess.run([sys.executable, "-m", "sparse_circuits.cli", "train-clt", "--config", str(cfg)],
                         capture_output=True, text=True, env=_env())  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    files = sorted((tmp_path / "cli-clt").glob("W_*.safetensors"))
    assert files
    for f in files:
        want, got = load_file(f), load_file(service.data_dir / "clts/ray" / f.name)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{f.name}:{k}")
    print(f"{len(files)} weight files equal to the CLI run's, bit for bit")


def test_cancel_over_http_stops_the_ray_job(service, ray_head):
    job = service.submit("train-clt", CLT_CONFIG | {"out": "clts/cancelled", "steps": 20000})
    wait_for(
        "the Ray job to start",
        lambda: (service.job(job["id"])["step"] or 0) >= 30,
        timeout=120,
        interval=0.3,
    )
    service.cancel(job["id"])
    done = service.wait_state(job["id"], ("succeeded", "failed", "cancelled"), 90)
    _transcript("cancelled", done)
    assert done["state"] == "cancelled" and done["attempts"] == 1
    client = ray_submission.JobSubmissionClient(ray_head)
    assert str(client.get_job_status(done["backend_ref"]).value) == "STOPPED"
    out = service.data_dir / "clts/cancelled"
    assert (out / "cancelled.json").is_file()  # the partial artifact is kept and marked
    assert (out / "checkpoints" / "latest").is_file()
    assert done["step"] < 20000


def test_resources_and_entrypoints(ray_head, tmp_path):
    from sparse_circuits.jobs.backend import Launch  # noqa: PLC0415
    from sparse_circuits.jobs.ray_backend import RayBackend  # noqa: PLC0415

    gpu = RayBackend(ray_head, num_cpus=4, num_gpus=2, memory_gb=8)
    cpu = RayBackend(ray_head)
    launch = Launch("j1", 3, tmp_path, "train-clt", {"device": "cuda"})
    res = gpu.resources("train-clt", {"device": "cuda"})
    assert (res.num_cpus, res.num_gpus, res.memory, res.nproc) == (4, 2, 8 * 2**30, 2)
    assert gpu.entrypoint("/data", launch, res).startswith(
        "exec torchrun --standalone --nproc-per-node=2 -m sparse_circuits.jobs.runner --data-dir /data"
    )
    assert gpu.resources("train-clt", {"device": "auto"}).num_gpus == 2
    assert (
        gpu.resources("harvest", {"device": "cuda:0"}).nproc == 1
    )  # one process, one GPU... or 2 asked
    assert cpu.resources("train-clt", {"device": "auto"}) == cpu.resources(
        "train-toy", {"device": "cpu"}
    )
    assert cpu.resources("train-toy", {"device": "cpu"}).num_gpus == 0
    assert cpu.entrypoint("/data", launch, cpu.resources("x", {})) == (
        "exec python -m sparse_circuits.jobs.runner --data-dir /data --job-id j1 --attempt 3"
    )


def test_train_clt_under_torchrun_inside_a_ray_job(service, ray_head, tmp_path):
    """Two gloo ranks under `torchrun` inside one Ray job (how several GPUs train one CLT); rank 0
    alone reports progress and the outcome."""
    from sparse_circuits.clt.train import TrainCLTConfig, train_clt  # noqa: PLC0415
    from sparse_circuits.jobs.backend import Launch  # noqa: PLC0415
    from sparse_circuits.jobs.ray_backend import RayBackend  # noqa: PLC0415
    from sparse_circuits.jobs.runner import OUTCOME_FILE, prepare_job_dir  # noqa: PLC0415
    from sparse_circuits.jobs.specs import validate_job  # noqa: PLC0415

    data = service.data_dir  # its store; this job goes through the backend alone
    raw = CLT_CONFIG | {"out": "clts/ddp", "steps": 30, "activation": "relu", "eval_steps": 5}
    config = validate_job("train-clt", raw, data).model_dump(mode="json")
    backend = RayBackend(ray_head, nproc=2)
    prepare_job_dir(data, "ddp", "train-clt", config, 1)
    started = backend.start(Launch("ddp", 1, data, "train-clt", config))
    status = wait_for("the Ray job", lambda: (s := backend.poll(started.ref)) is not None and (s,), timeout=180)[0]  # fmt: skip
    info = ray_submission.JobSubmissionClient(ray_head).get_job_info(started.ref)
    assert status == 0, info.message
    assert info.entrypoint.startswith("exec torchrun --standalone --nproc-per-node=2")
    outcome = json.loads((data / "jobs" / "ddp" / OUTCOME_FILE).read_text())
    assert outcome["state"] == "succeeded" and outcome["result"] == "clts/ddp"

    # The same CLT as one process would train, up to where the ranks' data-dependent
    # initialisation differs (each rank sees its half of the first batch): same files, same
    # steps and tokens, and a reconstruction as good.
    single = train_clt(TrainCLTConfig(**(raw | {"activations": str(data / "activations/a.zarr"), "out": tmp_path / "one"})))  # fmt: skip
    ddp = data / "clts/ddp"
    assert sorted(p.name for p in ddp.glob("W_*")) == sorted(p.name for p in single.glob("W_*"))
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    assert (two["steps"], two["tokens"]) == (one["steps"], one["tokens"]) == (30, 30 * 64)
    assert two["fvu"] == pytest.approx(one["fvu"], rel=0.05)


def test_a_dead_workers_ray_job_is_stopped_before_the_next_attempt(service, ray_head):
    """A worker that dies leaves its Ray job running; the worker that claims the job after the
    lease expired stops that Ray job (and waits for it) before submitting its own attempt,
    which resumes from the checkpoint: never two runs of one job at once."""
    from sparse_circuits.jobs.backend import Launch  # noqa: PLC0415
    from sparse_circuits.jobs.ray_backend import RayBackend  # noqa: PLC0415
    from sparse_circuits.jobs.runner import OUTCOME_FILE, prepare_job_dir  # noqa: PLC0415
    from sparse_circuits.jobs.specs import validate_job  # noqa: PLC0415

    data = service.data_dir
    config = validate_job("train-clt", CLT_CONFIG | {"out": "clts/orphan"}, data).model_dump(mode="json")  # fmt: skip
    first, second = RayBackend(ray_head), RayBackend(ray_head)  # two workers' backends
    prepare_job_dir(data, "orphan", "train-clt", config, 1)
    ref1 = first.start(Launch("orphan", 1, data, "train-clt", config)).ref
    progress = data / "jobs" / "orphan" / "progress.json"
    wait_for("attempt 1 to run", lambda: progress.is_file() and json.loads(progress.read_text())["step"] >= 40, timeout=120)  # fmt: skip
    # the first worker is gone (nothing polls ref1 any more); the second claims attempt 2
    prepare_job_dir(data, "orphan", "train-clt", config, 2)
    ref2 = second.start(Launch("orphan", 2, data, "train-clt", config)).ref
    client = ray_submission.JobSubmissionClient(ray_head)
    assert str(client.get_job_status(ref1).value) == "STOPPED"  # ended before ref2 was submitted
    status = wait_for(
        "attempt 2", lambda: (s := second.poll(ref2)) is not None and (s,), timeout=600
    )[0]
    assert status == 0
    outcome = json.loads((data / "jobs" / "orphan" / OUTCOME_FILE).read_text())
    assert outcome["attempt"] == 2 and outcome["state"] == "succeeded"
    attempts = [json.loads(x) for x in (data / "jobs" / "orphan" / "attempts.jsonl").read_text().splitlines()]  # fmt: skip
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert "resumed" in (data / "jobs" / "orphan" / "log.txt").read_text()
