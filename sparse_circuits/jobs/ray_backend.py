"""Jobs on a Ray cluster: the same job record runs as a Ray job, through Ray's job submission API.

`sparse-circuits worker --backend ray --ray-address http://HEAD:8265` claims jobs from the
database like any worker, prepares each one's job dir (`runner.prepare_job_dir`) and hands it
to this backend, which submits a Ray job (submission id `sc-<job id>-a<attempt>`, the job
record's `backend_ref`) whose entrypoint is the same runner a local child process runs:

    python -m sparse_circuits.jobs.runner --data-dir D --job-id ID --attempt N
    torchrun --standalone --nproc-per-node G -m sparse_circuits.jobs.runner ...

(the second for train-clt given G >= 2 GPUs, or `nproc` processes), asking Ray for the CPUs,
GPUs and memory the job needs (`resources`). Progress, the outcome and the log travel through the job dir as they do for
a local job, so the worker's heartbeats copy step/total, metrics and the log tail into the job
record unchanged; the Ray nodes need the package and the data dir (a shared volume, at the
worker's path or at `data_dir`: docker/compose.yaml), never the database. The job record's host
and pid are the runner's on its Ray node (the head is not where it runs), its `backend_ref` the
Ray job's submission id. With an s3:// data dir the shared volume is the worker's cache dir, and
the Ray nodes need the S3 settings (AWS_ENDPOINT_URL, ...) in their own environment.

- stop (cancel): `stop_job`, whose SIGTERM the runner turns into the stage stopping at its
  next step, checkpoints kept; Ray waits `stop_grace_s` before it kills.
- a Ray job that dies (killed, its node lost) ends with a non-zero status and no outcome: the
  worker treats it as it treats a local child that died, and the next attempt resumes from the
  stage's checkpoint.
- a worker that dies leaves its Ray job running; once the lease expires another worker claims
  the job, and `start` first stops every earlier attempt's Ray job still active and waits for it
  to end, so a job never runs twice at once.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import JobBackend, Launch, Started
from .runner import OUTCOME_FILE, job_dir, read_json_or_none

log = logging.getLogger(__name__)

SUBMISSION_PREFIX = "sc-"
RAY_ACTIVE = ("PENDING", "RUNNING")  # Ray's other states: STOPPED, SUCCEEDED, FAILED
STOPPED_STATUS = -15  # poll()'s exit status for a stopped Ray job (as a SIGTERM'd process)
UNREACHABLE_LIMIT_S = 120.0  # the head unreachable this long: the job is taken as lost


def submission_id(job_id: str, attempt: int) -> str:
    return f"{SUBMISSION_PREFIX}{job_id}-a{attempt}"


@dataclass(frozen=True)
class RayResources:
    """What one Ray job asks for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes
    nproc: int = 1  # processes under torchrun (multi-GPU train-clt)


