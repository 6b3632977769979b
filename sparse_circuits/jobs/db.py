"""The service's records: jobs, artifacts (models, stores, transcoders, graphs) and API keys.

SQLAlchemy 2 tables; SQLite (one file in the data dir, WAL) is the embedded default and
PostgreSQL, by URL, serves several replicas. The schema is created and changed only by the
alembic migrations beside this file (`migrate`), never by `create_all`. Artifacts themselves are
files under the data dir; a row holds where one is, its metrics and its lineage, never its bytes.
"""

from __future__ import annotations

import fcntl
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

DB_FILE = "sparse-circuits.db"
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ARTIFACT_KINDS = ("model", "store", "transcoder", "graph")

# JSON on SQLite, JSONB on PostgreSQL.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database (SQLite keeps no zone: UTC is implied)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return aware.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Job(Base):
    """One run of one stage: `kind` names the stage, `config` is exactly its config (as JSON)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # lease: who runs it and until when; an expired lease returns the job to the queue
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # progress, as the stage's own bars and metrics report it
    step: Mapped[int | None] = mapped_column(Integer)
    total: Mapped[int | None] = mapped_column(Integer)
    progress_desc: Mapped[str | None] = mapped_column(String(128))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    log_tail: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[str | None] = mapped_column(Text)  # the artifact path the stage returned
    # where it ran (observability across machines)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16), default="local")
    backend_ref: Mapped[str | None] = mapped_column(String(128))  # e.g. the Ray job id
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"))

    __table_args__ = (Index("ix_jobs_state_created", "state", "created_at"),)


class Artifact(Base):
    """A model dir, activation store, CLT dir or graph under the data dir, with its lineage."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # one of ARTIFACT_KINDS
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text, unique=True)  # relative to the data dir (or s3:// URL)
    state: Mapped[str] = mapped_column(String(16), default="complete")  # complete | partial
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    # lineage: the model a store came from, the store a CLT was trained on, a graph's model and CLT
    model_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    store_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    transcoder_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # kind-specific facts


class ApiKey(Base):
    """A write key; only the SHA-256 of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(
        String(16)
    )  # the secret's first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def database_url(data_dir: str | Path, url: str | None = None) -> str:
    """`url` when given, else the embedded SQLite file in the data dir."""
    return url or f"sqlite:///{Path(data_dir).resolve() / DB_FILE}"


def make_engine(url: str) -> Engine:
    """An engine for `url`. SQLite gets WAL, a busy timeout, foreign keys and real transactions:
    BEGIN when a transaction starts (pysqlite would wait for the first write), BEGIN IMMEDIATE
    (the write lock up front) on a connection with the `sqlite_begin="IMMEDIATE"` option."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


# ----------------------------------------------------------------------------- migrations


def _quiet_alembic() -> None:
    """Alembic's INFO chatter (plugins, context) off, unless its loggers were configured."""
    for name in ("alembic.runtime.plugins", "alembic.runtime.migration"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)


def alembic_config(url: str):
    """Alembic's config for the migrations packaged beside this file, aimed at `url`."""
    from alembic.config import Config  # noqa: PLC0415  (alembic only when migrating)

    cfg = Config(str(Path(__file__).with_name("alembic.ini")))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the newest schema; does nothing when already there.

    On PostgreSQL the upgrade holds an advisory lock, so replicas that race wait for the first.
    """
    _quiet_alembic()
    from alembic import command  # noqa: PLC0415

    engine = make_engine(url)
    try:
        with _sqlite_migration_lock(engine):
            before = _current_heads(engine)
            command.upgrade(alembic_config(url), "head")
            after = _current_heads(engine)
    finally:
        engine.dispose()
    if before != after:
        log.info("database schema upgraded: %s -> %s", _heads(before), _heads(after))


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """A file lock beside a SQLite database while migrating it (a server and a worker starting
    together); PostgreSQL takes an advisory lock in the migration's own transaction instead."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _current_heads(engine: Engine) -> set[str]:
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def _heads(heads: set[str]) -> str:
    return ",".join(sorted(heads)) or "empty"


def schema_is_current(engine: Engine) -> bool:
    """Whether the database behind `engine` is at the newest migration."""
    _quiet_alembic()
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    return _current_heads(engine) == set(script.get_heads())
