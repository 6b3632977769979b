"""API keys: create (the secret is returned once, only its SHA-256 is stored), list, revoke."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs.db import ApiKey, utcnow
from .deps import hash_secret

SECRET_PREFIX = "sc_"


def create_key(session: Session, *, name: str) -> tuple[ApiKey, str]:
    """A new key named `name`: (its record, its secret). The secret is not stored anywhere."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, secret_hash=hash_secret(secret), prefix=secret[:10])
    session.add(key)
    session.commit()
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, *, key_id: str) -> ApiKey | None:
    """Revoke the key `key_id` (None: no such key). Revoking twice keeps the first time."""
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()
    return key
