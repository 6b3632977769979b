"""Attribution graphs: create (inline within a time budget, else an `attribute` job), list, get,
the graph JSON v1 of any pruning (built from the compact store, cached, gzip on request), head
loadings of one link, one head's share, QK attribution of one attention edge on demand, the
viewer's saved subgraphs, delete.

A graph is an artifact of kind "graph" whose path is `graphs/<id>/`, a graph store
(attribution/graph_store.py). Its row is made when the graph is asked for: at once with state
"pending" when a job will make it (the worker's registration of the job's result, the same
path, completes it), after the store is written when it is made inline. Graph JSON files the
CLI wrote and the scan registered are graphs too, of one pruning: served as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...attribution import graph_store as gs
from ...errors import StageError
from ...jobs.artifacts import register_artifact
from ...jobs.db import Artifact, Job, new_id
from ...jobs.queue import TERMINAL_STATES, get_job, submit_job
from ..deps import ReadKeyDep, SessionDep, SettingsDep, WriteKeyDep
from ..graphs_service import (
    CachedDoc,
    GraphServices,
    clt_facts,
    estimate_seconds,
    graph_services,
)
from ..metrics import GRAPH_CACHE, JOBS_SUBMITTED
from ..problems import ProblemError, problem_responses
from ..settings import ServerSettings
from .jobs import JobPublic, job_public, validate_config

log = logging.getLogger(__name__)

router = APIRouter(prefix="/graphs", tags=["graphs"], responses=problem_responses(404))

GraphIdParam = Annotated[str, PathParam(min_length=1, max_length=64, description="The graph's id.")]
SubgraphName = Annotated[
    str,
    PathParam(
        pattern=gs.SUBGRAPH_NAME.pattern, description="1 to 64 letters, digits, '.', '_', '-'."
    ),
]
Threshold = Annotated[
    float | None,
    Query(ge=0, le=1, description="Pruning threshold in [0, 1]; default: the graph's own."),
]
NodeId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
TargetText = Annotated[str, StringConstraints(min_length=1, max_length=200)]
JSON_MEDIA = "application/json"


# ----------------------------------------------------------------------------- schemas


class GraphCreate(BaseModel):
    """An attribution graph of a prompt through a model with its MLPs replaced by a transcoder."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64, description="The model's artifact id.")
    transcoder: str = Field(
        min_length=1, max_length=64, description="The transcoder's (CLT's) artifact id."
    )
    prompt: str | None = Field(
        None, min_length=1, max_length=65536, description="Prompt text (BOS is put first)."
    )
    prompt_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        None, min_length=1, max_length=65536, description="The prompt as token ids, instead."
    )
    targets: list[TargetText] | None = Field(
        None,
        max_length=64,
        description='Logit targets: token texts or differences (\'" 5" - " 6"\'); default: '
        "the salient logits.",
    )
    max_feature_nodes: int | None = Field(
        7500, gt=0, le=100_000, description="Active features that get rows (None: all)."
    )
    max_n_logits: int = Field(10, gt=0, le=100, description="Salient logits: at most this many.")
    desired_logit_prob: float = Field(
        0.95, gt=0, le=1, description="Salient logits: until this cumulative probability."
    )
    qk_edges: int | None = Field(
        None, ge=0, le=256, description="QK attributions of the edges carrying most attribution."
    )
    qk_at: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list,
        max_length=64,
        description='More QK attributions: "layer,head,query,key".',
    )
    node_threshold: float = Field(0.8, ge=0, le=1, description="The graph's default pruning.")
    loadings_node_threshold: float | None = Field(
        None, ge=0, le=1,
        description="Head loadings are kept for the links of every pruning up to this node "
        "threshold (default 0.8; higher costs more: see attribution/graph_store.py).",
    )  # fmt: skip
    edge_threshold: float = Field(0.98, ge=0, le=1, description="The graph's default pruning.")
    slug: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="A name for the graph (default: its id).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _one_prompt(self) -> GraphCreate:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt and prompt_ids")
        return self


