"""Artifact records: what a path under the data dir holds, its metrics and its lineage.

`register_artifact` inspects one path (a model dir, an activation store, a CLT dir, a graph)
and adds or updates its row; `scan_data_dir` registers every artifact found in the data dir's
usual folders. Lineage comes from the files themselves: a store's `model` attr names the model
it was harvested from, a CLT's `run.json` config names its store, a sparsified model's names
its dense model, a graph's config (its job's, or its own `run.json`) names model and CLT. A
parent that is not registered yet is registered on the way, when it is there to inspect.
Both functions commit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import StageError
from ..io import RUN_FILE
from .db import Artifact, Job

log = logging.getLogger(__name__)

MODEL_FORMAT = "sparse-circuits-model"
CLT_FORMAT = "sparse-circuits-clt"
STORE_FORMAT = "sparse-circuits-activations"
STAGE_KINDS = {
    "train-toy": "model",
    "pretrain": "model",
    "sparsify": "model",
    "harvest": "store",
    "train-clt": "transcoder",
    "eval-clt": "transcoder",
    "export": "transcoder",
    "feature-stats": "transcoder",
    "attribute": "graph",
}
# where scan_data_dir looks: folder -> what its entries may be
SCAN_FOLDERS = ("models", "activations", "clts", "graphs")


class Inspection(NamedTuple):
    """What a path holds, as read from its own files."""

    kind: str
    state: str  # complete | partial
    metrics: dict[str, Any] | None
    meta: dict[str, Any]
    parents: dict[str, str]  # lineage field (model_id, store_id, transcoder_id) -> parent path


class ArtifactError(StageError):
    """A path that is no artifact, or lies outside the data dir."""


# ----------------------------------------------------------------------------- paths


def relative_path(data_dir: str | Path, path: str | Path) -> str:
    """`path` as stored: relative to the data dir (POSIX), or the s3:// URL unchanged."""
    text = str(path)
    if text.startswith("s3://"):
        return text.rstrip("/")
    root = Path(data_dir).resolve()
    p = Path(text)
    full = (p if p.is_absolute() else root / p).resolve()
    if not full.is_relative_to(root):
        raise ArtifactError(f"{path} lies outside the data dir {root}")
    return full.relative_to(root).as_posix()


def _local(data_dir: str | Path, rel: str) -> Path:
    return Path(data_dir).resolve() / rel


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_config(path: Path) -> dict[str, Any]:
    run = _read_json(path / RUN_FILE)
    return run.get("config", {}) if isinstance(run, dict) else {}


# ----------------------------------------------------------------------------- inspection


def inspect_path(data_dir: str | Path, rel: str, job: Job | None = None) -> Inspection | None:
    """What `rel` holds, or None when it is no artifact we know."""
    if rel.startswith("s3://"):
        return _inspect_remote_store(rel)
    path = _local(data_dir, rel)
    if path.is_file() and path.suffix == ".json":
        return _inspect_graph_file(path, job)
    if not path.is_dir():
        return None
    config = _read_json(path / "config.json")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt == MODEL_FORMAT:
        return _inspect_model(path, config)
    if fmt == CLT_FORMAT:
        return _inspect_clt(path, config)
    if (path / "config.yaml").is_file() and any(path.glob("W_enc_*.safetensors")):
        return Inspection("transcoder", "complete", None, {"format": "circuit-tracer"}, {})
    zarr_meta = _read_json(path / "zarr.json")
    if isinstance(zarr_meta, dict):
        attrs = zarr_meta.get("attributes", {})
        if attrs.get("format") == STORE_FORMAT:
            return _inspect_store(attrs)
    if (path / "graph.safetensors").is_file() or (job is not None and job.kind == "attribute"):
        return _inspect_graph_dir(path, job)
    return None


def _metrics(path: Path) -> dict[str, Any] | None:
    metrics = _read_json(path / "metrics.json")
    return metrics if isinstance(metrics, dict) else None


def _inspect_model(path: Path, config: dict[str, Any]) -> Inspection:
    run = _run_config(path)
    parents = {"model_id": run["model"]} if run.get("model") else {}
    meta = {k: config.get(k) for k in ("family", "n_layers", "d_model", "n_heads", "vocab_size")}
    meta["sparse"] = config.get("gate") is not None
    return Inspection("model", _state(path), _metrics(path), meta, parents)


def _inspect_clt(path: Path, config: dict[str, Any]) -> Inspection:
    run = _run_config(path)
    parents = {"store_id": run["activations"]} if run.get("activations") else {}
    clt = config.get("clt", {}) if isinstance(config.get("clt"), dict) else {}
    meta = {k: clt.get(k) for k in ("n_layers", "d_model", "d_features", "activation")}
    meta["feature_stats"] = (path / "features").is_dir()
    return Inspection("transcoder", _state(path), _metrics(path), meta, parents)


def _inspect_store(attrs: dict[str, Any]) -> Inspection:
    parents = {"model_id": attrs["model"]} if attrs.get("model") else {}
    meta = {
        k: attrs.get(k)
        for k in ("rows_total", "rows_written", "n_layers", "d_model", "context_length")
    }
    state = "complete" if attrs.get("complete") else "partial"
    return Inspection("store", state, attrs.get("metrics"), meta, parents)


def _inspect_remote_store(url: str) -> Inspection | None:
    try:
        import zarr  # noqa: PLC0415  (only remote stores need it)

        attrs = zarr.open_group(url, mode="r").attrs.asdict()
    except Exception as e:  # credentials, network, not a group: record what we can
        log.warning("could not read the attrs of %s: %s", url, e)
        return Inspection("store", "complete", None, {}, {})
    return _inspect_store(attrs) if attrs.get("format") == STORE_FORMAT else None


