"""`export --format circuit-tracer`: a CLT dir as circuit-tracer (and Neuronpedia) read it.

    W_enc_{i}.safetensors   W_enc_{i} [F, M], b_enc_{i} [F], b_dec_{i} [M], threshold_{i} [F] (JumpReLU)
    W_dec_{i}.safetensors   W_dec_{i} [F, L - i, M]
    config.yaml             model_name, model_kind: cross_layer_transcoder, feature_input_hook,
                            feature_output_hook, scan
    config.json             ours, so `load_clt` reads the export back too

circuit-tracer counts layers by the `W_enc_*.safetensors` files, infers F and M from their
shapes, and picks JumpReLU (a > θ) when `threshold_0` exists, ReLU otherwise; nothing else may
match that pattern here. The weights must act on raw activations: train-clt folds the loader's
normalisation into them (config.json says `normalization_folded`), and an export of a CLT that
was trained on normalised activations without folding is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from ..errors import StageError
from ..io import atomic_dir, atomic_path, read_json, write_json
from .cltdir import load_clt, write_layer_files

log = logging.getLogger(__name__)

MODEL_KIND = "cross_layer_transcoder"
# TransformerLens names, relative to a block, of the MLP's normalised input and its output.
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportConfig(BaseModel):
    """`export`: write a CLT dir in another tool's layout."""

    model_config = ConfigDict(extra="forbid")
    clt: Path = Field(description="CLT directory (train-clt's output).")
    format: Literal["circuit-tracer"] = Field("circuit-tracer", description="Target layout.")
    out: Path = Field(description="Output directory (a previous export there is replaced).")
    model_name: str | None = Field(
        None,
        description="config.yaml model_name (what circuit-tracer loads the model by); default: the "
        "model recorded with the CLT's activations.",
    )
    scan: str | None = Field(
        None, description="config.yaml scan (the transcoder set's id); default: the CLT dir's name."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype in the export."
    )


def check_folded(info: dict, source: Path) -> None:
    """Refuse weights that still expect normalised activations."""
    if info.get("normalization_folded"):
        return
    if info.get("activations") is not None:
        raise StageError(
            f"{source}/config.json: the CLT was trained on normalised activations of "
            f"{info['activations'].get('url', 'a store')} but its normalisation is not folded into "
            "the weights; save it with save_clt(clt, out, stats=store stats) first"
        )
    log.warning(
        "%s records no normalisation: exporting its weights as acting on raw activations", source
    )


def _is_previous_export(path: Path) -> bool:
    file = path / "config.yaml"
    if not file.is_file():
        return False
    try:
        return (yaml.safe_load(file.read_text()) or {}).get("model_kind") == MODEL_KIND
    except yaml.YAMLError:
        return False


@torch.no_grad()
def export(config: ExportConfig) -> Path:
    """Write config.clt in circuit-tracer's layout to config.out; return config.out."""
    source, out = Path(config.clt), Path(config.out)
    if source.resolve() == out.resolve():
        raise StageError(f"--out {out} is the CLT dir itself; choose another directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_previous_export(out))):
        raise StageError(
            f"output {out} exists and holds something other than a CLT export; choose a new --out"
        )
    clt = load_clt(source)  # checks every file, name and shape
    info = read_json(source / "config.json")
    check_folded(info, source)
    for name, p in clt.named_parameters():
        if not torch.isfinite(p).all():
            raise StageError(f"{source}: parameter {name} holds NaN or infinite values")
    recorded = (info.get("activations") or {}).get("attrs", {})
    model_name = config.model_name or recorded.get("model")
    if not model_name:
        raise StageError(f"{source}/config.json records no model; pass --model-name")
    if config.model_name is None and Path(model_name).exists():
        model_name = str(Path(model_name).resolve())  # a local dir: its absolute location
    yaml_config = {
        "model_name": model_name,
        **({"model_sha256": recorded["model_sha256"]} if "model_sha256" in recorded else {}),
        "model_kind": MODEL_KIND,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "scan": config.scan or source.resolve().name,
    }
    # Built beside the target and swapped in whole: no stale layer files from an older export.
    with atomic_dir(out) as tmp:
        write_layer_files(clt, tmp, DTYPES[config.dtype])  # the writer save_clt uses
        with atomic_path(tmp / "config.yaml") as p:
            p.write_text(yaml.safe_dump(yaml_config, sort_keys=False))
        write_json(
            tmp / "config.json",
            info
            | {"exported": {"format": config.format, "dtype": config.dtype, "from": str(source)}},
        )
    log.info(
        "exported %s (%d layers, %d features each) to %s",
        source,
        clt.cfg.n_layers,
        clt.cfg.d_features,
        out,
    )
    return out
