"""The single entry point: `sparse-circuits COMMAND [--config FILE] [flags]`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .io import RunDirError
from .stages import STAGES, Stage

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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to build its flags."""
    parser = argparse.ArgumentParser(prog="sparse-circuits", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, config_name, _run, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            add_config_arguments(p, getattr(importlib.import_module(module), config_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    module, config_name, run_name, _ = COMMANDS[args.command]
    mod = importlib.import_module(module)
    try:
        config = config_from_args(getattr(mod, config_name), args)
        result = getattr(mod, run_name)(config)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as e:
        print(f"sparse-circuits {args.command}: error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    if result is not None:
        print(f"wrote {result}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