class RayBackend(JobBackend):
    """Runs jobs as Ray jobs on the cluster whose dashboard (job submission API) is `address`.

    data_dir: the data dir as the Ray nodes mount it (default: the worker's own path).
    python: the interpreter on the Ray nodes. num_cpus / num_gpus / memory_gb: what one job
    asks for; a job whose config says `device: cuda...` (or `auto` when num_gpus is set) asks
    for num_gpus GPUs (at least one), and train-clt given two or more runs under torchrun with
    one process per GPU (nproc: that many processes instead; on CPU, gloo ranks each asking for
    a CPU). env: extra environment for the jobs (e.g. S3 settings).
    """

    name = "ray"

    def __init__(
        self,
        address: str,
        *,
        data_dir: str | Path | None = None,
        python: str = "python",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        memory_gb: float | None = None,
        nproc: int | None = None,
        stop_grace_s: int = 60,
        env: dict[str, str] | None = None,
    ):
        from ray.job_submission import JobSubmissionClient  # noqa: PLC0415  (ray: this backend only)

        self.address = address if "://" in address else f"http://{address}"
        self.client = JobSubmissionClient(self.address)
        self.data_dir = None if data_dir is None else str(data_dir)
        self.python = python
        self.num_cpus, self.num_gpus, self.memory_gb = num_cpus, num_gpus, memory_gb
        self.nproc = nproc
        self.stop_grace_s = stop_grace_s
        self.env = dict(env or {})
        self._unreachable_since: dict[str, float] = {}

    # ---- what to ask for

    def resources(self, kind: str, config: dict[str, Any]) -> RayResources:
        device = str(config.get("device", "cpu"))
        gpu = device.startswith("cuda") or (device == "auto" and self.num_gpus > 0)
        gpus = max(self.num_gpus, 1.0) if gpu else 0.0
        nproc = 1
        if kind == "train-clt":  # the stage that runs under torchrun (DDP)
            nproc = self.nproc or (int(gpus) if gpus >= 2 else 1)
        cpus = max(self.num_cpus, float(nproc)) if not gpu else self.num_cpus
        memory = int(self.memory_gb * 2**30) if self.memory_gb else None
        return RayResources(cpus, gpus, memory, nproc)

    def entrypoint(self, data_dir: str, launch: Launch, resources: RayResources) -> str:
        if resources.nproc > 1:
            launcher = ["torchrun", "--standalone", f"--nproc-per-node={resources.nproc}"]
        else:
            launcher = [self.python]
        args = ["--data-dir", data_dir, "--job-id", launch.job_id, "--attempt", str(launch.attempt)]
        # exec: Ray runs the entrypoint with `sh -c`; without exec, stop_job's SIGTERM would end
        # the shell, and the runner (which dies with its parent) before it could stop cleanly.
        return "exec " + shlex.join([*launcher, "-m", "sparse_circuits.jobs.runner", *args])

    # ---- the JobBackend interface

    def start(self, launch: Launch) -> Started:
        self._end_earlier_attempts(Path(launch.data_dir), launch.job_id, launch.attempt)
        resources = self.resources(launch.kind, launch.config)
        sid = submission_id(launch.job_id, launch.attempt)
        data_dir = self.data_dir or str(Path(launch.data_dir).resolve())
        env = {
            "OMP_NUM_THREADS": str(max(1, int(resources.num_cpus // resources.nproc))),
            "RAY_JOB_STOP_WAIT_TIME_S": str(self.stop_grace_s),  # read by Ray's job supervisor
            "PYTHONUNBUFFERED": "1",
        } | self.env
        self.client.submit_job(
            entrypoint=self.entrypoint(data_dir, launch, resources),
            submission_id=sid,
            entrypoint_num_cpus=resources.num_cpus,
            entrypoint_num_gpus=resources.num_gpus or None,
            entrypoint_memory=resources.memory,
            runtime_env={"env_vars": env},
            metadata={"sparse_circuits_job": launch.job_id, "attempt": str(launch.attempt)},
        )
        log.info(
            "job %s attempt %d: Ray job %s on %s (%s CPUs, %s GPUs%s)",
            launch.job_id, launch.attempt, sid, self.address, resources.num_cpus,
            resources.num_gpus, f", torchrun x{resources.nproc}" if resources.nproc > 1 else "",
        )  # fmt: skip
        # where it runs is the runner's to say (attempts.jsonl; the worker copies it into the
        # record): Ray picks the node
        return Started(host=None, pid=None, ref=sid)

    def poll(self, ref: str) -> int | None:
        try:
            info = self.client.get_job_info(ref)
        except Exception as e:  # the head unreachable (restarting, network): for a while, wait
            since = self._unreachable_since.setdefault(ref, time.monotonic())
            if time.monotonic() - since < UNREACHABLE_LIMIT_S:
                log.warning("Ray job %s: the head does not answer (%s); still waiting", ref, e)
                return None
            log.error("Ray job %s: the head has not answered for %.0f s", ref, UNREACHABLE_LIMIT_S)
            return 1
        self._unreachable_since.pop(ref, None)
        state = str(info.status.value)
        if state in RAY_ACTIVE:
            return None
        if state == "SUCCEEDED":
            return 0
        if state == "STOPPED":
            return STOPPED_STATUS
        log.warning("Ray job %s failed: %s", ref, info.message)
        return info.driver_exit_code or 1

    def stop(self, ref: str) -> None:
        """`stop_job`: SIGTERM to the runner, which stops the stage at its next step."""
        log.info("stopping Ray job %s", ref)
        self.client.stop_job(ref)

    def kill(self, ref: str) -> None:
        """`stop_job` too (Ray has no immediate kill): SIGKILL follows after stop_grace_s."""
        self.stop(ref)

    def close(self) -> None:
        self._unreachable_since.clear()

    # ---- helpers

    def _end_earlier_attempts(
        self, data_dir: Path, job_id: str, attempt: int, timeout_s: float | None = None
    ) -> None:
        """Stop the Ray jobs of earlier attempts that still run (their worker died and the
        lease moved here) and wait until they have ended: never two runs of one job at once."""
        active = []
        for earlier in range(1, attempt):
            sid = submission_id(job_id, earlier)
            try:
                state = str(self.client.get_job_status(sid).value)
            except RuntimeError:  # no such Ray job: that attempt never submitted one
                continue
            if state in RAY_ACTIVE:
                log.info(
                    "job %s: Ray job %s of attempt %d still runs; stopping it", job_id, sid, earlier
                )
                self.client.stop_job(sid)
                active.append(sid)
        deadline = time.monotonic() + (timeout_s or self.stop_grace_s + 30)
        while active and time.monotonic() < deadline:
            active = [
                sid for sid in active if str(self.client.get_job_status(sid).value) in RAY_ACTIVE
            ]
            time.sleep(0.5)
        if active:
            raise RuntimeError(f"job {job_id}: earlier Ray jobs {active} did not stop")
        outcome = job_dir(data_dir, job_id) / OUTCOME_FILE  # one a stopped attempt left
        if (read_json_or_none(outcome) or {}).get("attempt", attempt) != attempt:
            outcome.unlink(missing_ok=True)


def make_backend(config) -> RayBackend:
    """The backend a worker's config names (`--backend ray --ray-address ...`)."""
    address = getattr(config, "ray_address", None)
    if not address:
        raise ValueError(
            "the ray backend needs --ray-address (the Ray dashboard, e.g. http://HEAD:8265)"
        )
    return RayBackend(
        address,
        data_dir=getattr(config, "ray_data_dir", None),
        num_cpus=getattr(config, "ray_num_cpus", 1.0),
        num_gpus=getattr(config, "ray_num_gpus", 0.0),
        memory_gb=getattr(config, "ray_memory_gb", None),
        nproc=getattr(config, "ray_nproc", None),
    )
