"""A Python client of the service, on httpx, typed with the server's own pydantic models.

    from sparse_circuits.client import Client

    with Client("http://127.0.0.1:8000", api_key="sc_...") as sc:
        job = sc.submit("train-clt", {"activations": "activations/a.zarr", "out": "clts/c"})
        job = sc.wait(job)                       # a progress bar fed by the job's event stream
        graph = sc.create_graph(model=m.id, transcoder=c.id, prompt="<bos>36+47=")
        doc = sc.graph_json(graph, node_threshold=0.8, edge_threshold=0.98)

An answer that is a problem document raises `ProblemError` carrying its status, detail and the
fields at fault; a job that ends failed or cancelled raises `JobFailed` from `wait`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from .server.routes.artifacts import ArtifactPublic, ArtifactsPublic
from .server.routes.features import FeaturePublic
from .server.routes.graphs import GraphPublic, GraphQueued, GraphsPublic
from .server.routes.jobs import JobPublic, JobsPublic

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
ARTIFACT_KINDS = {"model": "models", "store": "stores", "transcoder": "transcoders"}

M = TypeVar("M", bound=BaseModel)


class ProblemError(Exception):
    """An answer with an error status; `problem` is its RFC 9457 document (or what came)."""

    def __init__(self, status: int, problem: dict[str, Any], method: str = "", url: str = ""):
        self.status, self.problem, self.method, self.url = status, problem, method, url
        self.title = problem.get("title") or ""
        self.detail = problem.get("detail") or ""
        self.errors: list[dict[str, Any]] = problem.get("errors") or []
        super().__init__(
            f"{status} {self.title}: {self.detail}".rstrip(": ") + f" ({method} {url})"
        )


class JobFailed(Exception):
    """`wait` on a job that ended failed or cancelled; `job` is its final record."""

    def __init__(self, job: JobPublic):
        self.job = job
        super().__init__(f"job {job.id} ({job.kind}) {job.state}: {job.error or 'no error given'}")


def _id(thing: Any) -> str:
    """An id, or the id of a record (anything with `.id`, or a dict with 'id')."""
    if isinstance(thing, str):
        return thing
    if isinstance(thing, dict):
        return thing["id"]
    return thing.id


class Client:
    """The service at `base_url`; `api_key` is needed for writes (and reads on servers that ask
    for it). Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- plumbing

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request; an error status raises ProblemError."""
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def _get(self, path: str, model: type[M], **params) -> M:
        params = {k: v for k, v in params.items() if v is not None}
        return model.model_validate(self.request("GET", path, params=params).json())

    def _post(self, path: str, model: type[M], body: Any = None) -> M:
        return model.model_validate(self.request("POST", path, json=body).json())

    # ------------------------------------------------------------------------- jobs

    def submit(
        self, kind: str, config: dict[str, Any] | BaseModel, *, max_attempts: int | None = None
    ) -> JobPublic:
        """Queue a job: `kind` is a stage (`train-clt`, ...), `config` exactly its config (a
        dict or the stage's config object), paths relative to the server's data dir."""
        if isinstance(config, BaseModel):
            config = config.model_dump(mode="json", exclude_unset=True)
        body: dict[str, Any] = {"kind": kind, "config": config}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        return self._post("/v1/jobs", JobPublic, body)

    def job(self, job: Any) -> JobPublic:
        return self._get(f"/v1/jobs/{_id(job)}", JobPublic)

    def jobs(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> JobsPublic:
        return self._get(
            "/v1/jobs",
            JobsPublic,
            kind=kind,
            state=state,
            created_after=created_after.isoformat() if created_after else None,
            created_before=created_before.isoformat() if created_before else None,
            limit=limit,
            offset=offset,
        )

    def cancel(self, job: Any) -> JobPublic:
        return self._post(f"/v1/jobs/{_id(job)}/cancel", JobPublic)

    def retry(self, job: Any) -> JobPublic:
        return self._post(f"/v1/jobs/{_id(job)}/retry", JobPublic)

    def metrics_log(self, job: Any) -> list[dict[str, Any]]:
        """The job's metrics.jsonl records (its training curve so far)."""
        return self.request("GET", f"/v1/jobs/{_id(job)}/metrics-log").json()

    def events(self, job: Any, *, max_seconds: float | None = None) -> Iterator[JobPublic]:
        """The job's record now and at every change, until it ends (server-sent events)."""
        params = {"max_seconds": max_seconds} if max_seconds else {}
        with self.http.stream(
            "GET", f"/v1/jobs/{_id(job)}/events", params=params, timeout=httpx.Timeout(None)
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise _problem(response)
            for data in _sse_data(response.iter_lines()):
                yield JobPublic.model_validate_json(data)

    def wait(
        self,
        job: Any,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_s: float = 1.0,
        raise_on_failure: bool = True,
    ) -> JobPublic:
        """Block until the job ends; with `progress`, a tqdm bar shows its step/total and
        stage. Follows the event stream, and polls when the stream is unavailable. Raises
        JobFailed when it failed or was cancelled (unless `raise_on_failure=False`) and
        TimeoutError after `timeout` seconds."""
        from tqdm.auto import tqdm  # noqa: PLC0415

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=None, disable=not progress, desc=f"job {_id(job)}", unit="step")
        last: JobPublic | None = None
        try:
            for record in self._follow(job, deadline, poll_s):
                last = record
                _show(bar, record)
                if record.state in TERMINAL_STATES:
                    break
        finally:
            bar.close()
        if last is None or last.state not in TERMINAL_STATES:
            raise TimeoutError(
                f"job {_id(job)} still {last.state if last else '?'} after {timeout} s"
            )
        if raise_on_failure and last.state != "succeeded":
            raise JobFailed(last)
        return last

    def _follow(self, job: Any, deadline: float | None, poll_s: float) -> Iterator[JobPublic]:
        """Records of the job: from the event stream while it works, else by polling."""
        stream_ok = True
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if stream_ok:
                try:
                    for record in self.events(job, max_seconds=remaining):
                        yield record
                        if record.state in TERMINAL_STATES:
                            return
                    continue  # the stream ended early (max_seconds, a proxy): follow again
                except ProblemError:
                    raise
                except httpx.HTTPError as e:
                    log.info("event stream unavailable (%s); polling", e)
                    stream_ok = False
            record = self.job(job)
            yield record
            if record.state in TERMINAL_STATES:
                return
            time.sleep(poll_s)

    # ------------------------------------------------------------------------- artifacts

    def artifacts(self, kind: str, *, limit: int = 100, offset: int = 0) -> ArtifactsPublic:
        """Artifacts of `kind` (model, store or transcoder), newest first."""
        return self._get(f"/v1/{_plural(kind)}", ArtifactsPublic, limit=limit, offset=offset)

    def artifact(self, kind: str, artifact: Any) -> ArtifactPublic:
        return self._get(f"/v1/{_plural(kind)}/{_id(artifact)}", ArtifactPublic)

    def register(self, kind: str, path: str) -> ArtifactPublic:
        """Record an artifact already in the server's data dir (path relative to it)."""
        return self._post(f"/v1/{_plural(kind)}/register", ArtifactPublic, {"path": str(path)})

    def artifact_metrics_log(self, kind: str, artifact: Any) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/{_plural(kind)}/{_id(artifact)}/metrics-log").json()

    def models(self) -> list[ArtifactPublic]:
        return self.artifacts("model").data

    def stores(self) -> list[ArtifactPublic]:
        return self.artifacts("store").data

    def transcoders(self) -> list[ArtifactPublic]:
        return self.artifacts("transcoder").data

    # ------------------------------------------------------------------------- graphs, features

    def create_graph(
        self,
        *,
        model: Any,
        transcoder: Any,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        wait: bool = True,
        progress: bool = True,
        timeout: float | None = None,
        **options: Any,
    ) -> GraphPublic | GraphQueued:
        """Compute an attribution graph (options: targets, max_feature_nodes, max_n_logits,
        desired_logit_prob, qk_edges, qk_at, node_threshold, edge_threshold, slug). The server
        answers at once when it fits its time budget, else queues a job: with `wait` this
        follows that job, then returns the graph; without, the GraphQueued answer."""
        body = {"model": _id(model), "transcoder": _id(transcoder), **options}
        if prompt is not None:
            body["prompt"] = prompt
        if prompt_ids is not None:
            body["prompt_ids"] = prompt_ids
        response = self.request("POST", "/v1/graphs", json=body)
        if response.status_code != 202:
            return GraphPublic.model_validate(response.json())
        queued = GraphQueued.model_validate(response.json())
        if not wait:
            return queued
        self.wait(queued.job, progress=progress, timeout=timeout)
        return self.graph(queued.graph_id)

    def graph(self, graph: Any) -> GraphPublic:
        return self._get(f"/v1/graphs/{_id(graph)}", GraphPublic)

    def graphs(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> GraphsPublic:
        return self._get("/v1/graphs", GraphsPublic, limit=limit, offset=offset, **filters)

    def graph_json(
        self,
        graph: Any,
        *,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
    ) -> dict[str, Any]:
        """The graph JSON v1 of a pruning (pruned on the server; gzip on the wire)."""
        params = {"node_threshold": node_threshold, "edge_threshold": edge_threshold}
        params = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", f"/v1/graphs/{_id(graph)}/json", params=params).json()

    def delete_graph(self, graph: Any) -> None:
        self.request("DELETE", f"/v1/graphs/{_id(graph)}")

    def feature(self, transcoder: Any, layer: int, index: int) -> FeaturePublic:
        """One feature's statistics (top contexts, frequency, histogram, logits); a 409
        ProblemError names the feature-stats job to run when they are not computed yet."""
        return self._get(f"/v1/features/{_id(transcoder)}/{layer}/{index}", FeaturePublic)

    # ------------------------------------------------------------------------- health

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200


def _plural(kind: str) -> str:
    if kind in ARTIFACT_KINDS.values():
        return kind
    try:
        return ARTIFACT_KINDS[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(ARTIFACT_KINDS)}, not {kind!r}") from None


def _problem(response: httpx.Response) -> ProblemError:
    try:
        doc = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        doc = {"title": response.reason_phrase, "detail": response.text[:500]}
    return ProblemError(
        response.status_code, doc, response.request.method, str(response.request.url)
    )


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (multi-line data joined; comments skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _show(bar, job: JobPublic) -> None:
    if job.total is not None and bar.total != job.total:
        bar.total = job.total
    if job.step is not None:
        bar.n = job.step
    doing = job.progress_desc if job.progress_desc not in (None, "", job.kind) else None
    bar.set_description(f"{job.kind} {job.id}" + (f" ({doing})" if doing else ""), refresh=False)
    postfix = {"state": job.state}
    for key in ("loss", "fvu", "l0", "accuracy"):
        if job.metrics and isinstance(job.metrics.get(key), (int, float)):
            postfix[key] = f"{job.metrics[key]:.4g}"
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()
