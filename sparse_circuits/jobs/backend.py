"""How a claimed job is executed: one interface, local child processes its first implementation.

The worker loop (worker.py) claims jobs, heartbeats their leases and records their outcomes; it
never knows how a job runs. A backend starts the runner of a prepared job dir
(`runner.run_job_dir`), says whether it is still going, stops it gracefully (the stage raises
JobCancelled at its next step) or kills it, and says where it ran (host, pid, a backend ref
such as a Ray job id). Progress and outcome travel through files in the job dir, which every
backend shares with the worker (the data dir is shared storage for a cluster backend): the
runner (`runner.py`, also `python -m sparse_circuits.jobs.runner --data-dir D --job-id ID
--attempt N` as a cluster job's entrypoint) writes `progress.json`, `log.txt` and, last,
`outcome.json`. A run that ends without an outcome (killed, its node lost) goes back to the
queue counting the attempt, like a lost lease. A backend whose runs outlive their worker (Ray)
may adopt, in `start`, an earlier attempt that still runs instead of starting a second one.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import socket
from abc import ABC, abstractmethod
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, NamedTuple

from .runner import run_job_dir

log = logging.getLogger(__name__)


class Launch(NamedTuple):
    """A job ready to run: its job dir (`data_dir/jobs/<job_id>/spec.json`) is written; kind
    and config (validated, paths relative to the data dir) say what resources it needs."""

    job_id: str
    attempt: int
    data_dir: Path
    kind: str
    config: dict[str, Any]


class Started(NamedTuple):
    """Where a job runs: `ref` is what the backend knows it by; host and pid are None when
    the backend cannot tell before the job starts (a Ray job: its runner reports them)."""

    host: str | None
    pid: int | None
    ref: str


class JobBackend(ABC):
    """Runs jobs somewhere; the worker loop talks to every backend through these methods."""

    name: str

    @abstractmethod
    def start(self, launch: Launch) -> Started:
        """Start the runner of `launch`'s job dir and return at once."""

    @abstractmethod
    def poll(self, ref: str) -> int | None:
        """None while the job runs; its exit status once it has ended."""

    @abstractmethod
    def stop(self, ref: str) -> None:
        """Ask the job to stop at its next step (it checkpoints what it has and ends); the
        worker has already written the job dir's cancel file, which the runner checks."""

    @abstractmethod
    def kill(self, ref: str) -> None:
        """End the job now (its lease was lost, or it ignored `stop`)."""

    def close(self) -> None:
        """Release what the backend holds (connections...); running jobs are not touched."""
        return None


class LocalBackend(JobBackend):
    """Each job in a child process of the worker (multiprocessing's spawn context: a fresh
    interpreter, no state inherited from the worker's threads or database connections)."""

    name = "local"

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[str, BaseProcess] = {}

    def start(self, launch: Launch) -> Started:
        process = self._context.Process(
            target=run_job_dir,
            args=(str(launch.data_dir), launch.job_id),
            name=f"job-{launch.job_id}",
        )
        process.start()
        ref = f"{launch.job_id}:{launch.attempt}:{process.pid}"
        self._processes[ref] = process
        return Started(host=socket.gethostname(), pid=process.pid, ref=ref)

    def poll(self, ref: str) -> int | None:
        process = self._processes[ref]
        if process.exitcode is None:
            return None
        process.join()
        del self._processes[ref]
        return process.exitcode

    def stop(self, ref: str) -> None:
        """Nothing to send: the runner reads the job dir's cancel file at every step. (A signal
        could arrive before the spawned interpreter has installed the runner's handler.)"""
        return None

    def kill(self, ref: str) -> None:
        process = self._processes.get(ref)
        if process is not None and process.exitcode is None:
            process.kill()
            process.join(timeout=10)


# backend name -> "module:factory"; the factory takes the WorkerConfig (issue 10 adds "ray")
BACKENDS = {
    "local": "sparse_circuits.jobs.backend:_local_backend",
    "ray": "sparse_circuits.jobs.ray_backend:make_backend",
}


def _local_backend(_config) -> LocalBackend:
    return LocalBackend()


def make_backend(name: str, config) -> JobBackend:
    """The backend called `name`, built from the worker's config."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    module, factory = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), factory)(config)
    except ModuleNotFoundError as e:
        raise ValueError(f"the {name!r} backend is not available here: {e}") from e
