"""Jobs: submit a stage's config, list, get, cancel, retry, follow (server-sent events).

A job is `(kind, config)`: `kind` names a pipeline stage and `config` is exactly that stage's
config, validated at submission with its paths resolved inside the data dir. The event streams
read the database (another replica or a worker changes jobs, not this process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...jobs.db import JOB_STATES, Artifact, Job, utcnow
from ...jobs.queue import (
    TERMINAL_STATES,
    JobStateError,
    cancel_job,
    get_job,
    list_jobs,
    retry_job,
    submit_job,
)
from ...jobs.specs import JobSpecError, validate_job
from ...stages import STAGES
from ..deps import ReadKeyDep, SessionDep, SettingsDep, WriteKeyDep, begin_write
from ..metrics import JOBS_SUBMITTED
from ..problems import ProblemError, problem_responses
from .artifacts import ArtifactPublic, artifact_public, read_metrics_log

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=problem_responses(404))

JobKind = Literal[tuple(STAGES)]  # type: ignore[valid-type]
JobState = Literal[JOB_STATES]  # type: ignore[valid-type]
JobIdParam = Annotated[str, PathParam(min_length=1, max_length=64, description="The job's id.")]
SSE = "text/event-stream"
SSE_RESPONSE = {
    200: {
        "content": {SSE: {"schema": {"type": "string"}}},
        "description": "Server-sent events: `event: job`, data = the JobPublic JSON.",
    }
}


class JobCreate(BaseModel):
    """A job: a pipeline stage and exactly the config its CLI command takes."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind = Field(description="The stage to run (`sparse-circuits KIND --help`).")
    config: dict[str, Any] = Field(
        description="That stage's config, as JSON. Paths are relative to the data dir (absolute "
        "paths inside it are accepted); a path outside it is refused.",
        examples=[{"out": "models/addition-dense", "steps": 200}],
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Runs before it is marked failed.")


class JobPublic(BaseModel):
    """One job: its config, state, progress, latest metrics, log tail and artifacts."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    config: dict[str, Any]
    state: str = Field(description="queued, running, succeeded, failed or cancelled.")
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    max_attempts: int = 3
    cancel_requested: bool = False
    step: int | None = Field(None, description="Progress: steps done of `total`.")
    total: int | None = None
    progress_desc: str | None = Field(None, description="What the current progress bar counts.")
    metrics: dict[str, Any] | None = Field(None, description="The latest metrics it reported.")
    log_tail: str | None = Field(None, description="The last lines of its log.")
    error: str | None = None
    result: str | None = Field(None, description="The artifact path the stage returned.")
    artifacts: list[ArtifactPublic] = Field(default_factory=list)
    host: str | None = None
    pid: int | None = None
    backend: str | None = None
    backend_ref: str | None = None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="How many match the filters, before limit and offset.")


def job_public(session: Session, job: Job) -> JobPublic:
    artifacts = session.scalars(
        select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.created_at)
    )
    out = JobPublic.model_validate(job)
    out.artifacts = [artifact_public(a) for a in artifacts]
    return out


def get_job_or_404(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id=job_id)
    if job is None:
        raise ProblemError(404, f"no job with id {job_id!r}", id=job_id)
    return job


@router.post(
    "",
    response_model=JobPublic,
    status_code=201,
    summary="Submit a job",
    responses=problem_responses(429),
)
def submit(
    body: JobCreate, session: SessionDep, settings: SettingsDep, key: WriteKeyDep
) -> JobPublic:
    session.commit()  # the key is checked: validating (a stage's first import) holds no lock
    config = validate_config(body.kind, body.config, settings.data_dir)
    begin_write(session)  # the count and the insert: one transaction, SQLite's lock held
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.key_id == key.id, Job.state.in_(("queued", "running")))
    )
    if active >= settings.max_active_jobs_per_key:
        raise ProblemError(
            429,
            f"the key {key.prefix}… has {active} queued or running jobs, the most allowed "
            f"({settings.max_active_jobs_per_key}); wait for one to finish",
        )
    job = submit_job(
        session, kind=body.kind, config=config, max_attempts=body.max_attempts, key_id=key.id
    )
    JOBS_SUBMITTED.labels(body.kind).inc()
    log.info("job %s (%s) submitted by key %s", job.id, job.kind, key.prefix)
    return job_public(session, job)


@router.get("", response_model=JobsPublic, summary="List jobs, newest first")
def list_(
    session: SessionDep,
    _key: ReadKeyDep,
    kind: Annotated[JobKind | None, Query(description="Only this stage.")] = None,
    state: Annotated[JobState | None, Query(description="Only this state.")] = None,
    created_after: Annotated[datetime | None, Query(description="Created at or after.")] = None,
    created_before: Annotated[datetime | None, Query(description="Created before.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> JobsPublic:
    jobs, count = list_jobs(
        session,
        kind=kind,
        state=state,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        offset=offset,
    )
    return JobsPublic(data=[job_public(session, j) for j in jobs], count=count)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
    summary="Every job's changes, as server-sent events",
    description="One `event: job` per change of any job from now on (each replica and worker "
    "writes to the database; this reads it). `max_seconds` ends the stream (clients reconnect).",
)
async def all_events(
    request: Request,
    _key: ReadKeyDep,
    max_seconds: Annotated[float | None, Query(gt=0, le=86400)] = None,
) -> StreamingResponse:
    sessions, poll = request.app.state.sessionmaker, request.app.state.settings.events_poll_s
    return StreamingResponse(
        _stream_all(request, sessions, poll, max_seconds), media_type=SSE, headers=_SSE_HEADERS
    )


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job")
def get(session: SessionDep, _key: ReadKeyDep, job_id: JobIdParam) -> JobPublic:
    return job_public(session, get_job_or_404(session, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one stops at its next step, its "
    "partial artifact kept and marked. 409 when it has finished already.",
)
def cancel(session: SessionDep, _key: WriteKeyDep, job_id: JobIdParam) -> JobPublic:
    return _transition(session, job_id, cancel_job)


@router.post(
    "/{job_id}/retry",
    response_model=JobPublic,
    summary="Run a failed or cancelled job again",
    description="The job goes back to the queue and resumes from what it wrote. 409 unless it "
    "failed or was cancelled.",
)
def retry(session: SessionDep, _key: WriteKeyDep, job_id: JobIdParam) -> JobPublic:
    return _transition(session, job_id, retry_job)


def _transition(session, job_id: str, change) -> JobPublic:
    """Apply a queue state change: 404 for an unknown job, 409 for a state that forbids it."""
    try:
        job = change(session, job_id=job_id)
    except KeyError:
        raise ProblemError(404, f"no job with id {job_id!r}", id=job_id) from None
    except JobStateError as e:
        raise ProblemError(409, str(e), id=job_id) from None
    return job_public(session, job)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
    summary="Follow one job, as server-sent events",
    description="`event: job` with the JobPublic JSON now and on every change; the stream ends "
    "after a terminal state (or after `max_seconds`).",
)
async def events(
    request: Request,
    _key: ReadKeyDep,
    job_id: JobIdParam,
    max_seconds: Annotated[float | None, Query(gt=0, le=86400)] = None,
) -> StreamingResponse:
    sessions, poll = request.app.state.sessionmaker, request.app.state.settings.events_poll_s
    first = await run_in_threadpool(_snapshot, sessions, job_id)
    if first is None:
        raise ProblemError(404, f"no job with id {job_id!r}", id=job_id)
    return StreamingResponse(
        _stream_one(request, sessions, job_id, first, poll, max_seconds),
        media_type=SSE,
        headers=_SSE_HEADERS,
    )


@router.get(
    "/{job_id}/metrics-log",
    response_model=list[dict[str, Any]],
    summary="Its run's metrics.jsonl records (training curves)",
)
def metrics_log(
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    job_id: JobIdParam,
    limit: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
) -> list[dict[str, Any]]:
    job = get_job_or_404(session, job_id)
    for candidate in (job.result, (job.config or {}).get("out")):
        if isinstance(candidate, str) and candidate:
            path = Path(candidate)
            path = path if path.is_absolute() else settings.data_dir / path
            records = read_metrics_log(path, limit)
            if records:
                return records
    return []


# --- event streams ------------------------------------------------------------------------

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_KEEPALIVE_S = 15.0
_LOOKBACK = timedelta(seconds=5)


def _sse(job: JobPublic) -> bytes:
    return f"event: job\nid: {job.id}\ndata: {job.model_dump_json()}\n\n".encode()


def _visible(job: JobPublic) -> dict:
    """What a follower sees change: everything but `updated_at` (a heartbeat moves it alone)."""
    return job.model_dump(exclude={"updated_at"})


def _snapshot(sessions, job_id: str) -> JobPublic | None:
    with sessions() as session:
        job = session.get(Job, job_id)
        return None if job is None else job_public(session, job)


def _changed_since(sessions, since: datetime) -> list[JobPublic]:
    with sessions() as session:
        q = select(Job).where(Job.updated_at >= since).order_by(Job.updated_at, Job.id)
        return [job_public(session, j) for j in session.scalars(q.limit(1000))]


async def _stream_one(request, sessions, job_id, first, poll, max_seconds) -> AsyncIterator[bytes]:
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    last, last_sent = first, time.monotonic()
    yield _sse(first)
    while last.state not in TERMINAL_STATES:
        if deadline is not None and time.monotonic() >= deadline:
            return
        await asyncio.sleep(poll)
        if await request.is_disconnected():
            return
        now = await run_in_threadpool(_snapshot, sessions, job_id)
        if now is None:  # deleted under us
            return
        if _visible(now) != _visible(last):
            last, last_sent = now, time.monotonic()
            yield _sse(now)
        elif time.monotonic() - last_sent > _KEEPALIVE_S:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"


async def _stream_all(request, sessions, poll, max_seconds) -> AsyncIterator[bytes]:
    """Jobs whose `updated_at` moved since the stream began. A write stamped before it committed
    can land behind the newest stamp seen, so each read looks back `_LOOKBACK` and `seen`
    drops what was sent already."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    watermark, last_sent = utcnow(), time.monotonic()
    recent = await run_in_threadpool(_changed_since, sessions, watermark - _LOOKBACK)
    seen = {job.id: job.updated_at for job in recent}  # as they were before: not news
    yield b": jobs\n\n"
    while deadline is None or time.monotonic() < deadline:
        await asyncio.sleep(poll)
        if await request.is_disconnected():
            return
        for job in await run_in_threadpool(_changed_since, sessions, watermark - _LOOKBACK):
            if seen.get(job.id) != job.updated_at:
                seen[job.id], last_sent = job.updated_at, time.monotonic()
                yield _sse(job)
            watermark = max(watermark, job.updated_at or watermark)
        cutoff = watermark - _LOOKBACK
        seen = {k: v for k, v in seen.items() if v is None or v >= cutoff}
        if time.monotonic() - last_sent > _KEEPALIVE_S:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"


def validate_config(kind: str, config: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """The stage's config validated and its paths confined to the data dir, as JSON; a 422
    problem naming each field at fault otherwise."""
    try:
        return validate_job(kind, config, data_dir).model_dump(mode="json")
    except JobSpecError as e:
        errors = [
            {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": "value_error"}
            for err in e.errors
        ]
        raise ProblemError(422, f"invalid {kind} job: {e}", errors=errors) from None