def _inspect_graph_file(path: Path, job: Job | None) -> Inspection | None:
    doc = _read_json(path)
    if not isinstance(doc, dict) or "nodes" not in doc or "metadata" not in doc:
        return None
    metadata = doc.get("metadata", {})
    meta = {
        "slug": metadata.get("slug"),
        "prompt": metadata.get("prompt"),
        "n_nodes": len(doc.get("nodes", [])),
        "n_links": len(doc.get("links", [])),
    }
    return Inspection("graph", "complete", metadata.get("scores"), meta, _graph_parents(path, job))


def _inspect_graph_dir(path: Path, job: Job | None) -> Inspection:
    meta = _read_json(path / "meta.json")
    return Inspection(
        "graph",
        _state(path),
        _metrics(path),
        meta if isinstance(meta, dict) else {},
        _graph_parents(path, job),
    )


def _graph_parents(path: Path, job: Job | None) -> dict[str, str]:
    config = job.config if job is not None and job.kind == "attribute" else {}
    config = config or (_run_config(path) if path.is_dir() else {})
    parents = {}
    if config.get("model"):
        parents["model_id"] = config["model"]
    if config.get("clt"):
        parents["transcoder_id"] = config["clt"]
    return parents


def _state(path: Path) -> str:
    return "partial" if (path / "cancelled.json").is_file() else "complete"


# ----------------------------------------------------------------------------- records


def register_artifact(
    session: Session, data_dir: str | Path, path: str | Path, job_id: str | None = None
) -> Artifact:
    """Add or update the record of the artifact at `path` (relative to the data dir, absolute
    inside it, or s3://); raise ArtifactError when it is none. Commits."""
    artifact = _register(session, data_dir, relative_path(data_dir, path), job_id, depth=0)
    session.commit()
    return artifact


def register_partial(
    session: Session, data_dir: str | Path, path: str | Path, job: Job
) -> Artifact | None:
    """Record what a cancelled job left at `path` as a partial artifact of its stage's kind."""
    rel = relative_path(data_dir, path)
    found = inspect_path(data_dir, rel, job)
    kind = found.kind if found else STAGE_KINDS.get(job.kind)
    if kind is None:
        return None
    seen = found or Inspection(kind, "partial", None, {}, {})
    artifact = _upsert(session, data_dir, rel, seen._replace(state="partial"), job.id, depth=0)
    session.commit()
    return artifact


def _register(
    session: Session, data_dir: str | Path, rel: str, job_id: str | None, depth: int
) -> Artifact:
    job = session.get(Job, job_id) if job_id else None
    found = inspect_path(data_dir, rel, job)
    if found is None and rel.endswith("/features"):  # feature-stats wrote into a CLT dir
        return _register(session, data_dir, rel.rsplit("/", 1)[0], None, depth)
    if found is None:
        raise ArtifactError(f"{rel} is not a model, activation store, transcoder or graph")
    return _upsert(session, data_dir, rel, found, job_id, depth)


def _upsert(
    session: Session,
    data_dir: str | Path,
    rel: str,
    found: Inspection,
    job_id: str | None,
    depth: int,
) -> Artifact:
    artifact = session.scalar(select(Artifact).where(Artifact.path == rel))
    if artifact is None:
        artifact = Artifact(path=rel, name=_name(rel))
        session.add(artifact)
    artifact.kind, artifact.state = found.kind, found.state
    artifact.metrics, artifact.meta = found.metrics, found.meta
    if job_id is not None:
        artifact.job_id = job_id
    for field, parent_path in found.parents.items():
        parent = _parent(session, data_dir, parent_path, depth)
        if parent is not None:
            setattr(artifact, field, parent.id)
    if found.kind == "transcoder" and artifact.model_id is None and artifact.store_id:
        store = session.get(Artifact, artifact.store_id)
        artifact.model_id = store.model_id if store is not None else None
    session.flush()
    log.info("registered %s %s (%s)", found.kind, rel, artifact.id)
    return artifact


def _parent(session: Session, data_dir: str | Path, path: str, depth: int) -> Artifact | None:
    """The record of a lineage parent, registering it when it is there and not yet recorded."""
    try:
        rel = relative_path(data_dir, path)
    except ArtifactError:
        return None  # a parent outside the data dir (a CLI run elsewhere): no link
    known = session.scalar(select(Artifact).where(Artifact.path == rel))
    if known is not None or depth >= 3:
        return known
    try:
        return _register(session, data_dir, rel, None, depth + 1)
    except ArtifactError:
        return None


def _name(rel: str) -> str:
    name = rel.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".zarr", ".json"):
        name = name.removesuffix(suffix)
    return name


def scan_data_dir(session: Session, data_dir: str | Path) -> list[Artifact]:
    """Register every artifact in the data dir's models/, activations/, clts/ and graphs/."""
    root = Path(data_dir).resolve()
    found = []
    for folder in SCAN_FOLDERS:
        if not (root / folder).is_dir():
            continue
        for entry in sorted((root / folder).iterdir()):
            if entry.name.startswith("."):
                continue  # temporary siblings of atomic writes
            rel = entry.relative_to(root).as_posix()
            if inspect_path(root, rel) is None:
                continue
            found.append(_register(session, root, rel, None, depth=0))
    session.commit()
    return found
