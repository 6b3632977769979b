"""The FastAPI application: `create_app(settings)` builds one; nothing is created at import time.

At start (lifespan) an SQLite database is brought to the latest schema (PostgreSQL is migrated
by `sparse-circuits db upgrade`, never by a server: several replicas share it) and, when the
settings ask, the data dir is scanned for artifacts the CLI wrote.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..jobs.artifacts import scan_data_dir
from ..jobs.db import database_url, make_engine, make_sessionmaker, migrate
from .deps import API_KEY_HEADER
from .metrics import MetricsMiddleware
from .problems import PROBLEM_JSON, PROBLEM_RESPONSES, install_problem_handlers
from .routes import artifacts, features, graphs, health, jobs, pages
from .settings import ServerSettings

log = logging.getLogger(__name__)

API_PREFIX = "/v1"


def create_app(settings: ServerSettings) -> FastAPI:
    url = database_url(settings.data_dir, settings.database_url)
    app = FastAPI(
        title="sparse-circuits",
        summary="Jobs, models, activation stores, transcoders, attribution graphs and features.",
        description="Writes need an API key in the `X-API-Key` header (`sparse-circuits keys "
        "create NAME`); reads are open unless the server requires a key for them. Errors are "
        "RFC 9457 problem documents naming the field or id at fault.",
        version=_version(),
        responses=PROBLEM_RESPONSES,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.database_url = url
    app.state.engine = make_engine(url)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    install_problem_handlers(app)
    for module in (jobs, artifacts, graphs, features):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(pages.router)
    # Outermost last: metrics see every answer, the body limit runs before any handler.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(FrameAncestorsMiddleware, ancestors=settings.frame_ancestors)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=[API_KEY_HEADER, "Content-Type", "Accept-Encoding"],
        )
    app.add_middleware(MetricsMiddleware)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    await run_in_threadpool(prepare_database, app)
    try:
        yield
    finally:
        app.state.engine.dispose()


def prepare_database(app: FastAPI) -> None:
    """SQLite: migrate to the latest schema. Then, if asked, register the data dir's artifacts."""
    settings: ServerSettings = app.state.settings
    url: str = app.state.database_url
    if url.startswith("sqlite") and settings.migrate_on_start:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(url)
    if settings.scan_on_start:
        with app.state.sessionmaker() as session:
            found = scan_data_dir(session, settings.data_dir)
        if found:
            log.info("registered %d artifacts found in %s", len(found), settings.data_dir)


class BodyLimitMiddleware:
    """413 problem for a request body over `max_bytes`, by its Content-Length or, for a chunked
    body, as soon as the bytes read pass the limit (before any handler sees it)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(scope, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        # No length given: read the body here (it is at most max_bytes) and replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._reject(scope, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Content Too Large",
                "status": 413,
                "detail": f"the request body is over the limit of {self.max_bytes} bytes",
                "instance": scope.get("path", ""),
            }
        ).encode()
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class FrameAncestorsMiddleware:
    """`Content-Security-Policy: frame-ancestors ...` on every answer: who may embed the viewer."""

    def __init__(self, app: ASGIApp, ancestors: list[str]):
        self.app = app
        value = "frame-ancestors " + (" ".join(ancestors) or "'none'")
        self.header = (b"content-security-policy", value.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != self.header[0]]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _version() -> str:
    from .. import __version__  # noqa: PLC0415

    return __version__
