"""Features: one CLT feature's statistics (the `feature-stats` stage's output, C/features/):
top contexts as text with their activations, frequency, activation histogram, top and bottom
direct logit effects. When the statistics are not computed yet: 409 with the job that computes
them (the one queued or running, or the spec to submit)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ...errors import StageError
from ...jobs.db import Artifact, Job
from ..deps import ReadKeyDep, SessionDep, SettingsDep
from ..graphs_service import graph_services
from ..problems import ProblemError, problem_responses
from .jobs import job_public

log = logging.getLogger(__name__)

router = APIRouter(prefix="/features", tags=["features"], responses=problem_responses(404, 409))


class FeatureContext(BaseModel):
    tokens: list[str] = Field(description="The window of text around the top activation.")
    token_ids: list[int]
    values: list[float] = Field(description="The feature's activation at each token.")
    doc: int = Field(description="Which sequence of the data.")
    pos: int = Field(description="Position of the top activation in that sequence.")
    center: int = Field(description="Index of that position in `tokens`.")
    activation: float


class Histogram(BaseModel):
    edges: list[float] = Field(description="Bin edges (one more than counts).")
    counts: list[int] = Field(description="Nonzero activations per bin.")


class LogitEffect(BaseModel):
    token: str
    token_id: int
    value: float


class FeaturePublic(BaseModel):
    """One feature: what it responds to (contexts, frequency, histogram) and what it writes
    (direct logit effects)."""

    transcoder_id: str
    layer: int
    index: int
    frequency: float = Field(description="Share of the data's tokens it is active on.")
    mean_activation: float = Field(description="Mean over the tokens it is active on.")
    max_activation: float
    n_tokens: int = Field(description="Tokens the statistics were computed on.")
    histogram: Histogram
    top_contexts: list[FeatureContext]
    top_logits: list[LogitEffect]
    bottom_logits: list[LogitEffect]
    logit_method: str


def _stats_job(session: Session, row: Artifact) -> dict[str, Any]:
    """The feature-stats job of this transcoder that is queued or running, else its spec."""
    active = session.scalars(
        select(Job)
        .where(Job.kind == "feature-stats", Job.state.in_(("queued", "running")))
        .order_by(Job.created_at)
    )
    for job in active:
        if (job.config or {}).get("clt") == row.path:
            return job_public(session, job).model_dump(mode="json")
    config: dict[str, Any] = {"clt": row.path}
    model = session.get(Artifact, row.model_id) if row.model_id else None
    if model is not None:
        config["model"] = model.path
    return {"kind": "feature-stats", "config": config}


@router.get(
    "/{transcoder_id}/{layer}/{index}",
    response_model=FeaturePublic,
    summary="One feature's statistics",
    description="404 for an unknown transcoder or a layer/index out of range (naming which); "
    "409 when feature-stats has not run on the transcoder, with `job`: the feature-stats job "
    "already queued or running, or the job to submit (POST /v1/jobs) to compute them.",
)
def feature(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _key: ReadKeyDep,
    transcoder_id: Annotated[str, PathParam(min_length=1, max_length=64)],
    layer: Annotated[int, PathParam(ge=0, le=100_000)],
    index: Annotated[int, PathParam(ge=0, le=2**31)],
) -> FeaturePublic:
    from ...clt.features import FEATURES_DIR, open_features, read_feature  # noqa: PLC0415

    row = session.get(Artifact, transcoder_id)
    if row is None or row.kind != "transcoder":
        raise ProblemError(404, f"no transcoder with id {transcoder_id!r}", id=transcoder_id)
    clt_dir = settings.data_dir.resolve() / row.path
    if not (clt_dir / FEATURES_DIR / "zarr.json").is_file():
        job = _stats_job(session, row)
        queued = "id" in job
        raise ProblemError(
            409,
            f"transcoder {transcoder_id!r} has no feature statistics yet: "
            + (f"job {job['id']} ({job['state']}) computes them" if queued
               else "submit the feature-stats job in `job` to compute them"),
            transcoder_id=transcoder_id, job=job,
        )  # fmt: skip
    try:
        attrs = open_features(clt_dir).attrs
    except StageError as e:
        raise ProblemError(
            409, f"transcoder {transcoder_id!r}: {e}", transcoder_id=transcoder_id
        ) from None
    L, F = attrs["n_layers"], attrs["d_features"]
    if layer >= L:
        raise ProblemError(
            404, f"layer: transcoder {transcoder_id!r} has {L} layers (0..{L - 1}), not {layer}",
            errors=[{"loc": ["path", "layer"], "msg": f"out of range 0..{L - 1}"}],
        )  # fmt: skip
    if index >= F:
        raise ProblemError(
            404, f"index: layer {layer} has {F} features (0..{F - 1}), not {index}",
            errors=[{"loc": ["path", "index"], "msg": f"out of range 0..{F - 1}"}],
        )  # fmt: skip
    tokenizer = graph_services(request).tokenizer(clt_dir / FEATURES_DIR)
    if tokenizer is None and row.model_id:
        model = session.get(Artifact, row.model_id)
        if model is not None and not model.path.startswith("s3://"):
            tokenizer = graph_services(request).tokenizer(settings.data_dir.resolve() / model.path)
    raw = read_feature(clt_dir, layer, index, tokenizer)
    contexts = [
        FeatureContext(
            tokens=c.get("strings") or [str(t) for t in c["tokens"]],
            token_ids=c["tokens"],
            values=c["activations"],
            doc=c["doc"],
            pos=c["pos"],
            center=c["center"],
            activation=c["activation"],
        )  # fmt: skip
        for c in raw["top_contexts"]
    ]

    def effects(side: str) -> list[LogitEffect]:
        return [
            LogitEffect(
                token=e.get("token", str(e["token_id"])), token_id=e["token_id"], value=e["value"]
            )  # fmt: skip
            for e in raw[f"{side}_logits"]
        ]

    return FeaturePublic(
        transcoder_id=transcoder_id, layer=layer, index=index, frequency=raw["frequency"],
        mean_activation=raw["mean_activation"], max_activation=raw["max_activation"],
        n_tokens=raw["n_tokens"], histogram=Histogram(**raw["histogram"]), top_contexts=contexts,
        top_logits=effects("top"), bottom_logits=effects("bottom"), logit_method=raw["logit_method"],
    )  # fmt: skip
