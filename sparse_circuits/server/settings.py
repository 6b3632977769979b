"""The server's settings: one pydantic model, built by `serve` from flags and environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..storage import split_data_dir


class ServerSettings(BaseModel):
    """What one server process needs to know; nothing here is created at import time."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(
        description="Artifacts live under it; the SQLite database too. Or an s3://bucket/prefix "
        "that servers and workers on several machines share (then this machine's cache of it is "
        "kept in ~/.cache/sparse-circuits/data/, unless --data-url names the prefix and this "
        "the cache)."
    )
    data_url: str | None = Field(
        None,
        description="An s3://bucket/prefix holding the artifacts, data_dir being this server's "
        "cache of them (S3 settings from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql+psycopg://...); default: SQLite in data_dir."
    )
    read_requires_key: bool = Field(False, description="Require an API key for reads as well.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS.")
    frame_ancestors: list[str] = Field(
        default_factory=lambda: ["'self'"],
        description="Who may embed the viewer in a frame (CSP frame-ancestors).",
    )
    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body accepted.")
    max_prompt_tokens: int = Field(2048, gt=0, description="Longest prompt a graph may have.")
    max_graph_nodes: int = Field(
        20000, gt=0, description="Most nodes a pruned graph JSON may hold in one response."
    )
    max_active_jobs_per_key: int = Field(
        32, gt=0, description="Queued plus running jobs one key may have at once."
    )
    inline_graph_budget_s: float = Field(
        10.0, ge=0, description="A graph estimated to take longer is made by a job (202)."
    )
    graph_cache_size: int = Field(
        64, ge=0, description="Pruned graph JSON documents kept in memory."
    )
    scan_on_start: bool = Field(
        True, description="Register artifacts found in the data dir at start."
    )
    migrate_on_start: bool = Field(
        True,
        description="Bring an SQLite database to the latest schema at start (PostgreSQL is "
        "migrated by `sparse-circuits db upgrade`, never by a server).",
    )
    events_poll_s: float = Field(
        0.5, gt=0, description="How often a job event stream reads the database for changes."
    )
    mirror_poll_s: float = Field(
        2.0,
        gt=0,
        description="With an s3:// data dir: how often the server looks for artifacts recorded "
        "in the database that its cache lacks (or holds an older copy of), and fetches them.",
    )

    _split_data_dir = model_validator(mode="before")(split_data_dir)
