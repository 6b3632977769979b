"""The durable job queue: small keyword-only functions over the `jobs` table.

States: queued → running → succeeded | failed | cancelled. A running job holds a lease (the
worker's id and an expiry) that heartbeats renew; `claim_job` takes the oldest queued job in
one transaction (`FOR UPDATE SKIP LOCKED` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite) and first
returns to the queue every running job whose lease expired, so a job never runs twice at once
and a dead worker's job is taken up by the next claim (the stage's own resume continues it).
A lease is owned by (worker id, attempt number): a worker whose lease was taken learns it from
`heartbeat`/`finish_job` and stops. Each function commits its own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from .db import Job, utcnow

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
RETRYABLE_STATES = ("failed", "cancelled")


class JobStateError(ValueError):
    """An operation the job's state does not allow (e.g. retrying a running job)."""


class Heartbeat(NamedTuple):
    """A heartbeat's answer: whether the lease is still ours, and whether to cancel."""

    owned: bool
    cancel_requested: bool


# ----------------------------------------------------------------------------- submit and read


def submit_job(
    session: Session,
    *,
    kind: str,
    config: dict[str, Any],
    max_attempts: int = 3,
    key_id: str | None = None,
) -> Job:
    """Queue a job; `config` must already be validated (`specs.validate_job`)."""
    job = Job(
        kind=kind,
        config=config,
        state="queued",
        max_attempts=max_attempts,
        key_id=key_id,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    session.commit()
    return job


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def list_jobs(
    session: Session,
    *,
    kind: str | None = None,
    state: str | Sequence[str] | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    key_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """Jobs matching the filters, newest first, one page of them, and how many match in all."""
    query = _filtered(select(Job), kind, state, created_after, created_before, key_id)
    count_query = _filtered(
        select(func.count()).select_from(Job), kind, state, created_after, created_before, key_id
    )
    page = query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    return list(session.scalars(page)), int(session.scalar(count_query) or 0)


def _filtered(
    query: Select,
    kind: str | None,
    state: str | Sequence[str] | None,
    created_after: datetime | None,
    created_before: datetime | None,
    key_id: str | None,
) -> Select:
    if kind is not None:
        query = query.where(Job.kind == kind)
    if isinstance(state, str):
        query = query.where(Job.state == state)
    elif state is not None:
        query = query.where(Job.state.in_(list(state)))
    if created_after is not None:
        query = query.where(Job.created_at >= created_after)
    if created_before is not None:
        query = query.where(Job.created_at < created_before)
    if key_id is not None:
        query = query.where(Job.key_id == key_id)
    return query


def queue_depth(session: Session) -> dict[str, int]:
    """How many jobs are in each state (for metrics)."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
    return {state: int(n) for state, n in rows}


# ----------------------------------------------------------------------------- claim and lease


def begin_exclusive(session: Session) -> None:
    """Start the session's transaction holding SQLite's write lock (a no-op elsewhere)."""
    session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})


def _locking(query: Select, session: Session) -> Select:
    """Row locks that other claimers skip (PostgreSQL); SQLite's lock is the whole database."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def claim_job(
    session: Session,
    *,
    worker_id: str,
    lease_s: float,
    backend: str = "local",
    kinds: Sequence[str] | None = None,
) -> Job | None:
    """Requeue jobs whose lease expired, then take the oldest queued job (or None), in one
    transaction: the job is `running`, leased to `worker_id` for `lease_s`, its attempt counted,
    `backend` the one that will run it. Starts a fresh transaction on `session`."""
    session.rollback()  # a fresh transaction, begun with the write lock on SQLite
    begin_exclusive(session)
    now = utcnow()
    _expire_leases(session, now)
    query = select(Job).where(Job.state == "queued")
    if kinds is not None:
        query = query.where(Job.kind.in_(list(kinds)))
    job = session.scalars(
        _locking(query.order_by(Job.created_at, Job.id).limit(1), session)
    ).first()
    if job is None:
        session.commit()
        return None
    job.state, job.worker_id, job.attempts = "running", worker_id, job.attempts + 1
    job.backend = backend
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    job.started_at = job.started_at or now
    job.error, job.host, job.pid, job.backend_ref = None, None, None, None
    session.commit()
    return job


def _expire_leases(session: Session, now: datetime) -> list[Job]:
    """Return to the queue (or fail, past max_attempts; or cancel, if asked) every running job
    whose lease ran out: its worker died or lost contact."""
    query = select(Job).where(Job.state == "running", Job.lease_expires_at < now)
    expired = list(session.scalars(_locking(query, session)))
    for job in expired:
        if job.cancel_requested:
            _end(job, "cancelled", "cancelled; its worker stopped answering", now)
        elif job.attempts >= job.max_attempts:
            _end(
                job,
                "failed",
                f"the lease expired on attempt {job.attempts} of {job.max_attempts}",
                now,
            )
        else:
            _requeue(job)
            job.error = f"the lease of attempt {job.attempts} expired (worker lost); requeued"
    session.flush()
    return expired


def requeue_expired(session: Session) -> list[Job]:
    """`claim_job`'s first half alone: requeue jobs whose lease expired."""
    session.rollback()
    begin_exclusive(session)
    expired = _expire_leases(session, utcnow())
    session.commit()
    return expired


def _owned(job_id: str, worker_id: str, attempt: int):
    return (
        Job.id == job_id,
        Job.state == "running",
        Job.worker_id == worker_id,
        Job.attempts == attempt,
    )


def record_runner(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    attempt: int,
    host: str | None,
    pid: int | None,
    backend_ref: str | None,
) -> bool:
    """Note where the job runs (host, pid, backend ref); False when the lease is no longer ours."""
    values = {"host": host, "pid": pid, "backend_ref": backend_ref}
    done = session.execute(update(Job).where(*_owned(job_id, worker_id, attempt)).values(**values))
    session.commit()
    return done.rowcount == 1


def heartbeat(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    attempt: int,
    lease_s: float,
    step: int | None = None,
    total: int | None = None,
    desc: str | None = None,
    metrics: dict[str, Any] | None = None,
    log_tail: str | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> Heartbeat:
    """Renew the lease and store progress (and the host and pid of the job's process, once it
    reports them); says whether the lease is still ours and whether the job was asked to
    cancel. Fields given as None are left as they were."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    given = {"step": step, "total": total, "progress_desc": desc, "metrics": metrics}
    given |= {"host": host, "pid": pid}
    values |= {k: v for k, v in given.items() if v is not None}
    if log_tail is not None:
        values["log_tail"] = log_tail
    done = session.execute(update(Job).where(*_owned(job_id, worker_id, attempt)).values(**values))
    session.commit()
    if done.rowcount != 1:
        return Heartbeat(owned=False, cancel_requested=False)
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return Heartbeat(owned=True, cancel_requested=bool(cancel))


def finish_job(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    attempt: int,
    state: str,
    error: str | None = None,
    result: str | None = None,
) -> bool:
    """End a job the worker still holds: succeeded, failed or cancelled. False when the lease
    was lost (another worker has it, or it was requeued): nothing is written then."""
    if state not in TERMINAL_STATES:
        raise ValueError(f"a job ends in one of {TERMINAL_STATES}, not {state!r}")
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "lease_expires_at": None}
    values |= {"error": error, "result": result}
    done = session.execute(update(Job).where(*_owned(job_id, worker_id, attempt)).values(**values))
    session.commit()
    return done.rowcount == 1


def release_job(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    attempt: int,
    count_attempt: bool = False,
    error: str | None = None,
) -> str | None:
    """Give a running job back to the queue; the next claim resumes it. A worker shutting down
    does not count the attempt; a run that died (`count_attempt`) does, as a lost lease would:
    past max_attempts the job fails. A job asked to cancel ends cancelled instead. Returns the
    job's new state, or None if the lease was lost."""
    session.rollback()
    begin_exclusive(session)
    query = select(Job).where(*_owned(job_id, worker_id, attempt))
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    job = session.scalars(query.execution_options(populate_existing=True)).first()
    if job is None:
        session.rollback()
        return None
    if job.cancel_requested:
        _end(job, "cancelled", error, utcnow())
    elif count_attempt and job.attempts >= job.max_attempts:
        _end(
            job,
            "failed",
            f"{error or 'ended'} (attempt {job.attempts} of {job.max_attempts})",
            utcnow(),
        )
    else:
        _requeue(job)
        job.attempts = job.attempts if count_attempt else job.attempts - 1
        job.error = error
    state = job.state
    session.commit()
    return state


# ----------------------------------------------------------------------------- cancel and retry


def cancel_job(session: Session, *, job_id: str) -> Job:
    """queued → cancelled at once; running → cancel_requested (its worker stops it at the
    stage's next step). Raises KeyError for an unknown id, JobStateError for an ended job."""
    job = _locked_job(session, job_id)
    if job.state == "queued":
        _end(job, "cancelled", None, utcnow())
    elif job.state == "running":
        job.cancel_requested = True
    else:
        session.rollback()
        raise JobStateError(f"job {job_id} has already {job.state}; nothing to cancel")
    session.commit()
    return job


def retry_job(session: Session, *, job_id: str) -> Job:
    """failed or cancelled → queued again, with a fresh count of attempts; the stage resumes
    from what the earlier attempts checkpointed."""
    job = _locked_job(session, job_id)
    if job.state not in RETRYABLE_STATES:
        session.rollback()
        raise JobStateError(f"job {job_id} is {job.state}; only failed or cancelled jobs retry")
    job.state, job.attempts, job.cancel_requested = "queued", 0, False
    job.error, job.result, job.finished_at = None, None, None
    job.worker_id, job.lease_expires_at = None, None
    session.commit()
    return job


def _locked_job(session: Session, job_id: str) -> Job:
    session.rollback()
    begin_exclusive(session)
    query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    job = session.scalars(query).first()
    if job is None:
        session.rollback()
        raise KeyError(job_id)
    return job


def _requeue(job: Job) -> None:
    job.state, job.worker_id, job.lease_expires_at = "queued", None, None
    job.host, job.pid, job.backend_ref = None, None, None


def _end(job: Job, state: str, error: str | None, now: datetime) -> None:
    job.state, job.finished_at, job.lease_expires_at = state, now, None
    if error is not None:
        job.error = error
