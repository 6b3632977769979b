"""What runs inside a job's own process, whichever backend started it.

The worker writes `<data_dir>/jobs/<id>/spec.json` (kind, config, attempt, and the s3://
prefix when the data dir is one, `data_dir` being then this machine's cache of it) and has a backend
start `run_job_dir(data_dir, job_id)` (locally: a spawned child process; on Ray:
`python -m sparse_circuits.jobs.runner DATA_DIR JOB_ID` as the Ray job's entrypoint). The
runner works in the data dir (job paths are relative to it), logs to `log.txt`, installs a
progress sink that writes `progress.json` atomically and stops the stage at its next step once
a `cancel` file appears or SIGTERM/SIGINT arrives, marks a cancelled job's output partial
(`cancelled.json`), and ends by writing `outcome.json`. With an s3:// data dir it fetches the
job's inputs before the stage and uploads its outputs after (`remote.py`), before the outcome.
An exclusive lock on the job dir and a record per attempt in `attempts.jsonl` (host and pid:
the worker copies them into the job record) make "never twice at once" checkable; a runner
whose parent dies ends at once (it must not outlive its lease).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..io import released_locks, write_json
from ..progress import JobCancelled, ProgressSink, install_sink
from .artifacts import ArtifactError, relative_path
from .remote import fetch_job_inputs, remote_data_dir, upload_job_outputs
from .specs import validate_job

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
SPEC_FILE, PROGRESS_FILE, OUTCOME_FILE = "spec.json", "progress.json", "outcome.json"
CANCEL_FILE, LOG_FILE, OUTPUT_FILE = "cancel", "log.txt", "output.txt"
ATTEMPTS_FILE, LOCK_FILE = "attempts.jsonl", "lock"
CANCELLED_MARKER = "cancelled.json"  # in a cancelled job's out dir: the artifact is partial
LOCK_WAIT_S = 30.0  # a runner of the same job from a dead worker is dying: wait for it
PR_SET_PDEATHSIG = 1


def job_dir(data_dir: str | Path, job_id: str) -> Path:
    return Path(data_dir).resolve() / JOBS_DIR / job_id


def prepare_job_dir(
    data_dir: str | Path,
    job_id: str,
    kind: str,
    config: dict[str, Any],
    attempt: int,
    data_url: str | None = None,
) -> Path:
    """Write the spec of this attempt and clear what an earlier attempt left to act on."""
    path = job_dir(data_dir, job_id)
    path.mkdir(parents=True, exist_ok=True)
    for stale in (OUTCOME_FILE, CANCEL_FILE, PROGRESS_FILE):
        (path / stale).unlink(missing_ok=True)
    spec = {"kind": kind, "config": config, "attempt": attempt, "data_url": data_url}
    write_json(path / SPEC_FILE, spec)
    return path


def out_dir(data_dir: Path, config: dict[str, Any]) -> Path | None:
    """A job's local output directory (None for s3:// or a job without `out`)."""
    out = config.get("out")
    if not out or str(out).startswith("s3://"):
        return None
    return data_dir / out


