"""A job on a data dir under an s3:// prefix: inputs fetched before its stage, outputs uploaded after.

A worker given `--data-dir s3://bucket/prefix` (or `--data-url URL --data-dir CACHE`) keeps its
job dirs and its copies of artifacts in a local cache dir; the job's runner, in the job's own
process, does the rest (`storage.RemoteDataDir`):

1. before the stage: every path the config reads (model, CLT, token file, corpus files and
   globs) is fetched from the prefix into the cache, whole and checked against its manifest;
   what the stage writes (`out`, `store_dir`, the CLT that eval-clt and feature-stats write
   into) is fetched too when the prefix holds a newer copy, so a job that another machine
   stopped resumes from that machine's checkpoint; activation stores are not copied: the stage
   gets their s3:// URL and zarr reads and writes them on the object store.
2. the stage runs on local paths, unchanged.
3. after it, whatever its outcome, what it wrote goes up whole: manifest last, naming the job,
   the attempt and `state` (complete, or partial for a cancelled, stopped or failed run), so a
   half upload never reads as an artifact and a partial one never as a finished one. A run that
   did not succeed and changed nothing uploads nothing.

A run killed outright uploads nothing: the next attempt on this machine resumes from the local
copy; on another machine, from the last upload (that of the last attempt that ended).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from ..storage import RemoteDataDir, StorageError
from .specs import GLOB_CHARS, job_paths

log = logging.getLogger(__name__)

COMPLETE, PARTIAL = "complete", "partial"


def fetch_job_inputs(remote: RemoteDataDir, kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Bring the job's inputs and earlier outputs into the cache; return the config the stage
    runs with (activation stores as URLs under the prefix, every other path unchanged)."""
    paths = job_paths(kind, config)
    for rel in paths.inputs:
        if remote.fetch(rel) is None and (remote.local / rel).exists():
            log.warning(
                "%s is not under %s: using this machine's copy, which other machines lack",
                rel, remote.url,
            )  # fmt: skip
    for entry in paths.corpus:
        for rel in remote.glob(entry) if GLOB_CHARS & set(entry) else [entry]:
            remote.fetch(rel, folders=True)  # absent: a hub dataset name, or the stage says so
    for rel in paths.outputs:
        try:
            remote.fetch(rel)
        except StorageError as e:  # an upload that never finished: what is here is newer
            log.warning("not resuming from %s: %s", rel, e)
    runs_with = copy.deepcopy(config)
    for loc in paths.stores:
        target = runs_with
        for key in loc[:-1]:
            target = target[key]
        target[loc[-1]] = remote.url_of(str(target[loc[-1]]))
    return runs_with


def upload_job_outputs(
    remote: RemoteDataDir,
    kind: str,
    config: dict[str, Any],
    *,
    state: str,
    job_id: str,
    attempt: int,
) -> list[str]:
    """Upload what the job wrote (each output present in the cache), manifest last; returns
    their paths. `state` is the job's outcome: only a succeeded one uploads a complete artifact."""
    extra = {
        "state": COMPLETE if state == "succeeded" else PARTIAL,
        "job_id": job_id,
        "attempt": attempt,
    }
    sent = []
    for rel in job_paths(kind, config).outputs:
        # a run that did not succeed and changed nothing (it refused an out dir holding another
        # run, say) leaves the prefix's copy, and what its manifest says of it, as they were
        if state != "succeeded" and not remote.changed_here(rel):
            continue
        if remote.upload(rel, extra) is not None:
            sent.append(rel)
    return sent


def remote_data_dir(data_url: str | None, data_dir: str | Path) -> RemoteDataDir | None:
    """The data dir at `data_url` cached in `data_dir`; None for a plain local data dir."""
    return None if data_url is None else RemoteDataDir(data_url, data_dir)
