"""The single entry point: `sparse-circuits COMMAND [--config FILE] [flags]`."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# Before anything imports torch (whose OpenMP reads it once): threads that wait sleep instead of
# spinning. On a busy machine spinning threads steal the cores the working ones need; see
# benchmarks/bench_omp_wait.py for the figures this default was chosen from. A value the user
# set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__  # noqa: E402
from .config import add_flag_arguments, config_from_args, flag_specs  # noqa: E402
from .errors import StageError  # noqa: E402
from .io import released_locks  # noqa: E402
from .stages import STAGES, Stage  # noqa: E402

# command -> (module, config class, run function, one-line help): the pipeline stages, then the
# commands that are not stages (they take a config too, but are not jobs).
COMMANDS: dict[str, Stage] = {
    **STAGES,
    "quickstart": Stage(
        "sparse_circuits.quickstart", "QuickstartConfig", "quickstart",
        "the whole pipeline on the toy task, then serve it",
    ),
    "serve": Stage(
        "sparse_circuits.server.cli", "ServeConfig", "serve",
        "serve the REST API, the viewer and (unless --no-worker) one job worker",
    ),
    "worker": Stage(
        "sparse_circuits.jobs.worker", "WorkerConfig", "run_worker",
        "run queued jobs from the data dir's database",
    ),
}  # fmt: skip


class PlainCommand(NamedTuple):
    """A command that takes no stage config (e.g. a group such as `keys create|list|revoke`).

    `add_arguments(parser)` adds its flags (or its own subparsers); `run(args) -> int | None`
    runs it and returns the exit status. Both are names in `module`, imported only when the
    command is the one asked for. It raises StageError for expected failures, like a stage."""

    module: str
    add_arguments: str
    run: str
    help: str


PLAIN_COMMANDS: dict[str, PlainCommand] = {
    "keys": PlainCommand(
        "sparse_circuits.server.cli", "add_keys_arguments", "keys",
        "API keys for the service: create NAME (the secret shown once), list, revoke ID",
    ),
    "db": PlainCommand(
        "sparse_circuits.jobs.dbcli", "add_arguments", "run",
        "the service database's schema: upgrade (once per deployment), current",
    ),
}  # fmt: skip

HELP_CACHE = "cli_flags.json"  # every config command's flags, so that --help needs no torch


def source_fingerprint() -> str:
    """A hash of the package's source: flags cached under another fingerprint are stale."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:20]


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-circuits" / HELP_CACHE


def _read_cache(path: Path, fingerprint: str) -> dict[str, list[dict]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("commands", {}) if data.get("fingerprint") == fingerprint else {}


def _cached_flags(command: str, fingerprint: str) -> list[dict] | None:
    """`command`'s flags from the cache shipped with the package, else from the user's cache;
    None when neither matches this source (a changed config never shows stale help)."""
    for path in (Path(__file__).with_name(HELP_CACHE), _user_cache()):
        flags = _read_cache(path, fingerprint).get(command)
        if flags is not None:
            return flags
    return None


def _remember_flags(command: str, flags: list[dict], fingerprint: str) -> None:
    """Keep one command's flags in the user's cache, so that its next --help is quick."""
    path = _user_cache()
    commands = _read_cache(path, fingerprint) | {command: flags}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "commands": commands}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: help stays correct, only slower


def live_flags() -> dict[str, list[dict]]:
    """Every config command's flags, from the configs themselves (imports every stage)."""
    flags = {}
    for name, stage in COMMANDS.items():
        try:
            flags[name] = flag_specs(stage.config_class())
        except ImportError:  # a command whose module is not installed: its help imports it
            continue
    return flags


def update_help_cache(path: Path | None = None) -> Path:
    """Rewrite the flags cache shipped with the package (sparse_circuits/cli_flags.json):
    `python -c "from sparse_circuits.cli import update_help_cache; update_help_cache()"`."""
    path = path or Path(__file__).with_name(HELP_CACHE)
    data = {"fingerprint": source_fingerprint(), "commands": live_flags()}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def _asks_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def build_parser(command: str | None = None, help_only: bool = False) -> argparse.ArgumentParser:
    """The parser; only `command`'s flags are built, from its config (its module imported), or
    for `help_only` from the flags cached with the package when they are there."""
    parser = argparse.ArgumentParser(prog="sparse-circuits", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sparse-circuits {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, config_name, _run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name != command:
            continue
        fingerprint = source_fingerprint() if help_only else ""
        flags = _cached_flags(name, fingerprint) if help_only else None
        if flags is None:
            flags = flag_specs(getattr(importlib.import_module(module), config_name))
            if help_only:
                _remember_flags(name, flags, fingerprint)
        add_flag_arguments(p, flags)
    for name, plain in PLAIN_COMMANDS.items():
        p = sub.add_parser(name, help=plain.help, description=plain.help)
        if name == command:
            getattr(importlib.import_module(plain.module), plain.add_arguments)(p)
    return parser


class _Formatter(logging.Formatter):
    """INFO lines as the message alone; other levels say what they are."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self.verbose:
            return f"{record.levelname} {record.name}: {msg}"
        return msg if record.levelno == logging.INFO else f"{record.levelname.lower()}: {msg}"


class _AboveBars(logging.StreamHandler):
    """Log lines go above a running progress bar, not into its line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # noqa: PLC0415  (only once something logs)

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


def _setup_logging(verbose: bool) -> None:
    handler = _AboveBars()
    handler.setFormatter(_Formatter(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # Third-party chatter a user cannot act on (matplotlib's one-time font-cache notice, ...).
    for name in ("matplotlib", "PIL", "urllib3", "botocore", "s3fs", "fsspec", "numcodecs"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def _run(args: argparse.Namespace, run: Callable[[], object]) -> int:
    try:
        with released_locks():
            result = run()
    except StageError as e:
        print(f"sparse-circuits {args.command}: error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print(  # noqa: T201
            f"\nsparse-circuits {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if result is not None:
        print(f"wrote {result}")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS or a in PLAIN_COMMANDS), None)
    args = build_parser(command, help_only=_asks_help(argv)).parse_args(argv)
    _setup_logging(args.verbose)
    if args.command in PLAIN_COMMANDS:
        plain = PLAIN_COMMANDS[args.command]
        return _run(args, lambda: getattr(importlib.import_module(plain.module), plain.run)(args))
    stage = COMMANDS[args.command]

    def run() -> object:
        config = config_from_args(stage.config_class(), args)
        return stage.run_function()(config)

    return _run(args, run)


if __name__ == "__main__":
    sys.exit(main())
