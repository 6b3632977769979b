"""Prometheus metrics of one worker process (`sparse-circuits worker --metrics-port N`).

Read when scraped, from the worker itself and from the database, so that the worker loop needs
no counters of its own and every figure is true across restarts:

- sparse_circuits_worker_info{worker_id, backend, host}: 1 (which worker this is)
- sparse_circuits_worker_jobs_running: jobs this worker runs now (out of its concurrency)
- sparse_circuits_worker_concurrency
- sparse_circuits_worker_job_progress{job_id, kind}: the fraction done of each running job
- sparse_circuits_worker_jobs{state, kind}: jobs whose last attempt was this worker's, by state
- sparse_circuits_worker_up_seconds

With the server's /metrics (requests, queue depth, job outcomes over all workers) this is what a
Prometheus scraping every replica and every worker of a deployment sees.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from .db import Job

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)


class WorkerCollector(Collector):
    """What `worker` is doing, read at each scrape."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.started = time.time()

    def collect(self):
        w, cfg = self.worker, self.worker.cfg
        info = GaugeMetricFamily(
            "sparse_circuits_worker_info", "This worker.", labels=["worker_id", "backend", "host"]
        )
        info.add_metric([cfg.worker_id, w.backend.name, socket.gethostname()], 1)
        yield info
        yield GaugeMetricFamily(
            "sparse_circuits_worker_jobs_running", "Jobs this worker runs now.", len(w.running)
        )
        yield GaugeMetricFamily(
            "sparse_circuits_worker_concurrency", "Jobs it runs at most.", cfg.concurrency
        )
        yield GaugeMetricFamily(
            "sparse_circuits_worker_up_seconds", "Since it started.", time.time() - self.started
        )
        progress = GaugeMetricFamily(
            "sparse_circuits_worker_job_progress",
            "Fraction done of each job it runs (steps of the current progress bar).",
            labels=["job_id", "kind"],
        )
        jobs = GaugeMetricFamily(
            "sparse_circuits_worker_jobs",
            "Jobs whose latest attempt this worker ran, by state and kind.",
            labels=["state", "kind"],
        )
        try:
            with w.sessions() as session:
                rows = session.execute(
                    select(Job.state, Job.kind, func.count())
                    .where(Job.worker_id == cfg.worker_id)
                    .group_by(Job.state, Job.kind)
                ).all()
                for state, kind, n in rows:
                    jobs.add_metric([state, kind], n)
                running = session.execute(
                    select(Job.id, Job.kind, Job.step, Job.total).where(Job.id.in_(list(w.running)))
                ).all()
                for job_id, kind, step, total in running:
                    if step is not None and total:
                        progress.add_metric([job_id, kind], step / total)
        except Exception:  # the database away for a moment: scrape what we know
            log.warning("worker metrics: could not read the database", exc_info=True)
        yield jobs
        yield progress


def serve_worker_metrics(worker: Worker, port: int, addr: str = "0.0.0.0") -> None:
    """Serve the default registry (process metrics) plus this worker's on `port` (a thread)."""
    from prometheus_client import REGISTRY, start_http_server  # noqa: PLC0415

    REGISTRY.register(WorkerCollector(worker))
    start_http_server(port, addr=addr)
    log.info("worker metrics on :%d/metrics", port)
