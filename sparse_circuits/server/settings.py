"""The server's settings: one pydantic model, built by `serve` from flags and environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ServerSettings(BaseModel):
    """What one server process needs to know; nothing here is created at import time."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="Artifacts live under it; the SQLite database too.")
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
