"""`sparse-circuits serve` (the API under uvicorn, with one job worker unless --no-worker) and
`sparse-circuits keys create|list|revoke` (API keys; only the SHA-256 of a secret is stored)."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..jobs.dbcli import check_local_data_dir
from .settings import ServerSettings

log = logging.getLogger(__name__)


class ServeConfig(ServerSettings):
    """`serve`: the REST API (docs at /docs), the viewer and, unless --no-worker, one worker."""

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0: every one).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    data_dir: Path = Field(
        Path("sparse-circuits-data"),
        description="Artifacts live under it; the SQLite database too.",
    )
    worker: bool = Field(True, description="Start one job worker process beside the server.")
    concurrency: int = Field(1, ge=1, description="Jobs the worker runs at once.")
    backend: Literal["local", "ray"] = Field(
        "local", description="Where the worker runs jobs: child processes here, or Ray jobs."
    )
    ray_address: str | None = Field(
        None, description="Ray head's job submission address, http://HEAD:8265 (--backend ray)."
    )
    log_level: str = Field("info", description="uvicorn's log level.")

    def settings(self) -> ServerSettings:
        return ServerSettings(
            **self.model_dump(include=set(ServerSettings.model_fields)),
        )


def serve(cfg: ServeConfig) -> None:
    """Serve until interrupted; the worker (if any) is stopped with the server."""
    import uvicorn  # noqa: PLC0415

    from ..jobs.db import database_url, migrate  # noqa: PLC0415
    from .app import create_app  # noqa: PLC0415

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    _quiet_alembic()
    url = database_url(cfg.data_dir, cfg.database_url)
    if url.startswith("sqlite") and cfg.migrate_on_start:
        migrate(url)  # before the worker starts, so that the two never race to create tables
    app = create_app(cfg.settings())
    mirror = start_mirror(app) if cfg.data_url else None
    worker = start_worker(cfg) if cfg.worker else None
    base = f"http://{_display_host(cfg.host)}:{cfg.port}"
    log.info("API docs: %s/docs", base)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        if worker is not None:
            stop_worker(worker)
        if mirror is not None:
            mirror.stop()


def start_mirror(app):
    """With an s3:// data dir: fetch what workers elsewhere wrote into this server's cache."""
    from .mirror import ArtifactMirror  # noqa: PLC0415

    mirror = ArtifactMirror(app).start()
    settings = app.state.settings
    log.info("data dir %s, cached in %s", settings.data_url, settings.data_dir)
    return mirror


def serve_data_dir(data_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `data_dir` with one worker (the quickstart's last step): logs where the API docs
    and the newest graph are, then serves until Ctrl-C."""
    cfg = ServeConfig(data_dir=data_dir, host=host, port=port)
    base = f"http://{_display_host(host)}:{port}"
    graph = _newest_graph(cfg)
    if graph is not None:
        log.info("graph: %s/v1/graphs/%s/json (viewer: %s/graphs/%s)", base, graph, base, graph)
    serve(cfg)


def _newest_graph(cfg: ServeConfig) -> str | None:
    """The id of the newest graph record, registering the data dir's artifacts first."""
    from sqlalchemy import select  # noqa: PLC0415

    from ..jobs.artifacts import scan_data_dir  # noqa: PLC0415
    from ..jobs.db import Artifact, database_url, make_engine, make_sessionmaker, migrate  # noqa: PLC0415

    url = database_url(cfg.data_dir, cfg.database_url)
    if url.startswith("sqlite"):
        migrate(url)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            scan_data_dir(session, cfg.data_dir)
            return session.scalar(
                select(Artifact.id)
                .where(Artifact.kind == "graph")
                .order_by(Artifact.created_at.desc())
                .limit(1)
            )
    finally:
        engine.dispose()


def _quiet_alembic() -> None:
    """alembic's INFO lines (plugins, DDL mode) say nothing a user acts on; -v keeps them."""
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def worker_command(cfg: ServeConfig) -> list[str]:
    cmd = [sys.executable, "-m", "sparse_circuits.cli", "worker", "--data-dir", str(cfg.data_dir)]
    if cfg.data_url:  # the server's cache is its worker's too
        cmd += ["--data-url", cfg.data_url]
    if cfg.database_url:
        cmd += ["--database-url", cfg.database_url]
    cmd += ["--concurrency", str(cfg.concurrency), "--backend", cfg.backend]
    if cfg.ray_address:
        cmd += ["--ray-address", cfg.ray_address]
    return cmd


def start_worker(cfg: ServeConfig) -> subprocess.Popen:
    """One `sparse-circuits worker` process on the same data dir and database. It gets SIGTERM
    (stop claiming, requeue its jobs) when serve ends however it ends: uvicorn re-raises the
    SIGTERM it handled after its graceful shutdown, so serve's own cleanup may never run."""
    proc = subprocess.Popen(worker_command(cfg), preexec_fn=_terminate_with_parent)
    log.info("worker started (pid %d, concurrency %d)", proc.pid, cfg.concurrency)
    return proc


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_worker(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: a running job's lease lets another worker resume it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- keys


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """`keys create NAME | list | revoke ID`, each with --data-dir and --database-url."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for name, help_ in (
        ("create", "create a key; its secret is printed once and never stored"),
        ("list", "list keys (id, name, prefix, created, revoked)"),
        ("revoke", "revoke a key: writes with it are refused from now on"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        if name == "create":
            p.add_argument("name", help="who or what the key is for")
        if name == "revoke":
            p.add_argument("id", help="the key's id (from `keys list`)")
        p.add_argument("--data-dir", type=Path, default=Path("sparse-circuits-data"))
        p.add_argument("--database-url", default=None, help="default: SQLite in the data dir")


def keys(args: argparse.Namespace) -> int:
    """Run `keys create|list|revoke`; the results are the command's output (stdout)."""
    from ..jobs.db import database_url, make_engine, make_sessionmaker, migrate  # noqa: PLC0415
    from .keys import create_key, list_keys, revoke_key  # noqa: PLC0415

    _quiet_alembic()
    url = database_url(args.data_dir, args.database_url)
    if url.startswith("sqlite"):
        check_local_data_dir(args.data_dir)
        args.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(url)
    engine = make_engine(url)
    out = sys.stdout
    try:
        with make_sessionmaker(engine)() as session:
            if args.keys_command == "create":
                key, secret = create_key(session, name=args.name)
                out.write(f"created key {key.id} ({key.name}); its secret, shown only now:\n")
                out.write(f"{secret}\n")
            elif args.keys_command == "list":
                for key in list_keys(session):
                    revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else ""
                    out.write(
                        f"{key.id}  {key.name}  {key.prefix}…  "
                        f"created {key.created_at:%Y-%m-%d %H:%M}  {revoked}\n".rstrip()
                        + "\n"
                    )
            else:
                key = revoke_key(session, key_id=args.id)
                if key is None:
                    log.error("no key with id %s", args.id)
                    return 2
                out.write(f"revoked key {key.id} ({key.name})\n")
    finally:
        engine.dispose()
    return 0
