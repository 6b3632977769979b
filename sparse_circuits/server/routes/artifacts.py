"""Models, activation stores and transcoders: list, get, register, metrics log.

The three resources are one implementation (`artifact_router(kind, plural)`), differing only by
the artifact kind they hold. Artifacts are files under the data dir; their rows hold where, the
metrics and the lineage. With an s3:// data dir the files read here are this server's cached
copies (`deps.local_artifact`), fetched from the prefix when the cache lacks them.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...jobs.artifacts import inspect_path, register_artifact, relative_path
from ...jobs.db import Artifact
from ..deps import ReadKeyDep, SessionDep, SettingsDep, WriteKeyDep, local_artifact
from ..problems import ProblemError, problem_responses

log = logging.getLogger(__name__)

router = APIRouter()

IdParam = Annotated[str, PathParam(min_length=1, max_length=64, description="The artifact's id.")]


class ArtifactPublic(BaseModel):
    """One artifact: where it is under the data dir, its metrics and its lineage."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str = Field(description="model, store, transcoder or graph.")
    name: str
    path: str = Field(description="Relative to the data dir (or an s3:// URL).")
    state: str = Field(description="complete, or partial (a cancelled or failed job's output).")
    created_at: datetime
    job_id: str | None = Field(None, description="The job that wrote it, if a job did.")
    model_id: str | None = Field(None, description="Lineage: the model it came from.")
    store_id: str | None = Field(None, description="Lineage: the activation store it came from.")
    transcoder_id: str | None = Field(None, description="Lineage: the transcoder it came from.")
    metrics: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int = Field(description="How many match, before limit and offset.")


class ArtifactRegister(BaseModel):
    """Register an artifact that is already in the data dir (e.g. written by the CLI)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Relative to the data dir, or absolute inside it (with an s3:// data dir: "
        "relative to the prefix, fetched from there).",
        examples=["models/addition-dense"],
    )


def artifact_public(artifact: Artifact) -> ArtifactPublic:
    return ArtifactPublic.model_validate(artifact)


def get_artifact_or_404(session: Session, artifact_id: str, kind: str | None = None) -> Artifact:
    """The artifact `artifact_id` (of `kind`, when given), or a 404 problem naming the id."""
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or (kind is not None and artifact.kind != kind):
        raise ProblemError(404, f"no {kind or 'artifact'} with id {artifact_id!r}", id=artifact_id)
    return artifact


def read_metrics_log(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of `path`/metrics.jsonl (a training run's curve); [] when it has none. A
    line cut short by a writer that is still appending is skipped."""
    log_file = path / "metrics.jsonl" if path.is_dir() else None
    if log_file is None or not log_file.is_file():
        return []
    records = []
    with open(log_file, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records[-limit:] if limit else records


def artifact_router(kind: str, plural: str, title: str) -> APIRouter:
    """The list/get/register/metrics-log routes of one artifact kind, under /{plural}."""
    r = APIRouter(prefix=f"/{plural}", tags=[plural], responses=problem_responses(404))

    @r.get("", response_model=ArtifactsPublic, summary=f"List {title}", name=f"list_{plural}")
    def list_artifacts(
        session: SessionDep,
        _key: ReadKeyDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    ) -> ArtifactsPublic:
        where = Artifact.kind == kind
        count = session.scalar(select(func.count()).select_from(Artifact).where(where)) or 0
        rows = session.scalars(
            select(Artifact)
            .where(where)
            .order_by(Artifact.created_at.desc(), Artifact.id)
            .limit(limit)
            .offset(offset)
        )
        return ArtifactsPublic(data=[artifact_public(a) for a in rows], count=count)

    @r.get(
        "/{artifact_id}", response_model=ArtifactPublic, summary=f"Get one of the {title}",
        name=f"get_{kind}",
    )  # fmt: skip
    def get_artifact(session: SessionDep, _key: ReadKeyDep, artifact_id: IdParam) -> ArtifactPublic:
        return artifact_public(get_artifact_or_404(session, artifact_id, kind))

    @r.post(
        "/register",
        response_model=ArtifactPublic,
        status_code=201,
        summary=f"Register one of the {title} already in the data dir",
        description="201 with a new record; 200 with the existing one when the path is "
        "registered already. 422 when the path is outside the data dir or holds no " + kind + ".",
        responses={200: {"model": ArtifactPublic, "description": "Already registered."}},
        name=f"register_{kind}",
    )
    def register(
        body: ArtifactRegister,
        session: SessionDep,
        settings: SettingsDep,
        _key: WriteKeyDep,
        response: Response,
    ) -> ArtifactPublic:
        path = resolve_body_path(settings.data_dir, body.path, field="path")
        path = local_artifact(settings, relative_path(settings.data_dir, path))
        if not path.exists():
            raise ProblemError(
                422,
                f"path: nothing at {body.path!r} in the data dir",
                errors=[{"loc": ["body", "path"], "msg": "does not exist", "type": "missing"}],
            )
        existing = find_artifact_at(session, settings.data_dir, path)
        rel = relative_path(settings.data_dir, path)
        found = (
            existing.kind
            if existing
            else getattr(inspect_path(settings.data_dir, rel), "kind", None)
        )
        if found != kind:
            what = f"a {found}" if found else "no artifact"
            raise ProblemError(
                422,
                f"path: {body.path!r} holds {what}, not a {kind}",
                errors=[{"loc": ["body", "path"], "msg": f"not a {kind}", "type": "value_error"}],
            )
        artifact = existing or register_artifact(session, settings.data_dir, rel)
        if existing is not None:
            response.status_code = 200
        return artifact_public(artifact)

    @r.get(
        "/{artifact_id}/metrics-log",
        response_model=list[dict[str, Any]],
        summary="Its training curve (metrics.jsonl records)",
        name=f"{kind}_metrics_log",
    )
    def metrics_log(
        session: SessionDep,
        settings: SettingsDep,
        _key: ReadKeyDep,
        artifact_id: IdParam,
        limit: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    ) -> list[dict[str, Any]]:
        artifact = get_artifact_or_404(session, artifact_id, kind)
        if "://" in artifact.path:
            return []  # an activation store on object storage: no metrics log
        return read_metrics_log(local_artifact(settings, artifact.path), limit)

    return r


for _kind, _plural, _title in (
    ("model", "models", "models"),
    ("store", "stores", "activation stores"),
    ("transcoder", "transcoders", "transcoders"),
):
    router.include_router(artifact_router(_kind, _plural, _title))


def resolve_body_path(data_dir: Path, value: str, *, field: str) -> Path:
    """`value` resolved inside the data dir, or a 422 problem naming `field`."""
    try:
        return data_dir.resolve() / relative_path(data_dir, value)
    except ValueError as e:  # ArtifactError, or a path the OS refuses (a NUL byte)
        raise ProblemError(
            422,
            f"{field}: {e}",
            errors=[{"loc": ["body", field], "msg": str(e), "type": "value_error"}],
        ) from None


def find_artifact_at(session: Session, data_dir: Path, path: Path) -> Artifact | None:
    rel = relative_path(data_dir, path)
    return session.scalar(select(Artifact).where(Artifact.path == rel))