class GraphPublic(BaseModel):
    """One graph: what it is of, its size and scores, and whether it is made yet."""

    id: str
    slug: str | None = None
    prompt: str | None = None
    prompt_tokens: list[str] = Field(default_factory=list)
    model_id: str | None = None
    transcoder_id: str | None = None
    n_nodes: int | None = Field(None, description="Nodes of the whole graph.")
    n_edges: int | None = Field(None, description="Edges of the whole graph.")
    n_features: int | None = Field(None, description="Feature nodes (active features with rows).")
    scores: dict[str, Any] | None = Field(
        None, description="Replacement and completeness of the full graph and its default pruning."
    )
    created_at: datetime
    job_id: str | None = Field(None, description="The job that makes (made) it, if one does.")
    state: str = Field(
        description="complete; pending (its job is queued or running); failed or cancelled (its "
        "job's state; `error` says why)."
    )
    error: str | None = None
    store: bool = Field(
        description="Kept whole (any pruning on request), or one pruning's JSON file."
    )
    node_threshold: float | None = Field(None, description="Its default pruning.")
    edge_threshold: float | None = None
    loadings_node_threshold: float | None = Field(
        None, description="Head loadings exist for the links of prunings up to this node threshold."
    )
    path: str


class GraphsPublic(BaseModel):
    data: list[GraphPublic]
    count: int = Field(description="How many graphs there are, before limit and offset.")


class GraphQueued(BaseModel):
    """202: the graph is made by a job."""

    job: JobPublic
    graph_id: str
    graph: GraphPublic
    estimated_s: float = Field(description="The estimate that sent it to a job.")


class LinkAttention(BaseModel):
    source: str
    target: str
    weight: float
    cross_position: bool
    loadings: list[tuple[int, int, float]] = Field(
        description="[layer, head, value]: the last attention hop into the target's position; "
        "they sum to the weight. Largest |value| first, zeros left out."
    )


class HeadLink(BaseModel):
    source: str
    target: str
    weight: float
    loading: float


class HeadPublic(BaseModel):
    layer: int
    head: int
    share: float = Field(description="Its share of the pruning's attention-mediated attribution.")
    rank: int = Field(description="1 for the head with the largest share.")
    heads_for_coverage: int
    coverage: float
    total_heads: int
    n_links: int = Field(description="Cross-position links of the pruning it carries a part of.")
    links_without_loadings: int
    node_threshold: float
    edge_threshold: float
    top_links: list[HeadLink]


class QKRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0, le=10_000)
    head: int = Field(ge=0, le=10_000)
    query: int = Field(ge=0, le=1_000_000, description="Query position.")
    key: int = Field(ge=0, le=1_000_000, description="Key position (<= query).")


class QKPublic(BaseModel):
    """A QK attribution as graph JSON's attention.qk lists it: the score q·k/√d split over
    (query-side node, key-side node) pairs."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    pattern: float
    gate_logit: float | None
    terms: list[tuple[str, str, float]] = Field(description="The largest pairs' terms.")
    other: float = Field(description="The sum of the other terms.")
    query_nodes: list[tuple[str, float]]
    key_nodes: list[tuple[str, float]]


class Subgraph(BaseModel):
    """A viewer's saved subgraph: pinned node ids and supernodes ([label, node id, ...])."""

    model_config = ConfigDict(extra="forbid")

    pinnedIds: list[NodeId] = Field(default_factory=list, max_length=20_000)  # noqa: N815
    supernodes: list[
        Annotated[list[Annotated[str, StringConstraints(max_length=200)]], Field(min_length=1)]
    ] = Field(default_factory=list, max_length=5_000)


# ----------------------------------------------------------------------------- rows and stores


def _graph_row(session: Session, graph_id: str) -> Artifact:
    row = session.get(Artifact, graph_id)
    if row is None or row.kind != "graph":
        raise ProblemError(404, f"no graph with id {graph_id!r}", id=graph_id)
    return row


def _job_of(session: Session, row: Artifact) -> Job | None:
    return get_job(session, job_id=row.job_id) if row.job_id else None


def _state(session: Session, row: Artifact, directory: Path) -> tuple[str, str | None]:
    if row.state != "pending":
        return row.state, None
    if gs.is_graph_store(directory):
        return "complete", None
    job = _job_of(session, row)
    if job is None:
        return "failed", "its job is gone"
    if job.state in TERMINAL_STATES:
        return ("failed" if job.state == "succeeded" else job.state), job.error
    return "pending", None


