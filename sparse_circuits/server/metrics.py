"""Prometheus metrics: requests by route and status, latencies, queue depth, job outcomes,
graph cache hits.

The counters live in one registry of this module (`REGISTRY`), so every app in a process adds to
the same series; `/metrics` renders it. Queue depth and job outcomes are read from the database
when scraped (a worker or another replica changes jobs, not this process), through a collector
that each app registers with its own sessionmaker.

Others increment what they own, e.g. the graphs routes::

    from sparse_circuits.server.metrics import GRAPH_CACHE
    GRAPH_CACHE.labels(result="hit").inc()
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..jobs.db import JOB_STATES, Job

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "sparse_circuits_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "sparse_circuits_http_request_seconds",
    "Time to answer a request (to the end of its body), by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
GRAPH_CACHE = Counter(
    "sparse_circuits_graph_cache",
    "Pruned graph JSON lookups in the cache, by result (hit or miss).",
    ["result"],
    registry=REGISTRY,
)
JOBS_SUBMITTED = Counter(
    "sparse_circuits_jobs_submitted",
    "Jobs submitted through this process, by kind.",
    ["kind"],
    registry=REGISTRY,
)


class JobsCollector(Collector):
    """Queue depth (queued, running) and outcomes (succeeded, failed, cancelled) by kind, read
    from the database at scrape time."""

    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def collect(self):
        depth = GaugeMetricFamily(
            "sparse_circuits_jobs_queue_depth",
            "Jobs waiting or running, by state.",
            labels=["state"],
        )
        outcomes = GaugeMetricFamily(
            "sparse_circuits_jobs_finished",
            "Jobs in a terminal state, by kind and state.",
            labels=["kind", "state"],
        )
        try:
            with self.sessions() as session:
                rows = session.execute(
                    select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
                ).all()
        except Exception:  # a scrape must not fail because the database is down
            log.warning("metrics: could not read the jobs table", exc_info=True)
            rows = []
        by_state = dict.fromkeys(("queued", "running"), 0)
        for kind, state, n in rows:
            if state in by_state:
                by_state[state] += n
            elif state in JOB_STATES:
                outcomes.add_metric([kind, state], n)
        for state, n in by_state.items():
            depth.add_metric([state], n)
        yield depth
        yield outcomes


def render(sessions: sessionmaker) -> bytes:
    """The text exposition of this process's metrics plus the jobs read from `sessions`."""
    jobs = CollectorRegistry(auto_describe=False)
    jobs.register(JobsCollector(sessions))
    return generate_latest(REGISTRY) + generate_latest(jobs)


def route_template(scope: Scope) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`): the path with each path parameter's
    segment put back as `{name}`; `<unmatched>` when no route matched."""
    if scope.get("route") is None:
        return "<unmatched>"
    segments = scope.get("path", "").split("/")
    for name, value in (scope.get("path_params") or {}).items():
        for i in range(len(segments) - 1, -1, -1):
            if segments[i] == str(value):
                segments[i] = "{" + name + "}"
                break
    return "/".join(segments)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (not its raw path, so ids do
    not make new series); unknown paths count under `<unmatched>`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            name = route_template(scope)
            method = scope.get("method", "")
            REQUESTS.labels(name, method, str(status)).inc()
            LATENCY.labels(name, method).observe(time.perf_counter() - start)
