"""The pipeline stages, by name: one registry for the CLI, the job queue and the service.

A stage is `(module, config class, run function, one-line help)`. Its module is imported only
when the stage runs, so a stage's heavy imports cost only that stage (and `--help` costs none).
A job of kind K runs exactly what `sparse-circuits K` runs, with the same config.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from pydantic import BaseModel


class Stage(NamedTuple):
    module: str
    config: str
    run: str
    help: str

    def config_class(self) -> type[BaseModel]:
        return getattr(importlib.import_module(self.module), self.config)

    def run_function(self):
        return getattr(importlib.import_module(self.module), self.run)


STAGES: dict[str, Stage] = {
    "train-toy": Stage(
        "sparse_circuits.sparse_attention.train", "ToyTrainConfig", "train_toy",
        "train a small model on a toy task",
    ),
    "pretrain": Stage(
        "sparse_circuits.sparse_attention.train", "PretrainConfig", "pretrain",
        "train a small LM on a text corpus",
    ),
    "sparsify": Stage(
        "sparse_circuits.sparse_attention.sparsify", "SparsifyConfig", "sparsify",
        "sparse attention post-training",
    ),
    "harvest": Stage(
        "sparse_circuits.clt.harvest", "HarvestConfig", "harvest",
        "record MLP inputs and outputs into a zarr store",
    ),
    "train-clt": Stage(
        "sparse_circuits.clt.train", "TrainCLTConfig", "train_clt",
        "train a cross-layer transcoder on an activation store",
    ),
    "eval-clt": Stage(
        "sparse_circuits.clt.evaluate", "EvalCLTConfig", "eval_clt",
        "evaluate a CLT: FVU, L0, and the model with every MLP replaced by it",
    ),
    "export": Stage(
        "sparse_circuits.clt.export", "ExportConfig", "export",
        "write a CLT in circuit-tracer's layout",
    ),
    "feature-stats": Stage(
        "sparse_circuits.clt.features", "FeatureStatsConfig", "feature_stats",
        "per-feature top contexts, frequency, histogram and logits for the service",
    ),
    "attribute": Stage(
        "sparse_circuits.attribution.attribute", "AttributeConfig", "run_attribute",
        "compute an attribution graph",
    ),
}  # fmt: skip