def graph_public(session: Session, settings: ServerSettings, row: Artifact) -> GraphPublic:
    directory = settings.data_dir.resolve() / row.path
    meta = row.meta or {}
    state, error = _state(session, row, directory)
    scores = row.metrics
    if state == "complete" and row.state == "pending":  # the job finished; registration lags
        meta = _read_meta(directory) or meta
        scores = _read_json(directory / gs.METRICS_FILE)
    return GraphPublic(
        id=row.id, slug=meta.get("slug"), prompt=meta.get("prompt"),
        prompt_tokens=meta.get("prompt_tokens") or [], model_id=row.model_id,
        transcoder_id=row.transcoder_id, n_nodes=meta.get("n_nodes"), n_edges=meta.get("n_edges"),
        n_features=meta.get("n_features"), scores=scores, created_at=row.created_at,
        job_id=row.job_id, state=state, error=error, store=not row.path.endswith(".json"),
        node_threshold=meta.get("node_threshold"), edge_threshold=meta.get("edge_threshold"),
        loadings_node_threshold=meta.get("loadings_node_threshold"), path=row.path,
    )  # fmt: skip


def _read_meta(directory: Path) -> dict | None:
    return _read_json(directory / gs.META_FILE)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _store_of(
    session: Session, settings: ServerSettings, services: GraphServices, graph_id: str
) -> tuple[Artifact, gs.StoredGraph]:
    """The graph's row and loaded store, or a problem: 404 unknown, 409 not made (yet) or a
    JSON file of one pruning."""
    row = _graph_row(session, graph_id)
    directory = settings.data_dir.resolve() / row.path
    if row.path.endswith(".json"):
        raise ProblemError(
            409,
            f"graph {graph_id!r} is a graph JSON file of one pruning ({row.path}), not a graph "
            "store: only its /json is served; create the graph again for the rest",
            id=graph_id,
        )
    if not gs.is_graph_store(directory):
        state, error = _state(session, row, directory)
        raise ProblemError(
            409,
            f"graph {graph_id!r} is {state}: its store is not written"
            + (f" ({error})" if error else ""),
            id=graph_id,
            job_id=row.job_id,
            state=state,
        )
    return row, services.stored(graph_id, directory)


# ----------------------------------------------------------------------------- create


def _facts(settings: ServerSettings, session: Session, body: GraphCreate):
    """The model and transcoder rows, their dirs, the model's config: or a 422 naming the field."""
    from ...sparse_attention.modeldir import read_model_config  # noqa: PLC0415

    rows = {}
    for field, kind in (("model", "model"), ("transcoder", "transcoder")):
        row = session.get(Artifact, getattr(body, field))
        if row is None or row.kind != kind:
            raise _unprocessable(field, f"no {kind} with id {getattr(body, field)!r}")
        path = settings.data_dir.resolve() / row.path
        if row.path.startswith("s3://") or not path.is_dir():
            raise _unprocessable(field, f"the {kind} {row.id!r} is not a directory in the data dir")
        rows[field] = (row, path)
    try:
        cfg = read_model_config(rows["model"][1])
    except StageError as e:
        raise _unprocessable("model", f"graphs need a sparse-circuits model dir: {e}") from None
    return rows["model"], rows["transcoder"], cfg


def _unprocessable(field: str, msg: str, loc: list | None = None) -> ProblemError:
    return ProblemError(
        422,
        f"{field}: {msg}",
        errors=[{"loc": loc or ["body", field], "msg": msg, "type": "value_error"}],
    )


def _check_prompt(body: GraphCreate, cfg, tokenizer, settings: ServerSettings) -> int:
    """The prompt's length in tokens, as `attribute` will see it; a 422 naming the field if it
    is too long, does not tokenise, or names tokens outside the vocabulary."""
    import torch  # noqa: PLC0415

    from ...attribution.inputs import resolve_targets, tokenize_prompt  # noqa: PLC0415

    field = "prompt" if body.prompt is not None else "prompt_ids"
    try:
        prompt = body.prompt if body.prompt is not None else body.prompt_ids
        tokens = tokenize_prompt(prompt, tokenizer, bos_token_id=cfg.bos_token_id)
    except ValueError as e:
        raise _unprocessable(field, str(e)) from None
    n = tokens.numel()
    limit = min(settings.max_prompt_tokens, cfg.context_length)
    if n > limit:
        why = (
            f"the server's limit of {settings.max_prompt_tokens}"
            if limit == settings.max_prompt_tokens
            else f"the model's context length of {cfg.context_length}"
        )
        raise _unprocessable(field, f"the prompt has {n} tokens, more than {why}")
    if int(tokens.max()) >= cfg.vocab_size:
        raise _unprocessable(
            field, f"token id {int(tokens.max())} is outside the vocabulary of {cfg.vocab_size}"
        )
    if body.targets:
        try:
            resolve_targets(body.targets, torch.zeros(cfg.vocab_size), tokenizer)
        except ValueError as e:
            raise _unprocessable("targets", str(e)) from None
    return n


