"""The job queue's conformance tests, run on SQLite and on a real PostgreSQL server: migrations
match the models, claims are exclusive under concurrency, leases expire, cancel/retry follow the
state machine, filters and pagination."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import update

from sparse_circuits.jobs import queue
from sparse_circuits.jobs.db import (
    Base,
    Job,
    make_engine,
    make_sessionmaker,
    migrate,
    schema_is_current,
    utcnow,
)


@pytest.fixture
def sessions(migrated_url):
    engine = make_engine(migrated_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def _submit(make_session, n: int = 1, kind: str = "train-toy", **kw) -> list[str]:
    with make_session() as s:
        return [queue.submit_job(s, kind=kind, config={"out": f"m{i}"}, **kw).id for i in range(n)]


def test_migrated_schema_matches_the_models(database_url):
    migrate(database_url)
    migrate(database_url)  # already at head: nothing to do
    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert schema_is_current(engine)
    engine.dispose()


def test_replicas_upgrading_at_once_wait_for_each_other(database_url):
    code = "import sys; from sparse_circuits.jobs.db import migrate; migrate(sys.argv[1])"
    replicas = [
        subprocess.Popen([sys.executable, "-c", code, database_url], stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    for replica in replicas:
        _, err = replica.communicate(timeout=120)
        assert replica.returncode == 0, err.decode()
    engine = make_engine(database_url)
    assert schema_is_current(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_claim_is_exclusive_under_concurrency(sessions):
    ids = _submit(sessions, 12)
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimer(worker: int) -> None:
        try:
            with sessions() as s:
                while (job := queue.claim_job(s, worker_id=f"w{worker}", lease_s=60)) is not None:
                    with lock:
                        claimed.append(job.id)
        except BaseException as e:  # surfaced below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(claimed) == sorted(ids)  # every job claimed, none twice
    with sessions() as s:
        jobs = [queue.get_job(s, job_id=i) for i in ids]
    assert all(j.state == "running" and j.attempts == 1 and j.worker_id for j in jobs)


def test_claim_takes_the_oldest_queued_job(sessions):
    first, second = _submit(sessions, 2)
    with sessions() as s:
        assert queue.claim_job(s, worker_id="w", lease_s=60).id == first
        assert queue.claim_job(s, worker_id="w", lease_s=60).id == second
        assert queue.claim_job(s, worker_id="w", lease_s=60) is None


def _expire(make_session, job_id: str) -> None:
    with make_session() as s:
        past = utcnow() - timedelta(seconds=1)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))
        s.commit()


def test_an_expired_lease_requeues_and_the_old_holder_learns_it(sessions):
    (job_id,) = _submit(sessions)
    with sessions() as s:
        assert queue.claim_job(s, worker_id="a", lease_s=60)
        beat = queue.heartbeat(s, job_id=job_id, worker_id="a", attempt=1, lease_s=60, step=3)
        assert beat == queue.Heartbeat(owned=True, cancel_requested=False)
    _expire(sessions, job_id)
    with sessions() as s:
        again = queue.claim_job(s, worker_id="b", lease_s=60)
        assert again.id == job_id and again.attempts == 2 and again.worker_id == "b"
        # the first worker lost its lease: its heartbeat and its finish say so and write nothing
        assert not queue.heartbeat(s, job_id=job_id, worker_id="a", attempt=1, lease_s=60).owned
        assert not queue.finish_job(s, job_id=job_id, worker_id="a", attempt=1, state="failed")
        assert queue.finish_job(
            s, job_id=job_id, worker_id="b", attempt=2, state="succeeded", result="models/m0"
        )
        done = queue.get_job(s, job_id=job_id)
    assert (done.state, done.result, done.attempts) == ("succeeded", "models/m0", 2)
    assert done.finished_at is not None and done.lease_expires_at is None


def test_a_job_past_max_attempts_fails(sessions):
    (job_id,) = _submit(sessions, max_attempts=2)
    for worker in ("a", "b"):
        with sessions() as s:
            assert queue.claim_job(s, worker_id=worker, lease_s=60).id == job_id
        _expire(sessions, job_id)
    with sessions() as s:
        assert queue.claim_job(s, worker_id="c", lease_s=60) is None
        job = queue.get_job(s, job_id=job_id)
    assert job.state == "failed" and job.attempts == 2 and "attempt 2 of 2" in job.error


def test_heartbeat_stores_progress_and_reports_cancel(sessions):
    (job_id,) = _submit(sessions)
    with sessions() as s:
        queue.claim_job(s, worker_id="a", lease_s=1)
        before = queue.get_job(s, job_id=job_id).lease_expires_at
        time.sleep(0.01)
        queue.heartbeat(
            s, job_id=job_id, worker_id="a", attempt=1, lease_s=60, step=5, total=10,
            desc="train", metrics={"loss": 1.5}, log_tail="step 5\n",
        )  # fmt: skip
        job = queue.get_job(s, job_id=job_id)
        assert (job.step, job.total, job.progress_desc) == (5, 10, "train")
        assert job.metrics == {"loss": 1.5} and job.log_tail == "step 5\n"
        assert job.lease_expires_at > before + timedelta(seconds=30)
        assert queue.cancel_job(s, job_id=job_id).state == "running"
        beat = queue.heartbeat(s, job_id=job_id, worker_id="a", attempt=1, lease_s=60)
        assert beat == queue.Heartbeat(owned=True, cancel_requested=True)
        assert queue.finish_job(s, job_id=job_id, worker_id="a", attempt=1, state="cancelled")
        assert queue.get_job(s, job_id=job_id).state == "cancelled"


def test_cancel_and_retry_follow_the_state_machine(sessions):
    queued, running = _submit(sessions, 2)
    with sessions() as s:
        assert queue.claim_job(s, worker_id="a", lease_s=60).id == queued
        # now `queued` runs; cancel the other one while it waits
        job = queue.cancel_job(s, job_id=running)
        assert job.state == "cancelled" and job.finished_at is not None
        assert queue.claim_job(s, worker_id="a", lease_s=60) is None  # a cancelled job never runs
        with pytest.raises(queue.JobStateError):
            queue.cancel_job(s, job_id=running)
        with pytest.raises(queue.JobStateError):
            queue.retry_job(s, job_id=queued)  # running
        with pytest.raises(KeyError):
            queue.cancel_job(s, job_id="nosuchjob")
        queue.finish_job(s, job_id=queued, worker_id="a", attempt=1, state="failed", error="boom")
        for job_id in (queued, running):
            job = queue.retry_job(s, job_id=job_id)
            assert (job.state, job.attempts, job.error, job.cancel_requested) == (
                "queued", 0, None, False,
            )  # fmt: skip
        claimed = {queue.claim_job(s, worker_id="b", lease_s=60).id for _ in range(2)}
        assert claimed == {queued, running}


def test_release_requeues_counting_the_attempt_only_for_a_dead_run(sessions):
    (job_id,) = _submit(sessions)
    with sessions() as s:
        queue.claim_job(s, worker_id="a", lease_s=60)
        assert queue.release_job(s, job_id=job_id, worker_id="a", attempt=1) == "queued"
        job = queue.get_job(s, job_id=job_id)
        assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None)
        assert queue.release_job(s, job_id=job_id, worker_id="a", attempt=1) is None  # not ours
        # a run that died counts its attempt; past max_attempts the job fails
        for attempt in (1, 2, 3):
            assert queue.claim_job(s, worker_id="b", lease_s=60).attempts == attempt
            state = queue.release_job(
                s, job_id=job_id, worker_id="b", attempt=attempt, count_attempt=True, error="died"
            )
            assert state == ("failed" if attempt == 3 else "queued")
        assert "died (attempt 3 of 3)" in queue.get_job(s, job_id=job_id).error
        # a job asked to cancel ends cancelled, whatever its run's end
        queue.retry_job(s, job_id=job_id)
        assert queue.claim_job(s, worker_id="b", lease_s=60).id == job_id
        queue.cancel_job(s, job_id=job_id)
        state = queue.release_job(s, job_id=job_id, worker_id="b", attempt=1, count_attempt=True)
        assert state == "cancelled"


def test_list_filters_and_paginates(sessions):
    toys = _submit(sessions, 5, kind="train-toy")
    clts = _submit(sessions, 3, kind="train-clt")
    with sessions() as s:
        queue.cancel_job(s, job_id=clts[0])
        page, count = queue.list_jobs(s, kind="train-toy", limit=2)
        assert count == 5 and [j.id for j in page] == toys[::-1][:2]  # newest first
        page, count = queue.list_jobs(s, kind="train-toy", limit=2, offset=4)
        assert count == 5 and [j.id for j in page] == [toys[0]]
        assert queue.list_jobs(s, state="cancelled")[1] == 1
        assert queue.list_jobs(s, state=["queued", "cancelled"])[1] == 8
        assert queue.list_jobs(s, kind="train-clt", state="queued")[1] == 2
        middle = queue.get_job(s, job_id=toys[2]).created_at
        after, n_after = queue.list_jobs(s, created_after=middle, limit=100)
        assert n_after == 6 and toys[2] in {j.id for j in after}
        assert queue.list_jobs(s, created_before=middle)[1] == 2
        assert queue.queue_depth(s) == {"queued": 7, "cancelled": 1}