def runner_of(path: Path, attempt: int) -> tuple[str, int] | None:
    """(host, pid) of the process that runs `attempt` of the job at `path`, once it has
    started (its record in attempts.jsonl); None before."""
    try:
        with open(path / ATTEMPTS_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first line cut by the seek, or one being written
        if record.get("attempt") == attempt:
            return str(record["host"]), int(record["pid"])
    return None


def request_stop(path: Path, reason: str) -> None:
    """Ask the job's runner to stop at the stage's next step (`reason`: cancel or shutdown)."""
    write_json(path / CANCEL_FILE, {"reason": reason})


def read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the child


class _Stop:
    """Set by SIGTERM/SIGINT or by the cancel file; the progress sink checks it."""

    def __init__(self, path: Path):
        self.path, self.signalled = path, False

    def __call__(self) -> bool:
        return self.signalled or (self.path / CANCEL_FILE).exists()

    def reason(self) -> str | None:
        """Why the worker asked the job to stop (cancel, shutdown); None if it did not ask."""
        return (read_json_or_none(self.path / CANCEL_FILE) or {}).get("reason")

    def on_signal(self, signum, _frame) -> None:
        log.info("signal %d: stopping at the next step", signum)
        self.signalled = True


def run_job_dir(data_dir: str, job_id: str) -> int:
    """Run the job whose spec is in its job dir; always writes outcome.json; returns 0."""
    path = job_dir(data_dir, job_id)
    _die_with_parent()
    data_dir = str(Path(data_dir).resolve())  # job paths are relative to it: it is the cwd
    os.chdir(data_dir)
    if _rank() > 0:  # under torchrun rank 0 reports for the job: lock, progress, outcome
        spec = json.loads((path / SPEC_FILE).read_text())
        return 1 if _run(path, Path(data_dir), spec, report=False)["state"] == "failed" else 0
    _redirect_output(path / OUTPUT_FILE)
    handler = _log_to(path / LOG_FILE)
    try:
        with _exclusive(path / LOCK_FILE):
            spec = json.loads((path / SPEC_FILE).read_text())
            _record_attempt(path, spec["attempt"])
            outcome = _run(path, Path(data_dir), spec)
            write_json(path / OUTCOME_FILE, {"attempt": spec["attempt"], **outcome})
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return 0


def _rank() -> int:
    """This process's rank under torchrun (a multi-GPU job); 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def _run(path: Path, data_dir: Path, spec: dict[str, Any], report: bool = True) -> dict[str, Any]:
    from ..stages import STAGES  # noqa: PLC0415  (the stage's module only in its own process)

    stop = _Stop(path)
    signal.signal(signal.SIGTERM, stop.on_signal)
    signal.signal(signal.SIGINT, stop.on_signal)
    writer = _progress_writer(path) if report else (lambda *_: None)
    install_sink(ProgressSink(report=writer, cancelled=stop, interval=0.5))
    kind = spec["kind"]
    remote = remote_data_dir(spec.get("data_url"), data_dir)
    log.info("job %s attempt %d: %s", path.name, spec["attempt"], kind)
    ran = False  # whether the stage started (then what it wrote is kept, and uploaded)
    try:
        runs_with = spec["config"]
        if remote is not None:
            runs_with = fetch_job_inputs(remote, kind, runs_with)
        config = validate_job(kind, runs_with, data_dir)
        ran = True
        with released_locks():  # the run dir's lock is free again once the stage ends
            result = STAGES[kind].run_function()(config)
    except JobCancelled:
        log.info("stopped at a step boundary; what the stage checkpointed is kept")
        outcome = {"state": "cancelled", "error": None, "result": None}
    except Exception as e:
        log.exception("the stage failed")
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        outcome = {"state": "failed", "error": detail, "result": None}
    else:
        log.info("done: %s", result)
        outcome = {"state": "succeeded", "error": None, "result": _result_path(data_dir, result)}
    finally:
        install_sink(None)
    if report and ran:
        outcome = _keep_output(path.name, data_dir, spec, outcome, stop.reason(), remote)
    return outcome


def _keep_output(
    job_id: str,
    data_dir: Path,
    spec: dict[str, Any],
    outcome: dict[str, Any],
    stop_reason: str | None,
    remote,
) -> dict[str, Any]:
    """Mark a cancelled job's output partial (a success clears the mark) and, with an s3://
    data dir, upload what the job wrote; an upload that fails fails the job (its output is
    kept here, and a retry uploads it)."""
    out = out_dir(data_dir, spec["config"])
    if out is not None and out.is_dir():
        if outcome["state"] == "succeeded":
            (out / CANCELLED_MARKER).unlink(missing_ok=True)
        elif outcome["state"] == "cancelled" and stop_reason != "shutdown":  # shutdown: requeued
            write_json(out / CANCELLED_MARKER, {"job_id": job_id, "attempt": spec["attempt"]})
    if remote is None:
        return outcome
    try:
        sent = upload_job_outputs(
            remote, spec["kind"], spec["config"], state=outcome["state"], job_id=job_id,
            attempt=spec["attempt"],
        )  # fmt: skip
    except Exception as e:
        log.exception("could not upload the job's output to %s", remote.url)
        return {
            "state": "failed",
            "error": f"could not upload to {remote.url}: {e}",
            "result": None,
        }
    if sent:
        log.info("uploaded to %s: %s", remote.url, ", ".join(sent))
    return outcome


def _result_path(data_dir: Path, result: Any) -> str | None:
    if result is None:
        return None
    try:
        return relative_path(data_dir, str(result))
    except ArtifactError:
        return str(result)


def _progress_writer(path: Path):
    def report(step: int, total: int | None, desc: str) -> None:
        write_json(path / PROGRESS_FILE, {"step": step, "total": total, "desc": desc})

    return report


def _record_attempt(path: Path, attempt: int) -> None:
    record = {"attempt": attempt, "pid": os.getpid(), "host": os.uname().nodename}
    record["locked_at"] = time.time()
    with open(path / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


class _exclusive:
    """An exclusive flock on `path`, waited for up to LOCK_WAIT_S."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise RuntimeError(f"another run of this job still holds {self.path}") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _die_with_parent() -> None:
    """End this process when the worker that started it dies (even by SIGKILL): its lease
    will expire and another worker will resume the job, which must not run twice at once."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:  # where prctl is missing
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _redirect_output(path: Path) -> None:
    """Terminal output (progress bars) to a file in the job dir: kept, never parsed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    """`python -m sparse_circuits.jobs.runner --data-dir D --job-id ID [--attempt N]`: a
    cluster backend's entrypoint (a Ray job's, say); the local backend calls run_job_dir."""
    parser = argparse.ArgumentParser(
        prog="python -m sparse_circuits.jobs.runner", description="Run one prepared job."
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--attempt", type=int, help="refuse to run a spec of another attempt")
    args = parser.parse_args(argv)
    spec = read_json_or_none(job_dir(args.data_dir, args.job_id) / SPEC_FILE) or {}
    if args.attempt is not None and spec.get("attempt") != args.attempt:
        log.error(
            "job %s: the spec is of attempt %s, not %d",
            args.job_id,
            spec.get("attempt"),
            args.attempt,
        )
        return 2
    return run_job_dir(args.data_dir, args.job_id)


if __name__ == "__main__":
    sys.exit(main())