def _check_qk_at(body: GraphCreate, cfg, n_pos: int) -> None:
    for i, text in enumerate(body.qk_at):
        parts = text.replace(" ", "").split(",")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise _unprocessable(
                "qk_at", f'{text!r}: expected "layer,head,query,key", four integers >= 0',
                ["body", "qk_at", i],
            )  # fmt: skip
        layer, head, query, key = map(int, parts)
        if layer >= cfg.n_layers or head >= cfg.n_heads or query >= n_pos or key > query:
            raise _unprocessable(
                "qk_at",
                f"{text!r} names no attention edge: {cfg.n_layers} layers of {cfg.n_heads} heads, "
                f"positions 0..{n_pos - 1}, key <= query",
                ["body", "qk_at", i],
            )


def _check_job_quota(session: Session, settings: ServerSettings, key) -> None:
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


@router.post(
    "",
    status_code=201,
    response_model=GraphPublic,
    summary="Create a graph (inline within the time budget, else a job)",
    description="201 with the graph when it is estimated to take at most the server's inline "
    "budget (and no other inline graph is being made); otherwise 202 with the `attribute` job "
    "that makes it and the graph's id. 422 names the field at fault (unknown model or "
    "transcoder id, a prompt over the token limit, targets outside the vocabulary).",
    responses={202: {"model": GraphQueued, "description": "Queued: a job makes it."},
               **problem_responses(422, 429)},
)  # fmt: skip
def create(
    body: GraphCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    key: WriteKeyDep,
) -> Any:
    services = graph_services(request)
    (model_row, model_dir), (clt_row, clt_dir), cfg = _facts(settings, session, body)
    n_pos = _check_prompt(body, cfg, services.tokenizer(model_dir), settings)
    _check_qk_at(body, cfg, n_pos)
    graph_id = new_id()
    rel = f"graphs/{graph_id}"
    config = {
        "model": model_row.path, "clt": clt_row.path, "prompt": body.prompt,
        "prompt_ids": body.prompt_ids, "targets": body.targets, "store_dir": rel,
        "max_feature_nodes": body.max_feature_nodes, "max_n_logits": body.max_n_logits,
        "desired_logit_prob": body.desired_logit_prob, "qk_edges": body.qk_edges,
        "qk_at": body.qk_at, "node_threshold": body.node_threshold,
        "edge_threshold": body.edge_threshold, "slug": body.slug or graph_id, "scan": model_row.name,
    }  # fmt: skip
    if body.loadings_node_threshold is not None:
        config["loadings_node_threshold"] = body.loadings_node_threshold
    config = validate_config("attribute", config, settings.data_dir)  # None: all features
    clt = clt_facts(clt_dir)
    estimate = estimate_seconds(
        n_pos=n_pos, n_layers=cfg.n_layers, d_model=cfg.d_model, d_mlp=cfg.d_mlp,
        d_features=clt["d_features"], l0=clt["l0"], max_feature_nodes=body.max_feature_nodes,
        n_logits=len(body.targets) if body.targets else body.max_n_logits,
    )  # fmt: skip
    meta = {"slug": config["slug"], "prompt": body.prompt, "n_pos": n_pos, "estimated_s": estimate}
    lineage = {"model_id": model_row.id, "transcoder_id": clt_row.id}
    if estimate <= settings.inline_graph_budget_s and services.inline.acquire(blocking=False):
        try:
            row = _make_inline(session, settings, config, graph_id, rel, meta, lineage)
        finally:
            services.inline.release()
        response.headers["Location"] = f"{request.url.path}/{graph_id}"
        return graph_public(session, settings, row)

    _check_job_quota(session, settings, key)
    row = Artifact(id=graph_id, kind="graph", name=config["slug"], path=rel, state="pending",
                   meta=meta, **lineage)  # fmt: skip
    session.add(row)
    session.commit()
    try:
        job = submit_job(session, kind="attribute", config=config, key_id=key.id)
    except Exception:
        session.rollback()
        session.delete(row)
        session.commit()
        raise
    row.job_id = job.id
    session.commit()
    JOBS_SUBMITTED.labels("attribute").inc()
    log.info("graph %s: estimated %.1f s, queued as job %s", graph_id, estimate, job.id)
    queued = GraphQueued(
        job=job_public(session, job), graph_id=graph_id, graph=graph_public(session, settings, row),
        estimated_s=estimate,
    )  # fmt: skip
    return JSONResponse(
        jsonable_encoder(queued), status_code=202,
        headers={"Location": f"{request.url.path}/{graph_id}"},
    )  # fmt: skip


