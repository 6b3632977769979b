"""`quickstart`: the whole pipeline on the addition toy, in one data dir.

train-toy → sparsify → harvest → train-clt → eval-clt → attribute. Every stage is skipped
when its artifact is complete and resumes when it is not, so rerunning continues a killed run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .io import read_json

log = logging.getLogger(__name__)

PROMPT = "<bos>36+47="  # answer 083: the graph of the first answer digit


class QuickstartConfig(BaseModel):
    """`quickstart`: train the toy model, sparsify it, record activations, train and evaluate a
    CLT on them, and compute one attribution graph."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path = Field(
        Path("sparse-circuits-data"), description="Where every stage writes its artifact."
    )
    no_serve: bool = Field(False, description="Stop after the pipeline instead of serving it.")
    device: str = Field("cpu", description="torch device for every stage.")


def quickstart(cfg: QuickstartConfig) -> Path:
    # Stage imports are heavy: only this command pays for all of them.
    from .attribution.attribute import AttributeConfig, run_attribute  # noqa: PLC0415
    from .clt.evaluate import EvalCLTConfig, eval_clt  # noqa: PLC0415
    from .clt.harvest import HarvestConfig, harvest  # noqa: PLC0415
    from .clt.train import TrainCLTConfig, train_clt  # noqa: PLC0415
    from .sparse_attention.sparsify import SparsifyConfig, sparsify  # noqa: PLC0415
    from .sparse_attention.train import ToyTrainConfig, train_toy  # noqa: PLC0415

    root = cfg.data_dir
    dense, sparse = root / "models" / "addition-dense", root / "models" / "addition-sparse"
    acts, clt = root / "activations" / "addition-sparse.zarr", root / "clts" / "addition-sparse"
    graph = root / "graphs" / "addition-36+47.json"
    if not (dense / "metrics.json").is_file():
        train_toy(ToyTrainConfig(out=dense, device=cfg.device))
    if not (sparse / "metrics.json").is_file():
        sparsify(SparsifyConfig(model=dense, out=sparse, device=cfg.device))
    if not (clt / "metrics.json").is_file():
        harvest(HarvestConfig(model=sparse, out=str(acts), device=cfg.device))
        train_clt(TrainCLTConfig(activations=str(acts), out=clt, d_features=256, batch_size=512, steps=1500,
                                 activation="batchtopk", k=8, device=cfg.device))  # fmt: skip
    if "spliced_ce_delta" not in read_json(clt / "metrics.json"):
        eval_clt(EvalCLTConfig(clt=clt, model=sparse, device=cfg.device))
    if not graph.is_file():
        run_attribute(
            AttributeConfig(model=sparse, clt=clt, prompt=PROMPT, out=graph, device=cfg.device)
        )
    log.info("pipeline done: models, activations, CLT and graph under %s", root)
    if not cfg.no_serve:
        log.info("the server stage is not part of this release yet")
    return root
