"""The FastAPI application: `create_app(settings)` builds one; nothing is created at import time."""

from __future__ import annotations

from fastapi import FastAPI

from ..jobs.db import database_url, make_engine, make_sessionmaker
from .problems import PROBLEM_RESPONSES, install_problem_handlers
from .routes import artifacts, features, graphs, health, jobs, pages
from .settings import ServerSettings

API_PREFIX = "/v1"


def create_app(settings: ServerSettings) -> FastAPI:
    app = FastAPI(
        title="sparse-circuits",
        summary="Jobs, models, activation stores, transcoders, attribution graphs and features.",
        version=_version(),
        responses=PROBLEM_RESPONSES,
    )
    app.state.settings = settings
    app.state.engine = make_engine(database_url(settings.data_dir, settings.database_url))
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    install_problem_handlers(app)
    for module in (jobs, artifacts, graphs, features):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(pages.router)
    return app


def _version() -> str:
    from .. import __version__  # noqa: PLC0415

    return __version__