def _make_inline(
    session: Session, settings: ServerSettings, config: dict, graph_id: str, rel: str,
    meta: dict, lineage: dict,
) -> Artifact:  # fmt: skip
    """Run the `attribute` stage here, on the job's own config (paths made absolute)."""
    from ...attribution.attribute import AttributeConfig, run_attribute  # noqa: PLC0415

    root = settings.data_dir.resolve()
    absolute = {**config, "model": str(root / config["model"]), "clt": str(root / config["clt"]),
                "store_dir": str(root / rel)}  # fmt: skip
    try:
        run_attribute(AttributeConfig.model_validate(absolute))
    except StageError as e:  # a bad input the checks above could not see: nothing was written
        raise ProblemError(422, f"the graph could not be made: {e}") from None
    row = Artifact(id=graph_id, kind="graph", name=config["slug"], path=rel, state="complete",
                   meta=meta, **lineage)  # fmt: skip
    session.add(row)
    session.commit()
    row = register_artifact(session, root, rel)  # meta and scores from the store's files
    for field, value in lineage.items():  # the rows we were given, whatever the files say
        setattr(row, field, value)
    session.commit()
    log.info("graph %s made inline", graph_id)
    return row


# ----------------------------------------------------------------------------- read


@router.get("", response_model=GraphsPublic, summary="List graphs, newest first")
def list_graphs(
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    model_id: Annotated[str | None, Query(max_length=64, description="Only of this model.")] = None,
    transcoder_id: Annotated[
        str | None, Query(max_length=64, description="Only of this transcoder.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> GraphsPublic:
    where = [Artifact.kind == "graph"]
    if model_id is not None:
        where.append(Artifact.model_id == model_id)
    if transcoder_id is not None:
        where.append(Artifact.transcoder_id == transcoder_id)
    count = session.scalar(select(func.count()).select_from(Artifact).where(*where)) or 0
    rows = session.scalars(
        select(Artifact)
        .where(*where)
        .order_by(Artifact.created_at.desc(), Artifact.id)
        .limit(limit)
        .offset(offset)
    )
    return GraphsPublic(data=[graph_public(session, settings, r) for r in rows], count=count)


@router.get("/{graph_id}", response_model=GraphPublic, summary="Get one graph")
def get_graph(
    session: SessionDep, settings: SettingsDep, _key: ReadKeyDep, graph_id: GraphIdParam
) -> GraphPublic:
    return graph_public(session, settings, _graph_row(session, graph_id))


def _cache_key(graph_id: str, nt: float, et: float) -> tuple[str, float, float]:
    return graph_id, round(nt, 6), round(et, 6)


def _build_doc(
    session: Session, settings: ServerSettings, services: GraphServices, graph_id: str,
    nt: float | None, et: float | None,
) -> tuple[tuple[str, float, float], CachedDoc]:  # fmt: skip
    row = _graph_row(session, graph_id)
    directory = settings.data_dir.resolve() / row.path
    if row.path.endswith(".json"):
        return _file_doc(services, row, directory, nt, et)
    _, stored = _store_of(session, settings, services, graph_id)
    nt = stored.meta["node_threshold"] if nt is None else nt
    et = stored.meta["edge_threshold"] if et is None else et
    key = _cache_key(graph_id, nt, et)
    with services.locks(("doc", key)):  # one build per pruning, however many ask at once
        found = services.docs.get(key)
        if found is not None:
            GRAPH_CACHE.labels(result="hit").inc()
            return key, found
        GRAPH_CACHE.labels(result="miss").inc()
        with services.builds:  # a few prunings at once: each takes memory in edges
            return key, _build(settings, services, stored, directory, key, nt, et)


def _build(
    settings: ServerSettings, services: GraphServices, stored: gs.StoredGraph, directory: Path,
    key: tuple, nt: float, et: float,
) -> CachedDoc:  # fmt: skip
    """Prune, check the node limit, build and serialise the document, and cache it."""
    n_nodes, pruned = gs.pruned_node_count(stored, nt, et)
    if n_nodes > settings.max_graph_nodes:
        raise ProblemError(
            422,
            f"node_threshold: the pruning at node_threshold={nt}, edge_threshold={et} keeps "
            f"{n_nodes} nodes, more than the {settings.max_graph_nodes} a response may hold; "
            "lower node_threshold",
            errors=[{"loc": ["query", "node_threshold"], "msg": f"keeps {n_nodes} nodes, over "
                     f"{settings.max_graph_nodes}", "type": "value_error"}],
            n_nodes=n_nodes, max_graph_nodes=settings.max_graph_nodes,
        )  # fmt: skip
    view = gs.stored_attention(stored, pruned)
    services.views.put(key, view)  # for /heads of this pruning
    doc = gs.graph_json_at(stored, nt, et, pruned, view)
    raw = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    found = CachedDoc(raw, directory, len(doc["nodes"]), len(doc["links"]))
    services.docs.put(key, found)
    return found


def _file_doc(services, row: Artifact, path: Path, nt, et):
    """A graph JSON file the CLI wrote: served as it is, for its own pruning only."""
    key = _cache_key(row.id, -1.0, -1.0)
    found = services.docs.get(key)
    if found is None:
        GRAPH_CACHE.labels(result="miss").inc()
        raw = path.read_bytes()
        doc = json.loads(raw)
        pruning = doc.get("metadata", {}).get("pruning_settings", {})
        found = CachedDoc(raw, path, len(doc.get("nodes", [])), len(doc.get("links", [])), pruning)
        services.docs.put(key, found)
    else:
        GRAPH_CACHE.labels(result="hit").inc()
    own = found.pruning or {}
    for name, asked in (("node_threshold", nt), ("edge_threshold", et)):
        if asked is not None and own.get(name) is not None and abs(asked - own[name]) > 1e-9:
            raise ProblemError(
                409,
                f"{name}: graph {row.id!r} is a graph JSON file pruned at {name}={own[name]}; "
                "other prunings need a graph store (create the graph again)",
                id=row.id,
            )
    return key, found


@router.get(
    "/{graph_id}/json",
    summary="The graph JSON v1 of a pruning",
    description="Pruned on the server at node_threshold / edge_threshold (default: the graph's "
    "own), built from the graph store and cached; gzip when the request accepts it; an ETag "
    "for conditional requests. 422 names the threshold when the pruning would hold more nodes "
    "than the server's limit.",
    responses={200: {"content": {JSON_MEDIA: {"schema": {"type": "object"}}},
                     "description": "Graph JSON, schema version 1."}, **problem_responses(409, 422)},
)  # fmt: skip
async def graph_json(
    request: Request,
    graph_id: GraphIdParam,
    _key: ReadKeyDep,
    node_threshold: Threshold = None,
    edge_threshold: Threshold = None,
) -> Response:
    services = graph_services(request)
    settings: ServerSettings = request.app.state.settings  # not a dependency: no thread hop
    found = None
    if node_threshold is not None and edge_threshold is not None:  # the fast path: no database
        found = services.docs.get(_cache_key(graph_id, node_threshold, edge_threshold))
        if found is not None and not found.directory.exists():  # deleted by another replica
            found = None
        if found is not None:
            GRAPH_CACHE.labels(result="hit").inc()
    if found is None:

        def build():
            with request.app.state.sessionmaker() as session:
                return _build_doc(
                    session, settings, services, graph_id, node_threshold, edge_threshold
                )[1]

        found = await run_in_threadpool(build)
    headers = {"ETag": found.etag, "Vary": "Accept-Encoding", "Cache-Control": "no-cache"}
    if found.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        body = found.gzipped() if found.has_gzip else await run_in_threadpool(found.gzipped)
        return Response(
            body, media_type=JSON_MEDIA, headers={**headers, "Content-Encoding": "gzip"}
        )
    return Response(found.raw, media_type=JSON_MEDIA, headers=headers)


@router.get(
    "/{graph_id}/links/attention",
    response_model=LinkAttention,
    summary="Head loadings of one link",
    responses=problem_responses(409, 422),
)
def link_attention(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    graph_id: GraphIdParam,
    source: Annotated[str, Query(min_length=1, max_length=200, description="Source node id.")],
    target: Annotated[str, Query(min_length=1, max_length=200, description="Target node id.")],
) -> LinkAttention:
    _, stored = _store_of(session, settings, graph_services(request), graph_id)
    try:
        return LinkAttention(**gs.link_loadings(stored, source, target))
    except KeyError as e:
        which = "source" if str(e.args[0]).startswith("source") else "target"
        raise ProblemError(
            404, e.args[0], errors=[{"loc": ["query", which], "msg": e.args[0]}]
        ) from None
    except ValueError as e:
        raise ProblemError(422, str(e)) from None


@router.get(
    "/{graph_id}/heads/{layer}/{head}",
    response_model=HeadPublic,
    summary="One head's share of the attention-mediated attribution, and its top links",
    responses=problem_responses(409, 422),
)
def head_share(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    graph_id: GraphIdParam,
    layer: Annotated[int, PathParam(ge=0, le=10_000)],
    head: Annotated[int, PathParam(ge=0, le=10_000)],
    node_threshold: Threshold = None,
    edge_threshold: Threshold = None,
    top: Annotated[int, Query(ge=1, le=1000, description="Links listed.")] = 20,
) -> HeadPublic:
    _, stored = _store_of(session, settings, graph_services(request), graph_id)
    L, H = stored.graph.n_layers, stored.n_heads
    if layer >= L:
        raise ProblemError(404, f"layer: no layer {layer}; the model has {L} (0..{L - 1})")
    if H is None or head >= H:
        raise ProblemError(404, f"head: no head {head}; a layer has {H} (0..{(H or 0) - 1})")
    nt = stored.meta["node_threshold"] if node_threshold is None else node_threshold
    et = stored.meta["edge_threshold"] if edge_threshold is None else edge_threshold
    services = graph_services(request)
    key = _cache_key(graph_id, nt, et)
    view = services.views.get(key)  # the JSON of this pruning left it, or an earlier /heads
    if view is None:
        from ...attribution.prune import prune  # noqa: PLC0415

        view = gs.stored_attention(stored, prune(stored.graph, nt, et))
        services.views.put(key, view)
    try:
        report = gs.head_report(stored, layer, head, view, top)
    except ValueError as e:
        raise ProblemError(409, str(e)) from None
    return HeadPublic(**report, node_threshold=nt, edge_threshold=et)


# ----------------------------------------------------------------------------- write


@router.post(
    "/{graph_id}/qk",
    response_model=QKPublic,
    status_code=201,
    summary="QK attribution of one attention edge (computed on demand, stored with the graph)",
    description="201 when computed now, 200 when it was stored already. Loads the graph's model "
    "and transcoder once per server process.",
    responses={200: {"model": QKPublic, "description": "Stored already."},
               **problem_responses(409, 422)},
)  # fmt: skip
def qk(
    body: QKRequest,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    _key: WriteKeyDep,
    graph_id: GraphIdParam,
) -> QKPublic:
    from ...attribution.graph_json import qk_json  # noqa: PLC0415

    services = graph_services(request)
    row, stored = _store_of(session, settings, services, graph_id)
    hop = (body.layer, body.head, body.query, body.key)
    errors = gs.check_attention_edge(stored, *hop)
    if errors:
        raise ProblemError(
            422, "no such attention edge: " + "; ".join(e["msg"] for e in errors), errors=errors
        )
    path = stored.has_qk(*hop)
    if path is not None:
        response.status_code = 200
        return QKPublic(**qk_json(gs.load_qk(path), stored.gate_offset))
    model_dir, clt_dir = _model_and_clt(session, settings, row, stored)
    dtype = stored.graph.settings.get("dtype", "float32")
    pair = services.pair(model_dir, clt_dir, dtype)
    with pair.lock:
        try:
            made = gs.compute_qk(stored, pair.model, pair.clt, *hop,
                                 batch_size=stored.graph.settings.get("batch_size", 64))  # fmt: skip
        except ValueError as e:
            raise ProblemError(409, f"the QK attribution could not be computed: {e}") from None
    services.forget(graph_id, store=False)  # documents list the graph's QK attributions
    log.info("graph %s: QK attribution of %s computed", graph_id, hop)
    return QKPublic(**qk_json(made, stored.gate_offset))


def _model_and_clt(
    session: Session, settings: ServerSettings, row: Artifact, stored: gs.StoredGraph
) -> tuple[Path, Path]:
    root = settings.data_dir.resolve()
    run_file = stored.path / gs.RUN_FILE
    run = json.loads(run_file.read_text()).get("config", {}) if run_file.is_file() else {}
    found = {}
    for field, column, kind in (
        ("model", "model_id", "model"),
        ("clt", "transcoder_id", "transcoder"),
    ):
        parent = session.get(Artifact, getattr(row, column)) if getattr(row, column) else None
        path = (
            root / parent.path
            if parent is not None
            else (root / run[field] if run.get(field) else None)
        )
        if path is None or not path.is_dir():
            raise ProblemError(409, f"graph {row.id!r}: its {kind} is not in the data dir any more")
        found[field] = path
    return found["model"], found["clt"]


@router.delete(
    "/{graph_id}",
    status_code=204,
    summary="Delete a graph (its row and its files)",
    responses=problem_responses(409),
)
def delete_graph(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: WriteKeyDep,
    graph_id: GraphIdParam,
) -> Response:
    row = _graph_row(session, graph_id)
    job = _job_of(session, row)
    if job is not None and job.state not in TERMINAL_STATES:
        raise ProblemError(
            409,
            f"graph {graph_id!r} is being made by job {job.id} ({job.state}): cancel the job first",
            id=graph_id, job_id=job.id,
        )  # fmt: skip
    path = settings.data_dir.resolve() / row.path
    aside = None
    if path.exists():  # moved aside first: no reader ever sees half a store
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        path.rename(aside / path.name)
    try:
        session.delete(row)
        session.commit()
    except BaseException:
        if aside is not None:  # the record stays: so do its files
            (aside / path.name).rename(path)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    graph_services(request).forget(graph_id)
    log.info("graph %s deleted", graph_id)
    return Response(status_code=204)


@router.get(
    "/{graph_id}/subgraphs",
    response_model=list[str],
    summary="The names of the graph's saved subgraphs",
    responses=problem_responses(409),
)
def list_subgraphs(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    graph_id: GraphIdParam,
) -> list[str]:
    _, stored = _store_of(session, settings, graph_services(request), graph_id)
    folder = stored.path / gs.SUBGRAPH_DIR
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


@router.get(
    "/{graph_id}/subgraphs/{name}",
    response_model=Subgraph,
    summary="A saved subgraph",
    responses=problem_responses(409),
)
def get_subgraph(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    graph_id: GraphIdParam,
    name: SubgraphName,
) -> Subgraph:
    _, stored = _store_of(session, settings, graph_services(request), graph_id)
    doc = gs.load_subgraph(stored.path, name)
    if doc is None:
        raise ProblemError(404, f"graph {graph_id!r} has no subgraph {name!r}", name=name)
    return Subgraph(**doc)


@router.put(
    "/{graph_id}/subgraphs/{name}",
    response_model=Subgraph,
    summary="Save a subgraph (pinned node ids and supernodes of the graph)",
    description="201 when new, 200 when it replaced one. 422 names each node id the graph does "
    "not have.",
    responses={201: {"model": Subgraph, "description": "Created."}, **problem_responses(409, 422)},
)
def put_subgraph(
    body: Subgraph,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    _key: WriteKeyDep,
    graph_id: GraphIdParam,
    name: SubgraphName,
) -> Subgraph:
    _, stored = _store_of(session, settings, graph_services(request), graph_id)
    errors = gs.subgraph_errors(stored, body.pinnedIds, body.supernodes)
    if errors:
        raise ProblemError(
            422, f"the graph has no node {errors[0]['msg'].rsplit(' ', 1)[-1]}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), errors=errors,
        )  # fmt: skip
    existed = gs.load_subgraph(stored.path, name) is not None
    gs.save_subgraph(stored.path, name, body.model_dump())
    response.status_code = 200 if existed else 201
    return body
