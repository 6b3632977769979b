"""Liveness (/healthz), readiness (/readyz: database reachable, schema at the latest migration)
and Prometheus metrics (/metrics). No prefix, no key: probes and scrapers call them."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.engine import Engine

from ...jobs.db import schema_is_current
from .. import metrics

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    database: bool = Field(description="The database answered.")
    schema_current: bool = Field(description="Its schema is at the latest migration.")
    detail: str | None = None


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database is reachable and its schema current",
    responses={503: {"model": Readiness, "description": "Not ready (the body says why)."}},
)
async def readyz(request: Request) -> JSONResponse:
    ready = await run_in_threadpool(readiness, request.app.state.engine)
    return JSONResponse(ready.model_dump(), status_code=200 if ready.status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def prometheus(request: Request) -> Response:
    body = await run_in_threadpool(metrics.render, request.app.state.sessionmaker)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def readiness(engine: Engine) -> Readiness:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = schema_is_current(engine)
    except Exception as e:  # any failure to reach the database means not ready
        log.warning("readyz: database unreachable: %s", e)
        return Readiness(
            status="not ready", database=False, schema_current=False, detail=str(e)[:500]
        )
    return Readiness(
        status="ready" if current else "not ready",
        database=True,
        schema_current=current,
        detail=None
        if current
        else "the schema is not at the latest migration: run `sparse-circuits db upgrade`",
    )
