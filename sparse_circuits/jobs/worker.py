"""The job worker: claims queued jobs, runs each through a backend, keeps their leases alive.

`sparse-circuits worker --data-dir D` runs `run_worker(WorkerConfig(...))`. Each claimed job
runs through the backend (local child processes by default); the worker heartbeats its lease,
copying the runner's progress, the run's latest `metrics.jsonl` record and the tail of the
job's `log.txt` into the record; passes on a cancel request (the stage stops at its next step,
its partial artifact kept and marked); and on success registers the artifact the stage
returned. A worker killed outright loses nothing: its children die with it, its leases expire
and another worker resumes the jobs. SIGTERM or Ctrl-C stops it gracefully: no new claims,
the running jobs stop at their next step (keeping their checkpoints) and go back to the queue.

The data dir may be an s3:// prefix shared by workers on several machines (`--data-dir
s3://bucket/prefix`, or `--data-url URL --data-dir CACHE` to name the local cache): job dirs
and the copies of the artifacts a job reads and writes are then kept in the local cache, and
each job's runner fetches its inputs and uploads its outputs (`remote.py`). The job record
names the host and pid of the process that runs the job (the runner's own, wherever a backend
started it; `backend_ref` the backend's handle, e.g. the Ray job's submission id).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StageError
from ..stages import STAGES
from ..storage import split_data_dir
from . import queue
from .artifacts import ArtifactError, register_artifact, register_partial
from .backend import JobBackend, Launch, make_backend
from .db import Job, database_url, make_engine, make_sessionmaker, migrate, schema_is_current
from .runner import (
    LOG_FILE,
    OUTCOME_FILE,
    PROGRESS_FILE,
    out_dir,
    prepare_job_dir,
    read_json_or_none,
    request_stop,
    runner_of,
)
from .specs import JobSpecError, validate_job

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerConfig(BaseModel):
    """`worker`: run queued jobs from the data dir's database."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(
        description="Data dir: artifacts, job dirs and the SQLite default; or an s3://bucket/prefix "
        "shared by workers on several machines (then this machine's cache of it is kept in "
        "~/.cache/sparse-circuits/data/, unless --data-url names the prefix and this the cache)."
    )
    data_url: str | None = Field(
        None,
        description="An s3://bucket/prefix holding the artifacts, data_dir being this machine's "
        "cache of them (S3 settings from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql+psycopg://...); default: SQLite in data_dir."
    )
    concurrency: int = Field(1, gt=0, description="Jobs this worker runs at once.")
    lease_s: float = Field(
        30.0, gt=0, description="A job whose worker is silent this long goes back to the queue."
    )
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between lease renewals.")
    poll_s: float = Field(1.0, gt=0, description="Seconds between looks at the queue.")
    grace_s: float = Field(
        60.0, ge=0, description="On shutdown, how long running jobs get to stop at a step."
    )
    worker_id: str | None = Field(
        None, description="This worker's name, unique among workers (default: host:pid)."
    )
    backend: Literal["local", "ray"] = Field(
        "local", description="Where jobs run: child processes here, or Ray jobs."
    )
    ray_address: str | None = Field(
        None, description="Ray head's job submission address (for --backend ray)."
    )
    ray_num_cpus: float = Field(1.0, gt=0, description="CPUs each Ray job asks for.")
    ray_num_gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs a Ray job asks for when its config's device is cuda (at least one; "
        "train-clt with two or more runs under torchrun, one process per GPU).",
    )
    ray_memory_gb: float | None = Field(None, gt=0, description="Memory each Ray job asks for.")
    ray_nproc: int | None = Field(
        None, gt=0, description="torchrun processes of a train-clt Ray job (default: one per GPU)."
    )
    ray_data_dir: str | None = Field(
        None, description="The data dir's path on the Ray nodes (default: the same as here)."
    )
    metrics_port: int | None = Field(
        None, ge=0, description="Serve Prometheus metrics of this worker on this port."
    )
    kinds: list[str] | None = Field(None, description="Only run jobs of these kinds.")
    idle_exit_s: float | None = Field(
        None, gt=0, description="Exit after this long with nothing to run (default: never)."
    )

    _split_data_dir = model_validator(mode="before")(split_data_dir)

    @model_validator(mode="after")
    def _name_and_lease(self) -> WorkerConfig:
        if self.worker_id is None:
            self.worker_id = _default_worker_id()
        if self.heartbeat_s * 3 > self.lease_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be at most a third of lease_s "
                f"({self.lease_s}): a job whose lease goes unrenewed for lease_s - 2 heartbeats "
                "is stopped by its worker, before the lease can expire"
            )
        return self


