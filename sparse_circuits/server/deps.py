"""Typed dependencies: settings, a database session, the caller's API key; and where an
artifact's files are on this server (`local_artifact`)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs.db import ApiKey
from ..jobs.remote import remote_data_dir
from ..storage import StorageError
from .problems import ProblemError
from .settings import ServerSettings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key.")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def _key_for(session: Session, secret: str | None) -> ApiKey | None:
    if not secret:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret)))
    if key is None:
        raise ProblemError(401, f"unknown API key in {API_KEY_HEADER}")
    if key.revoked_at is not None:
        raise ProblemError(401, f"the API key {key.prefix}… was revoked")
    return key


def begin_write(session: Session) -> None:
    """Start the session's transaction holding SQLite's write lock (BEGIN IMMEDIATE; nothing
    changes on PostgreSQL). A write request's reads and writes then form one transaction that
    no other writer can invalidate: under WAL, a transaction that read first and writes later
    fails at once ("database is locked") when another writer committed in between, whatever
    the busy timeout. A session already in a transaction is left as it is."""
    if not session.in_transaction():
        session.connection(execution_options={"sqlite_begin": "IMMEDIATE"})


def require_write_key(
    session: SessionDep, secret: Annotated[str | None, Depends(_api_key_header)]
) -> ApiKey:
    """Writes need a valid, unrevoked key. The request's transaction starts here, with the
    write lock on SQLite (`begin_write`), so concurrent writes queue instead of failing."""
    begin_write(session)
    key = _key_for(session, secret)
    if key is None:
        raise ProblemError(401, f"this request writes: send an API key in {API_KEY_HEADER}")
    return key


async def check_read_key(
    request: Request,
    settings: SettingsDep,
    secret: Annotated[str | None, Depends(_api_key_header)],
) -> ApiKey | None:
    """Reads are open unless the settings ask for a key; a key that is sent must be valid. An
    open read without a key touches neither the database nor a worker thread (the graph JSON's
    fast path depends on it)."""
    if not secret:
        if settings.read_requires_key:
            raise ProblemError(
                401, f"this server requires an API key in {API_KEY_HEADER} for reads"
            )
        return None
    return await run_in_threadpool(_lookup, request, secret)


def _lookup(request: Request, secret: str) -> ApiKey | None:
    with request.app.state.sessionmaker() as session:
        return _key_for(session, secret)


WriteKeyDep = Annotated[ApiKey, Depends(require_write_key)]
ReadKeyDep = Annotated[ApiKey | None, Depends(check_read_key)]


def local_artifact(settings: ServerSettings, rel: str) -> Path:
    """The local path of the artifact at `rel` (relative to the data dir). With an s3:// data
    dir it is the cache's copy, fetched first when the cache lacks it (the artifact mirror
    keeps recorded ones current); a problem (422 for a torn upload, 503 for an unreachable
    store) when that fails. The path may not exist: nothing is there."""
    local = settings.data_dir.resolve() / rel
    remote = remote_data_dir(settings.data_url, settings.data_dir)
    if remote is None or local.exists():
        return local
    try:
        remote.fetch(rel)
    except StorageError as e:
        raise ProblemError(422, f"{rel}: {e}") from None
    except Exception as e:  # the object store unreachable, credentials refused
        log.warning("could not fetch %s from %s: %s", rel, remote.url, e)
        raise ProblemError(503, f"the data dir {remote.url} could not be read: {e}") from None
    return local
