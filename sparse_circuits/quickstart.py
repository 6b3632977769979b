"""`quickstart`: the whole pipeline on the addition toy, each stage resumable, in one data dir."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class QuickstartConfig(BaseModel):
    """`quickstart`: train the toy model, sparsify it, and report where everything went."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path = Field(Path("sparse-circuits-data"), description="Where every stage writes its artifact.")
    no_serve: bool = Field(False, description="Stop after the pipeline instead of serving it.")
    device: str = Field("cpu", description="torch device for every stage.")


def quickstart(cfg: QuickstartConfig) -> Path:
    from .sparse_attention.sparsify import SparsifyConfig, sparsify  # noqa: PLC0415  (stage imports are heavy)
    from .sparse_attention.train import ToyTrainConfig, train_toy  # noqa: PLC0415

    root = cfg.data_dir
    dense, sparse = root / "models" / "addition-dense", root / "models" / "addition-sparse"
    if not (dense / "metrics.json").is_file():
        train_toy(ToyTrainConfig(out=dense, device=cfg.device))
    if not (sparse / "metrics.json").is_file():
        sparsify(SparsifyConfig(model=dense, out=sparse, device=cfg.device))
    if not cfg.no_serve:
        log.info("the server stage is not part of this release yet; artifacts are in %s", root)
    return root