class Running:
    """A job this worker runs: its lease (id, attempt), its backend ref, its files."""

    def __init__(self, job: Job, config: dict[str, Any], ref: str, path: Path):
        self.job_id, self.attempt, self.kind = job.id, job.attempts, job.kind
        self.config = config  # validated, its paths relative to the data dir
        self.ref, self.path = ref, path
        self.next_beat = 0.0
        self.renewed = time.monotonic()  # the lease was last renewed (claimed) then
        self.stopping: str | None = None  # "cancel" or "shutdown" once asked
        self.stop_deadline: float | None = None


# ----------------------------------------------------------------------------- progress


def read_progress(data_dir: Path, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The heartbeat's payload: step/total/desc, the latest metrics record, the log tail."""
    progress = read_json_or_none(path / PROGRESS_FILE) or {}
    return {
        "step": progress.get("step"),
        "total": progress.get("total"),
        "desc": str(progress["desc"])[:128] if progress.get("desc") else None,
        "metrics": last_metrics(data_dir, config),
        "log_tail": tail(path / LOG_FILE, LOG_TAIL_CHARS),
    }


def last_metrics(data_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The last record of the run's metrics.jsonl, when the stage writes one."""
    out = out_dir(data_dir, config)
    if out is None:
        return None
    line = tail(out / "metrics.jsonl", 8192).rstrip("\n").rsplit("\n", 1)[-1]
    try:
        record = json.loads(line) if line else None
    except ValueError:
        return None  # a line being appended right now
    return record if isinstance(record, dict) else None


def tail(path: Path, chars: int) -> str:
    """The last `chars` characters (about) of a text file; "" when there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# ----------------------------------------------------------------------------- the worker


class Worker:
    """One worker's loop; `run()` returns when asked to stop (or idle past idle_exit_s)."""

    def __init__(self, cfg: WorkerConfig, sessions: sessionmaker, backend: JobBackend):
        self.cfg, self.sessions, self.backend = cfg, sessions, backend
        self.data_dir = cfg.data_dir.resolve()
        self.running: dict[str, Running] = {}
        self.stop_event = threading.Event()

    # -- the loop

    def run(self) -> None:
        log.info(
            "worker %s on %s (%s backend)", self.cfg.worker_id, self.data_dir, self.backend.name
        )
        self._import_stage_configs()
        idle_since = time.monotonic()
        while not self.stop_event.is_set():
            try:
                self._claim_more()
            except Exception:  # the database away for a moment: claim again next round
                log.exception("could not claim a job")
            self._tend_all()
            if self.running:
                idle_since = time.monotonic()
            elif self.cfg.idle_exit_s and time.monotonic() - idle_since > self.cfg.idle_exit_s:
                log.info("idle for %.0f s: exiting", self.cfg.idle_exit_s)
                break
            self.stop_event.wait(self.cfg.poll_s)
        self._shut_down()

    def _import_stage_configs(self) -> None:
        """Import the config classes of the stages this worker runs before claiming any job:
        a first import (torch...) between a claim and the job's start can outlast the lease
        on a busy machine, and the job would be taken back before it ever ran."""
        for kind in self.cfg.kinds or STAGES:
            if kind in STAGES:
                STAGES[kind].config_class()

    def _claim_more(self) -> None:
        while len(self.running) < self.cfg.concurrency and not self.stop_event.is_set():
            with self.sessions() as session:
                job = queue.claim_job(
                    session,
                    worker_id=self.cfg.worker_id,
                    lease_s=self.cfg.lease_s,
                    backend=self.backend.name,
                    kinds=self.cfg.kinds,
                )
                if job is None:
                    return
                self._start(session, job)

    def _start(self, session: Session, job: Job) -> None:
        try:
            config = validate_job(job.kind, job.config, self.data_dir).model_dump(mode="json")
        except JobSpecError as e:
            self._finish(session, job.id, job.attempts, "failed", error=f"invalid job: {e}")
            return
        path = prepare_job_dir(
            self.data_dir, job.id, job.kind, config, job.attempts, self.cfg.data_url
        )
        try:
            launch = Launch(job.id, job.attempts, self.data_dir, job.kind, config)
            started = self.backend.start(launch)
        except Exception as e:
            log.exception("job %s could not be started", job.id)
            self._finish(session, job.id, job.attempts, "failed", error=f"could not start: {e}")
            return
        run = Running(job, config, started.ref, path)
        self.running[job.id] = run
        log.info("job %s (%s) attempt %d started: %s", job.id, job.kind, job.attempts, started.ref)
        owned = queue.record_runner(
            session,
            job_id=job.id,
            worker_id=self.cfg.worker_id,
            attempt=job.attempts,
            host=started.host,
            pid=started.pid,
            backend_ref=started.ref,
        )
        if not owned:
            self._lost(run)

    def _tend_all(self) -> None:
        for run in list(self.running.values()):
            try:
                self._tend(run)
            except Exception:  # the database away for a moment: try again next round
                log.exception("could not tend job %s", run.job_id)

    def _tend(self, run: Running) -> None:
        status = self.backend.poll(run.ref)
        if status is not None:
            self._ended(run, status)
            return
        if run.stop_deadline is not None and time.monotonic() > run.stop_deadline:
            log.warning("job %s did not stop in %.0f s: killing it", run.job_id, self.cfg.grace_s)
            self.backend.kill(run.ref)
            return
        if time.monotonic() - run.renewed > self.cfg.lease_s - 2 * self.cfg.heartbeat_s:
            self._fence(run)
            return
        if time.monotonic() >= run.next_beat:
            self._beat(run)

    def _fence(self, run: Running) -> None:
        """The lease could not be renewed (database unreachable) and is about to expire: end
        the job here before another worker may claim it (it resumes there)."""
        log.error(
            "job %s: lease not renewed for %.0f s; stopping it here", run.job_id, self.cfg.lease_s
        )
        self.backend.kill(run.ref)
        self.backend.poll(run.ref)
        del self.running[run.job_id]

    def _beat(self, run: Running) -> None:
        now = time.monotonic()
        run.next_beat = now + self.cfg.heartbeat_s
        with self.sessions() as session:
            beat = queue.heartbeat(
                session,
                job_id=run.job_id,
                worker_id=self.cfg.worker_id,
                attempt=run.attempt,
                lease_s=self.cfg.lease_s,
                **read_progress(self.data_dir, run.path, run.config),
                **self._where(run),
            )
        if beat.owned:
            run.renewed = now
        if not beat.owned:
            self._lost(run)
        elif beat.cancel_requested and run.stopping is None:
            self._ask_to_stop(run, "cancel")

    def _where(self, run: Running) -> dict[str, Any]:
        """The host and pid of the job's runner once it has started (a Ray job's runs on a
        node the worker does not choose), for the record; {} before."""
        found = runner_of(run.path, run.attempt)
        return {} if found is None else {"host": found[0], "pid": found[1]}

    def _ask_to_stop(self, run: Running, reason: str) -> None:
        log.info("job %s: asking it to stop (%s)", run.job_id, reason)
        run.stopping = reason
        run.stop_deadline = time.monotonic() + self.cfg.grace_s
        request_stop(run.path, reason)
        self.backend.stop(run.ref)

    def _lost(self, run: Running) -> None:
        """Our lease was taken (it expired and another worker claimed the job): stop now."""
        log.warning("job %s: lease lost; killing attempt %d here", run.job_id, run.attempt)
        self.backend.kill(run.ref)
        self.backend.poll(run.ref)
        del self.running[run.job_id]

    # -- endings

    def _ended(self, run: Running, status: int) -> None:
        del self.running[run.job_id]
        outcome = read_json_or_none(run.path / OUTCOME_FILE) or {}
        with self.sessions() as session:
            self._beat_final(session, run)
            if run.stopping == "shutdown" and outcome.get("state") != "succeeded":
                self._requeue(session, run, count_attempt=False, why="worker shutting down")
            elif outcome.get("attempt") != run.attempt and run.stopping == "cancel":
                self._record_outcome(session, run, {"state": "cancelled", "result": None})
            elif outcome.get("attempt") != run.attempt:  # killed, crashed: like a lost lease
                why = f"its process ended with status {status} and no outcome"
                self._requeue(session, run, count_attempt=True, why=why)
            else:
                self._record_outcome(session, run, outcome)

    def _requeue(self, session: Session, run: Running, count_attempt: bool, why: str) -> None:
        state = queue.release_job(
            session,
            job_id=run.job_id,
            worker_id=self.cfg.worker_id,
            attempt=run.attempt,
            count_attempt=count_attempt,
            error=why,
        )
        log.info("job %s: %s; now %s", run.job_id, why, state)

    def _beat_final(self, session: Session, run: Running) -> None:
        queue.heartbeat(
            session,
            job_id=run.job_id,
            worker_id=self.cfg.worker_id,
            attempt=run.attempt,
            lease_s=self.cfg.lease_s,
            **read_progress(self.data_dir, run.path, run.config),
            **self._where(run),
        )

    def _record_outcome(self, session: Session, run: Running, outcome: dict[str, Any]) -> None:
        """Register what the job wrote (the runner has marked a cancelled job's output partial
        and, with an s3:// data dir, uploaded it) and end the job."""
        state, result = outcome["state"], outcome.get("result")
        out = out_dir(self.data_dir, run.config)
        if state == "succeeded":
            self._register(session, run, result)
        elif state == "cancelled" and out is not None and out.is_dir():
            self._register_partial(session, run, out)
        self._finish(session, run.job_id, run.attempt, state, outcome.get("error"), result)

    def _finish(
        self,
        session: Session,
        job_id: str,
        attempt: int,
        state: str,
        error: str | None = None,
        result: str | None = None,
    ) -> None:
        owned = queue.finish_job(
            session,
            job_id=job_id,
            worker_id=self.cfg.worker_id,
            attempt=attempt,
            state=state,
            error=error,
            result=result,
        )
        log.info("job %s %s%s", job_id, state, "" if owned else " (lease lost: not recorded)")

    def _register(self, session: Session, run: Running, result: str | None) -> None:
        if result is None:
            return
        # the write lock first (SQLite): inspecting a store on S3 takes a while, and a read
        # transaction that writes after another writer committed fails at once
        session.rollback()
        queue.begin_exclusive(session)
        try:
            register_artifact(session, self.data_dir, result, job_id=run.job_id)
        except ArtifactError as e:
            session.rollback()
            log.info("job %s wrote %s, which is no artifact to register: %s", run.job_id, result, e)

    def _register_partial(self, session: Session, run: Running, out: Path) -> None:
        session.rollback()
        queue.begin_exclusive(session)
        job = session.get(Job, run.job_id)
        try:
            register_partial(session, self.data_dir, out, job)
        except ArtifactError as e:
            session.rollback()
            log.info("job %s: partial output not registered: %s", run.job_id, e)

    # -- stopping

    def _shut_down(self) -> None:
        """Stop claiming; running jobs stop at their next step and go back to the queue."""
        for run in self.running.values():
            if run.stopping is None:  # a job being cancelled ends cancelled
                self._ask_to_stop(run, "shutdown")
        while self.running:
            self._tend_all()
            time.sleep(min(self.cfg.poll_s, 0.2))
        self.backend.close()
        log.info("worker %s stopped", self.cfg.worker_id)


# ----------------------------------------------------------------------------- entry point


def open_database(cfg: WorkerConfig) -> sessionmaker:
    """Sessions on the worker's database; the embedded SQLite default is migrated here, a
    shared database must have been migrated at deployment (`sparse-circuits db upgrade`)."""
    url = database_url(cfg.data_dir, cfg.database_url)
    if url.startswith("sqlite"):
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(url)
    engine = make_engine(url)
    if not schema_is_current(engine):
        raise StageError(
            "the database schema is not at the newest migration: run `sparse-circuits db upgrade "
            "--database-url URL` once for this deployment"
        )
    return make_sessionmaker(engine)


def _serve_metrics(worker: Worker, port: int) -> None:
    from .worker_metrics import serve_worker_metrics  # noqa: PLC0415

    serve_worker_metrics(worker, port)


def run_worker(cfg: WorkerConfig, stop: threading.Event | None = None) -> None:
    """Run jobs until SIGTERM/SIGINT (in the main thread), `stop` being set, or idle_exit_s."""
    worker = Worker(cfg, open_database(cfg), make_backend(cfg.backend, cfg))
    if stop is not None:
        worker.stop_event = stop
    if cfg.metrics_port is not None:
        _serve_metrics(worker, cfg.metrics_port)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: worker.stop_event.set())
    worker.run()
