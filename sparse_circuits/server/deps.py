"""Typed dependencies: settings, a database session, the caller's API key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs.db import ApiKey
from .problems import ProblemError
from .settings import ServerSettings

API_KEY_HEADER = "X-API-Key"
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key.")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_settings(request: Request) -> ServerSettings:
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


def require_write_key(
    session: SessionDep, secret: Annotated[str | None, Depends(_api_key_header)]
) -> ApiKey:
    """Writes need a valid, unrevoked key."""
    key = _key_for(session, secret)
    if key is None:
        raise ProblemError(401, f"this request writes: send an API key in {API_KEY_HEADER}")
    return key


def check_read_key(
    session: SessionDep,
    settings: SettingsDep,
    secret: Annotated[str | None, Depends(_api_key_header)],
) -> ApiKey | None:
    """Reads are open unless the settings ask for a key; a key that is sent must be valid."""
    key = _key_for(session, secret)
    if key is None and settings.read_requires_key:
        raise ProblemError(401, f"this server requires an API key in {API_KEY_HEADER} for reads")
    return key


WriteKeyDep = Annotated[ApiKey, Depends(require_write_key)]
ReadKeyDep = Annotated[ApiKey | None, Depends(check_read_key)]
