"""`sparse-circuits db upgrade|current`: the service database's schema, for deployments.

Several replicas on one PostgreSQL: run `db upgrade --database-url URL` once per deployment,
before servers and workers start (they check the schema and refuse an old one). The embedded
SQLite default is migrated at start by the server or worker that opens it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import StageError
from .db import database_url, make_engine, migrate, schema_is_current

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True)
    for name, help_ in (
        ("upgrade", "migrate the database to the newest schema (nothing to do when it is there)"),
        ("current", "say whether the database is at the newest schema (exit status 1 if not)"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--data-dir", type=Path, help="data dir (its SQLite file is the default)")
        p.add_argument(
            "--database-url", help="SQLAlchemy URL (postgresql+psycopg://...); default: SQLite"
        )


def _url(args: argparse.Namespace) -> str:
    if args.database_url is None and args.data_dir is None:
        raise StageError("give --data-dir (its SQLite database) or --database-url")
    if args.database_url is None:
        check_local_data_dir(args.data_dir)
        args.data_dir.mkdir(parents=True, exist_ok=True)
    return database_url(args.data_dir or ".", args.database_url)


def check_local_data_dir(data_dir: Path) -> None:
    """The embedded SQLite database lives in a local data dir; an s3:// one holds none."""
    if "://" in str(data_dir) or Path(data_dir).parts[:1] in (("s3:",), ("gs:",)):
        raise StageError(
            f"{data_dir} is not a local data dir: an s3:// data dir keeps no database, give "
            "--database-url (the deployment's PostgreSQL)"
        )


def run(args: argparse.Namespace) -> int:
    url = _url(args)
    if args.db_command == "upgrade":
        migrate(url)
        log.info("the database is at the newest schema")
        return 0
    engine = make_engine(url)
    try:
        current = schema_is_current(engine)
    finally:
        engine.dispose()
    log.info(
        "the database is %s", "at the newest schema" if current else "NOT at the newest schema"
    )
    return 0 if current else 1
