"""The single entry point: `sparse-circuits COMMAND [--config FILE] [flags]`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import ConfigError, add_config_arguments, config_from_args
from .io import RunDirError

# command -> (module, config class, run function, one-line help). A stage's module is imported
# only when that stage runs, so its heavy imports cost only that stage.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train-toy": (
        "sparse_circuits.sparse_attention.train",
        "ToyTrainConfig",
        "train_toy",
        "train a small model on a toy task",
    ),
    "pretrain": (
        "sparse_circuits.sparse_attention.train",
        "PretrainConfig",
        "pretrain",
        "train a small LM on a text corpus",
    ),
    "sparsify": (
        "sparse_circuits.sparse_attention.sparsify",
        "SparsifyConfig",
        "sparsify",
        "sparse attention post-training",
    ),
    "attribute": (
        "sparse_circuits.attribution.attribute",
        "AttributeConfig",
        "run_attribute",
        "compute an attribution graph",
    ),
    "harvest": (
        "sparse_circuits.clt.harvest",
        "HarvestConfig",
        "harvest",
        "record MLP inputs and outputs into a zarr store",
    ),
    "train-clt": (
        "sparse_circuits.clt.train",
        "TrainCLTConfig",
        "train_clt",
        "train a cross-layer transcoder on an activation store",
    ),
    "eval-clt": (
        "sparse_circuits.clt.evaluate",
        "EvalCLTConfig",
        "eval_clt",
        "evaluate a CLT: FVU, L0, and the model with every MLP replaced by it",
    ),
    "export": (
        "sparse_circuits.clt.export",
        "ExportConfig",
        "export",
        "write a CLT in circuit-tracer's layout",
    ),
    "feature-stats": (
        "sparse_circuits.clt.features",
        "FeatureStatsConfig",
        "feature_stats",
        "per-feature top contexts, frequency, histogram and logits for the service",
    ),
    "quickstart": (
        "sparse_circuits.quickstart",
        "QuickstartConfig",
        "quickstart",
        "the whole pipeline on the toy task",
    ),
}


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
